"""`learner.deterministic`: two learner processes of one seed end SFT with the same weights, bit for bit, even when
their tensors sit at different addresses (without it, on CPU, they part in the last digits: RESULTS.md,
bench/determinism.py). And bench/determinism.py's run comparison, on hand-written eval files."""
from __future__ import annotations

import json

import pytest

from bench import determinism


@pytest.mark.slow  # real stack: DeepSpeed learner processes
def test_deterministic_learner_processes_end_sft_with_identical_weights(tiny_policy_dir):
    assets = tiny_policy_dir.parent
    assert determinism.learner_digest(assets, 1, True, 6)[:2] == determinism.learner_digest(assets, 3, True, 6)[:2]


def test_compare_runs_counts_equal_answers_and_dice(tmp_path):
    def run(name, recs):
        (tmp_path / name / "eval").mkdir(parents=True)
        data = {"val": {"overall": {"mDice": sum(r["dice"] for r in recs) / len(recs)}, "records": recs}}
        (tmp_path / name / "eval" / "final.json").write_text(json.dumps(data))
        return tmp_path / name

    a = run("a", [{"id": "x", "text": "t1", "dice": 0.5}, {"id": "y", "text": "t2", "dice": 0.25}])
    b = run("b", [{"id": "y", "text": "t2", "dice": 0.5}, {"id": "x", "text": "t1", "dice": 0.5}])
    rows = determinism.compare_runs(a, b).splitlines()
    assert rows[2] == "| final | val | 2 | 2 | 1 | 0.375000 | 0.500000 |"  # paired by id: x equal, y's Dice differs
