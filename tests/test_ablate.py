"""bench/ablate.py: its table math (t intervals over seeds, checked by hand) and its resumability (a finished run
is not redone, an unfinished one is cleared and redone), with a stand-in for the CLI calls that writes the files a
real run writes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy import stats

from bench import ablate


def _final(folder: Path, dice: float, fail: float = 0.25) -> None:
    (folder / "eval").mkdir(parents=True, exist_ok=True)
    overall = {"mDice": dice, "mIoU": dice / 2, "failure_rate": fail, "n": 40}
    (folder / "eval" / "final.json").write_text(json.dumps({s: {"overall": overall, "records": []}
                                                            for s in ablate.SPLITS}))


def test_table_mean_and_t_half_width_by_hand(tmp_path):
    dices = {0: 0.40, 1: 0.44, 2: 0.48}
    for seed, d in dices.items():
        _final(tmp_path / ablate.slug("+ box") / f"seed{seed}", d)
    _final(tmp_path / ablate.slug(ablate.SFT_ONLY) / "seed0", 0.30)
    found = ablate.collect(tmp_path, [ablate.SFT_ONLY, "+ box", "GRPO format"], [0, 1, 2])
    assert set(found) == {ablate.SFT_ONLY, "+ box"} and sorted(found["+ box"]) == [0, 1, 2]
    table = ablate.ablation_table(found)
    half = stats.t.ppf(0.975, 2) * np.std([0.40, 0.44, 0.48], ddof=1) / np.sqrt(3)  # = 4.303 * 0.04 / sqrt 3
    assert np.isclose(half, 0.0994, atol=1e-4)
    box_line = next(line for line in table.splitlines() if line.startswith("| + box |"))
    cells = [c.strip() for c in box_line.strip("|").split("|")]
    assert cells[1] == "0,1,2"
    assert cells[2] == f"0.440 ± {half:.3f}"  # test_id mDice
    assert cells[3] == f"0.220 ± {half / 2:.3f}"  # test_id mIoU
    assert cells[4] == "0.250 ± 0.000"  # the same failure rate in every seed
    sft_line = next(line for line in table.splitlines() if line.startswith(f"| {ablate.SFT_ONLY} |"))
    assert "| 0 | 0.300 |" in sft_line  # one seed: the value, no interval
    assert table.splitlines()[0].count("|") == 2 + 2 * 3 + 1


def test_finished_runs_are_not_redone(tmp_path, monkeypatch):
    calls = []

    def fake_coreseg(args, log):
        calls.append(args[0] + " " + Path(args[2]).parent.name + "/" + Path(args[2]).name)
        folder = Path(args[2])
        if args[0] == "sft":
            (folder / "checkpoints" / "grpo_000000_sft_000004").mkdir(parents=True)
            (folder / "checkpoints" / "latest").write_text("grpo_000000_sft_000004")
        else:
            assert args[0] == ("eval" if folder.parent.name == ablate.slug(ablate.SFT_ONLY) else "train")
            if args[0] == "train":
                assert "--init" in args and args[args.index("--init") + 1].endswith("grpo_000000_sft_000004")
            _final(folder, 0.5)
        return 1.0

    monkeypatch.setattr(ablate, "coreseg", fake_coreseg)
    rows = [ablate.SFT_ONLY, "GRPO format", "+ density-aware"]
    ablate.run_all(tmp_path, rows, [0, 1], "tiny_cpu", [])
    assert len(calls) == 2 * (1 + 3)
    calls.clear()
    # a run cut short leaves a folder without eval/final.json: only that one is redone, from a clean folder
    cut = tmp_path / ablate.slug("GRPO format") / "seed1"
    (cut / "eval" / "final.json").unlink()
    (cut / "stale.txt").write_text("x")
    ablate.run_all(tmp_path, rows, [0, 1], "tiny_cpu", [])
    assert calls == ["train grpo_format/seed1"] and not (cut / "stale.txt").exists()
    found = ablate.collect(tmp_path, rows, [0, 1])
    assert all(sorted(found[r]) == [0, 1] for r in rows)


def test_policy_dependence_pairs_answers_and_masks_by_hand():
    from bench.policy_dependence import compare_records

    ok = "<think> a </think> <answer> The polyp is located at [[1, 2, 30, 40]]. The mask is <seg>. </answer>"
    inverted = "<think> a </think> <answer> The polyp is located at [[1, 70, 70, 70]]. The mask is <seg>. </answer>"
    start = [{"id": "a", "text": ok, "dice": 0.5, "format_ok": True},
             {"id": "b", "text": ok, "dice": 0.25, "format_ok": True},
             {"id": "c", "text": ok, "dice": 0.0, "format_ok": True}]
    end = [{"id": "c", "text": inverted, "dice": 0.0, "format_ok": False},  # another order: paired by id
           {"id": "a", "text": ok, "dice": 0.5, "format_ok": True},
           {"id": "b", "text": inverted, "dice": 0.75, "format_ok": False}]
    c = compare_records(start, end)
    assert c["n"] == 3 and c["answers_changed"] == 2 / 3 and c["masks_changed"] == 1 / 3
    assert c["format_fail_start"] == 0 and c["format_fail_end"] == 2 / 3
    assert c["top_reason_end"] == "inverted_box (2)"
