import numpy as np

from coreseg.common.metrics import markdown_table, summarize, summarize_by


def test_eval_metrics_on_hand_made_predictions():
    rng = np.random.default_rng(0)
    gt = rng.random((6, 20, 20)) > 0.6
    pred = rng.random((6, 20, 20)) > 0.5
    pred[2] = False  # no mask drawn -> Dice 0 -> failure
    formats = [True, True, True, False, True, True]  # sample 3 has an invalid format -> failure
    modalities = ["ct", "ct", "us", "us", "us", "ct"]
    records = []
    for g, p, f, m in zip(gt, pred, formats, modalities):
        inter = np.logical_and(g, p).sum()
        dice = 2 * inter / (g.sum() + p.sum())
        iou = inter / np.logical_or(g, p).sum()
        records.append({"dice": float(dice), "iou": float(iou), "format_ok": f, "modality": m})
    # independent computation with plain set arithmetic over pixel indices
    dices, ious, fails = [], [], 0
    for g, p, f in zip(gt, pred, formats):
        gs, ps = set(zip(*np.nonzero(g))), set(zip(*np.nonzero(p)))
        d = 2 * len(gs & ps) / (len(gs) + len(ps))
        dices.append(d)
        ious.append(len(gs & ps) / len(gs | ps))
        fails += (d == 0) or not f
    out = summarize(records)
    assert out["n"] == 6
    assert np.isclose(out["mDice"], np.mean(dices)) and np.isclose(out["mIoU"], np.mean(ious))
    assert out["failure_rate"] == fails / 6 == 2 / 6
    by = summarize_by(records)
    assert set(by) == {"ct", "us"} and by["us"]["failure_rate"] == 2 / 3 and by["ct"]["failure_rate"] == 0
    assert np.isclose(by["ct"]["mDice"], np.mean([dices[0], dices[1], dices[5]]))
    assert "| us | 3 |" in markdown_table(by)


def test_empty_records():
    assert summarize([])["n"] == 0
