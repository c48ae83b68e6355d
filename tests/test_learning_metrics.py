"""Learning signals per GRPO step (entropy estimate, truncation, reward spread in groups), the rollout dump,
TensorBoard text/images/hparams, the step-0 eval and an eval logged once per step."""
from __future__ import annotations

import json

import numpy as np
import pytest

from coreseg.common.config import load_config
from coreseg.common.data import LesionDataset
from coreseg.common.seeding import derive_seed
from coreseg.common.protocol import Completion, RolloutGroup, Score
from coreseg.deploy.learning_metrics import (group_reward_spread, rollout_records, sampled_stats, token_entropy_estimate,
                                     truncation_ratio)
from coreseg.deploy.metrics_log import MetricsLogger, flat_hparams, read_metrics
from tests.conftest import in_process_tiny_config


def _comp(logprobs, reason="stop", text="t"):
    return Completion(text=text, prompt_token_ids=[1], token_ids=list(range(len(logprobs))), logprobs=list(logprobs),
                      finish_reason=reason, version=1)


def _score(total):
    return Score(total=total, components={"format": 1.0, "mask": total - 1.0}, reasons=[], dice=0.5, iou=0.3,
                 format_ok=True)


def test_entropy_estimate_and_truncation_by_hand():
    groups = [RolloutGroup("a", [_comp([-0.5, -1.5]), _comp([-2.0], "length")]),
              RolloutGroup("b", [_comp([-1.0, -1.0, -1.0], "length"), _comp([], "stop")])]
    # tokens: 0.5 1.5 2.0 1.0 1.0 1.0 -> sum 7 over 6 tokens
    assert np.isclose(token_entropy_estimate(groups), 7 / 6)
    assert truncation_ratio(groups) == 0.5
    assert token_entropy_estimate([]) == 0.0 and truncation_ratio([]) == 0.0


def test_entropy_estimate_is_unbiased_at_temperature_one():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(20))
    tokens = rng.choice(20, size=200000, p=p)
    groups = [RolloutGroup("a", [_comp(np.log(p[tokens]))])]
    assert abs(token_entropy_estimate(groups) - float(-(p * np.log(p)).sum())) < 0.01


def test_group_reward_spread_by_hand():
    totals = np.array([[1.0, 1.0, 1.0, 1.0], [0.0, 2.0, 0.0, 2.0], [3.0, 3.0, 3.0, 3.0]])
    out = group_reward_spread(totals)
    assert np.isclose(out["adv/group_reward_std"], (0 + 1.0 + 0) / 3)  # population std of 0,2,0,2 is 1
    assert np.isclose(out["adv/zero_variance_share"], 2 / 3)


def test_sampled_stats_and_rollout_records():
    groups = [RolloutGroup("a", [_comp([-1.0], text="a0"), _comp([-1.0], "length", "a1")]),
              RolloutGroup("b", [_comp([-3.0], text="b0"), _comp([-3.0], text="b1")])]
    scores = [_score(1.0), _score(2.0), _score(1.5), _score(1.5)]
    stats = sampled_stats(groups, scores)
    assert np.isclose(stats["policy/entropy"], 2.0) and stats["rollout/truncation_ratio"] == 0.25
    assert np.isclose(stats["adv/group_reward_std"], 0.25) and stats["adv/zero_variance_share"] == 0.5
    recs = rollout_records(7, ["a", "b"], groups, scores, 3)
    assert [(r["sample_id"], r["completion"], r["text"], r["reward"]) for r in recs] == [
        ("a", 0, "a0", 1.0), ("b", 0, "b0", 1.5), ("a", 1, "a1", 2.0)]
    assert recs[2]["finish_reason"] == "length" and recs[0]["step"] == 7
    assert rollout_records(7, ["a", "b"], groups, scores, 0) == []


def test_resume_drops_the_dumped_rollouts_of_redone_steps(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    for step in (1, 2, 3):
        logger.log("grpo", step, {"reward/total": 1.0})
    (tmp_path / "rollouts.jsonl").write_text("".join(json.dumps({"step": s, "text": "x"}) + "\n" for s in (1, 2, 2, 3)))
    logger.truncate_after("grpo", 2)
    assert [json.loads(x)["step"] for x in (tmp_path / "rollouts.jsonl").read_text().splitlines()] == [1, 2, 2]
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_tensorboard_text_image_and_hparams(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config("tiny_cpu", [])
    logger = MetricsLogger(tmp_path, config=cfg)
    logger.text("grpo/rollouts", "hello", 3)
    logger.image("eval_masks/val/x", np.zeros((8, 10, 3), np.uint8), 3)
    logger.close()
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0, "images": 0}).Reload()
    assert "grpo/rollouts/text_summary" in acc.Tags()["tensors"]
    assert acc.Images("eval_masks/val/x")[0].width == 10
    hp = acc.PluginTagToContent("hparams")
    assert "_hparams_/experiment" in hp and "_hparams_/session_start_info" in hp
    flat = flat_hparams(cfg)
    assert flat["learner.lr"] == cfg.learner.lr and flat["rollout.group_size"] == cfg.rollout.group_size
    assert json.loads(flat["reward.terms"]) == cfg.reward.terms


