"""The driver's step logic with every pool in this process (no Ray): which groups reach the update, dynamic
sampling, and the one answer() path of evaluation and prediction."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from tests.conftest import in_process_tiny_config

G = 3


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    from coreseg.deploy.driver import Driver

    cfg, run_dir = in_process_tiny_config(tmp_path_factory, "step", [
        f"rollout.group_size={G}", "cluster.reward_workers=2", "learner.drop_zero_variance=true",
        "learner.kl_beta=0.01"])
    d = Driver(cfg, run_dir, local=True)
    d.logger.log("grpo", 0, d.push_weights())
    yield d
    d.close()


def rigged_rewards(driver, monkeypatch, pattern):
    """The reward pool's scores with totals replaced, call after call, by rows of `pattern` (one row per group);
    returns the list of the totals handed out."""
    real, handed = driver.reward.score, []

    def score(items):
        scores = real(items)
        out = []
        for k in range(0, len(scores), G):
            row = pattern[len(handed) % len(pattern)]
            handed.append(row)
            out += [replace(s, total=float(r)) for s, r in zip(scores[k:k + G], row)]
        return out
    monkeypatch.setattr(driver.reward, "score", score)
    return handed


def spy_update(driver, monkeypatch):
    calls = []
    real = driver.learner.update

    def update(groups, samples, advantages, forward, step):
        calls.append((list(samples), np.array(advantages), forward))
        assert step == driver.step["grpo"]  # the 0-based GRPO step the lr schedule is evaluated at
        return real(groups, samples, advantages, forward, step)
    monkeypatch.setattr(driver.learner, "update", update)
    return calls


def test_flat_groups_never_reach_the_update(driver, monkeypatch):
    handed = rigged_rewards(driver, monkeypatch, [[1.0, 1.0, 1.0], [0.0, 2.0, 1.0]])
    calls = spy_update(driver, monkeypatch)
    version = driver.version
    record = driver.grpo_step()
    (samples, adv, forward), = calls
    assert handed == [[1.0, 1.0, 1.0], [0.0, 2.0, 1.0]]
    assert [s.id for s in samples] == record["batch_ids"].split(",") and len(samples) == 1
    np.testing.assert_allclose(adv, (np.array([0.0, 2.0, 1.0]) - 1.0) / (np.sqrt(2 / 3) + 1e-6))
    assert len(forward.ref_logprobs) == len(forward.seg_found) == G  # the flat group's rows are gone
    assert record["adv/dropped_groups"] == 1 and record["adv/kept_groups"] == 1 and record["adv/extra_draws"] == 0
    assert driver.version == version + 1


def test_a_step_with_only_flat_groups_skips_the_update(driver, monkeypatch):
    rigged_rewards(driver, monkeypatch, [[0.5, 0.5, 0.5]])
    calls = spy_update(driver, monkeypatch)
    version = driver.version
    record = driver.grpo_step()
    assert calls == [] and driver.version == version
    assert record["adv/dropped_groups"] == 2 and record["adv/kept_groups"] == 0 and "learner/loss" not in record


def test_dynamic_sampling_draws_until_the_batch_is_full(driver, monkeypatch):
    # batches of 2 groups: [flat, varied], [flat, flat], [varied, varied] -> 2 extra draws, 3 varied groups, 2 kept
    rigged_rewards(driver, monkeypatch, [[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [2.0, 2.0, 2.0], [0.0, 0.0, 0.0],
                                         [0.0, 3.0, 0.0], [1.0, 0.0, 0.0]])
    calls = spy_update(driver, monkeypatch)
    monkeypatch.setattr(driver.cfg.learner, "dynamic_sampling_max_draws", 4)
    draws, next_batch = [], driver.data.next_batch
    monkeypatch.setattr(driver.data, "next_batch", lambda *a: draws.append(1) or next_batch(*a))
    record = driver.grpo_step()
    (samples, adv, _), = calls
    assert record["adv/extra_draws"] == 2 and record["adv/dropped_groups"] == 3 and len(samples) == 2
    assert len(draws) == 3  # the step's batch and two more
    third = (np.array([0.0, 1.0, 0.0]) - 1 / 3) / (np.std([0.0, 1.0, 0.0]) + 1e-6)
    np.testing.assert_allclose(adv[:G], third)  # the first batch's varied group comes first


def test_dynamic_sampling_gives_up_after_its_draws(driver, monkeypatch):
    rigged_rewards(driver, monkeypatch, [[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [2.0, 2.0, 2.0], [0.0, 0.0, 0.0]])
    calls = spy_update(driver, monkeypatch)
    monkeypatch.setattr(driver.cfg.learner, "dynamic_sampling_max_draws", 1)
    record = driver.grpo_step()
    assert record["adv/extra_draws"] == 1 and len(calls[0][0]) == 1  # one varied group found in 2 batches


def test_evaluate_and_predict_share_the_answer_path(driver, tmp_path):
    from PIL import Image

    from coreseg.deploy.predict import predict_with

    results = driver.evaluate(["val"], limit=3, tag="unit")
    records = results["val"]["records"]
    assert len(records) == 3 and all(0.0 <= r["dice"] <= 1.0 for r in records)
    image = (np.random.default_rng(0).random((64, 80, 3)) * 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "x.png")
    out = predict_with(driver, str(tmp_path / "x.png"), "Locate and segment the lesion.", str(tmp_path / "pred"))
    mask = np.asarray(Image.open(out["mask_path"]))
    assert mask.shape == (64, 80) and isinstance(out["text"], str)


def test_evaluating_a_checkpoint_changes_neither_metrics_nor_config(driver):
    from coreseg.deploy.driver import Driver

    driver.save()
    run = driver.run_dir
    before = {name: (run / name).read_bytes() for name in ("metrics.jsonl", "config.yaml")}
    cfg = driver.cfg
    reader = Driver(cfg, run, local=True, read_only=True)
    try:
        reader.restore()
        results = reader.evaluate(["val"], limit=2, tag="readonly")
        with pytest.raises(RuntimeError, match="read-only"):
            reader.train(1)
    finally:
        reader.close()
    assert len(results["val"]["records"]) == 2 and (run / "eval" / "readonly.json").exists()
    assert {name: (run / name).read_bytes() for name in before} == before
