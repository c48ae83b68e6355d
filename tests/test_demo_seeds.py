"""bench/demo_seeds.py's summary of a finished demo run, on hand-written run files."""
from __future__ import annotations

import json

import numpy as np

from bench import demo_seeds


def _eval(dices):
    recs = [{"id": f"s{i}", "dice": d, "iou": d / 2, "format_ok": True, "modality": "ct"} for i, d in enumerate(dices)]
    overall = {"mDice": float(np.mean(dices)), "mIoU": float(np.mean(dices)) / 2,
               "failure_rate": float(np.mean([d == 0 for d in dices])), "n": len(dices)}
    return {"val": {"overall": overall, "records": recs}}


def test_seed_summary_and_table(tmp_path):
    run = tmp_path / "demo-seed0"
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "step0.json").write_text(json.dumps(_eval([0.2, 0.0, 0.5, 0.5])))
    (run / "eval" / "final.json").write_text(json.dumps(_eval([0.3, 0.4, 0.5, 0.4])))
    rows = [{"phase": "grpo", "step": 0, "version": 1.0}]
    rows += [{"phase": "grpo", "step": i, "reward/total": float(i), "reward/box": 0.1 * i} for i in range(1, 7)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "demo-seed0.log").write_text("...\ndemo finished in 321s\n")
    s = demo_seeds.seed_summary(run)
    assert s["steps"] == 6 and s["k"] == 2
    assert np.allclose(s["reward"], (1.5, 5.5)) and np.allclose(s["box"], (0.15, 0.55)) and s["wall_s"] == 321
    d = s["splits"]["val"]["delta"]
    assert np.isclose(d["d_mDice"], np.mean([0.1, 0.4, 0.0, -0.1])) and np.isclose(d["d_failure_rate"], -0.25)
    table = demo_seeds.summary_table({0: s})
    sd = np.std([0.1, 0.4, 0.0, -0.1], ddof=1)
    assert np.isclose(d["sd_mDice"], sd)
    assert "| 0 | val | 4 | 0.300 | 0.400 | +0.100 [" in table
    assert f"| {sd:.3f} | {int(np.ceil((1.959964 * sd / 0.02) ** 2))} |" in table  # (1.96 * 0.216 / 0.02)^2 -> 449
    assert "0.250 → 0.000" in table and "| 0 | 6 | 1.500 → 5.500 | 0.150 → 0.550 | 321 |" in table
    assert "val 1/1" in table