def test_draw_mask_colours_by_hand():
    from coreseg.deploy.evaluation import draw_mask

    image = np.full((6, 6, 3), 100, np.uint8)
    pred = np.zeros((6, 6), bool)
    pred[0, 0] = True
    gt = np.zeros((6, 6), bool)
    gt[1:5, 1:5] = True  # 4x4 square: its 12 border pixels are the outline, the 2x2 centre is inside
    out = draw_mask(image, pred, [gt])
    assert tuple(out[0, 0]) == (int(0.55 * 100 + 0.45 * 255), int(0.55 * 100 + 0.45 * 40), int(0.55 * 100 + 0.45 * 40))
    assert (out[gt] == (40, 220, 40)).all(axis=1).sum() == 12
    assert tuple(out[2, 2]) == (100, 100, 100) and tuple(out[5, 5]) == (100, 100, 100)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two GRPO steps in-process (no Ray) with the step-0 eval, a periodic eval at step 2 and the final eval."""
    from coreseg.deploy.driver import Driver
    from coreseg.deploy.evaluation import evaluate_start

    cfg, run_dir = in_process_tiny_config(tmp_path_factory, "lm", [
        "rollout.group_size=3", "cluster.reward_workers=1", "run.eval_every=2", "run.save_every=0",
        "run.eval_samples=3", "run.dump_rollouts=2", "run.eval_mask_images=2"])
    d = Driver(cfg, run_dir, local=True)
    try:
        start = evaluate_start(d, ["val", "test_id"], 3)
        d.train(2)
        final = d.evaluate(["val", "test_id"], 3)
        d.cfg.run.eval_sampled = True
        sampled = d.evaluate(["val"], 3)
        samples = list(LesionDataset(cfg.data.path, "val", batch_size=3, shuffle=False).iter_all(3))[0]
        redrawn = [g.completions[0].text for g in d.generate(samples, n=1, seed=derive_seed(cfg.run.seed, 0))]
        greedy = [g.completions[0].text for g in d.generate(samples, n=1, greedy=True)]
    finally:
        d.close()
    return d.run_dir, start, final, (sampled, redrawn, greedy)


def test_each_grpo_step_logs_the_learning_signals(trained):
    run, _, _, _ = trained
    steps = [r for r in read_metrics(run) if r["phase"] == "grpo" and "reward/total" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert r["policy/entropy"] > 0 and 0 <= r["rollout/truncation_ratio"] <= 1
        assert r["adv/group_reward_std"] >= 0 and 0 <= r["adv/zero_variance_share"] <= 1
    dumped = [json.loads(line) for line in (run / "rollouts.jsonl").read_text().splitlines()]
    assert [r["step"] for r in dumped] == [1, 1, 2, 2]
    assert all(isinstance(r["text"], str) and "reward" in r and "components" in r for r in dumped)


def test_eval_is_logged_once_per_step_and_split(trained):
    run, start, final, _ = trained
    evals = [r for r in read_metrics(run) if r["phase"] == "eval"]
    keys = [(r["step"], k.split("/")[0]) for r in evals for k in r if k.endswith("/mDice")]
    # step 0: val and test_id; step 2: val (periodic), then the final eval adds test_id only; then val sampled
    assert sorted(keys) == [(0, "test_id"), (0, "val"), (2, "test_id"), (2, "val"), (2, "val_sampled")]
    assert (run / "eval" / "step0.json").exists() and (run / "eval" / "final.json").exists()
    assert set(final) == {"val", "test_id"} and set(start) == {"val", "test_id"}
    overall = final["val"]["overall"]
    assert overall["n"] == 3 and overall["mDice_lo"] <= overall["mDice"] <= overall["mDice_hi"]
    assert "95% CI" in (run / "eval" / "final.md").read_text()


def test_sampled_eval_answers_as_in_training_seeded_and_written_apart(trained):
    run, _, final, (sampled, redrawn, greedy) = trained
    assert [r["text"] for r in sampled["val"]["records"]] == redrawn  # the rollout's sampling, batch 0's seed
    assert [r["text"] for r in final["val"]["records"]] == greedy  # the greedy eval stays greedy
    assert (run / "eval" / "final_sampled.json").exists()
    evals = [r for r in read_metrics(run) if r["phase"] == "eval" and "val_sampled/mDice" in r]
    assert len(evals) == 1 and evals[0]["val_sampled/n"] == 3


def test_eval_draws_predicted_masks(trained):
    run, start, _, _ = trained
    drawn = sorted((run / "eval" / "step0_masks").glob("*/*.png"))
    found = sum(1 for r in start["val"]["records"] + start["test_id"]["records"] if r["format_ok"])
    assert len(drawn) <= 4 and (len(drawn) > 0 or found == 0)


def test_report_shows_start_end_and_paired_deltas(trained):
    from coreseg.deploy.report import write_report

    run, start, final, _ = trained
    text = write_report(run).read_text()
    assert "## Evaluation at the start of GRPO (step 0)" in text and "## Evaluation at the end" in text
    assert "## Evaluation at the end, answers sampled as in training" in text
    before = {r["id"]: r["dice"] for r in start["val"]["records"]}
    delta = np.mean([r["dice"] - before[r["id"]] for r in final["val"]["records"]])
    assert f"| val | 3 | {delta:+.4f} [" in text
    assert (run / "plots" / "learning.png").exists()
