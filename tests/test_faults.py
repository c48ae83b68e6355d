"""Faults during a run (local Ray, tiny models): a lost learner is rebuilt from the latest checkpoint and the
run goes on; the redone steps are logged once and score what an uninterrupted run from that checkpoint scores."""
from __future__ import annotations

import json
import shutil

import pytest

from common.config import load_config
from common.synth import write_synth

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]  # real stack: Ray, DeepSpeed


def test_a_killed_learner_is_rebuilt_from_the_latest_checkpoint(tmp_path, ray_session):
    from deploy.driver import Driver

    write_synth(tmp_path / "data", 16, 112, 0)
    cfg = load_config("tiny_cpu", [
        f"data.path={tmp_path / 'data'}", f"run.output_dir={tmp_path}", "run.name=faults", "data.batch_size=2",
        "rollout.group_size=3", "rollout.max_new_tokens=16", "rollout.engine=hf", "run.save_every=2",
        "run.eval_every=0", "cluster.reward_workers=1", "run.max_failures=1"])
    driver = Driver(cfg, tmp_path / "faults")
    try:
        driver.train(2)  # checkpoint at step 2
        driver.train(2)  # uninterrupted steps 3 and 4
        steps = lambda: [json.loads(line) for line in (tmp_path / "faults" / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
        clean = {r["step"]: r["reward/total"] for r in steps() if r["phase"] == "grpo" and "reward/total" in r}
        checkpoints = tmp_path / "faults" / "checkpoints"
        shutil.rmtree(checkpoints / "grpo_000004_sft_000000")  # back to the state right after step 2
        (checkpoints / "latest").write_text("grpo_000002_sft_000000")
        driver.restore(version_after=driver.version)
        ray_session.kill(driver.learner.pool.actors[0])  # the learner dies before step 3
        driver.train(2)
        assert driver.learner_restarts == 1
        records = steps()
        grpo = [r for r in records if r["phase"] == "grpo" and "reward/total" in r]
        assert [r["step"] for r in grpo] == [1, 2, 3, 4]  # every step once
        assert {r["step"]: r["reward/total"] for r in grpo} == pytest.approx(clean, abs=1e-6)
        fault = [r for r in records if r["phase"] == "fault"]
        assert len(fault) == 1 and fault[0]["step"] == 2 and fault[0]["learner_restarts"] == 1
        assert driver.rollout.versions() == [driver.version] and driver.reward.versions() == [driver.version]
        ray_session.kill(driver.learner.pool.actors[0])  # a second loss exceeds run.max_failures=1
        with pytest.raises(RuntimeError, match="max_failures"):
            driver.train(1)
    finally:
        driver.close()


def test_workers_killed_during_the_push_and_the_generation_are_recovered(tmp_path, ray_session):
    """A reward worker killed right before the weight push and a rollout worker killed between steps: Ray restarts
    them, their pools reload the current weights, the run finishes every step once at one version everywhere."""
    from deploy.driver import Driver

    write_synth(tmp_path / "data", 16, 112, 0)
    cfg = load_config("tiny_cpu", [
        f"data.path={tmp_path / 'data'}", f"run.output_dir={tmp_path}", "run.name=workers", "data.batch_size=2",
        "rollout.group_size=3", "rollout.max_new_tokens=16", "rollout.engine=hf", "run.save_every=0",
        "run.eval_every=0", "cluster.reward_workers=2"])
    driver = Driver(cfg, tmp_path / "workers")
    try:
        driver.train(1)
        ray_session.kill(driver.reward.pool.actors[1], no_restart=False)
        driver.push_weights()  # the push reaches a restarting reward worker
        ray_session.kill(driver.rollout.pool.actors[0], no_restart=False)
        driver.train(2)  # the next generation reaches a restarting rollout worker
        records = [json.loads(line) for line in (tmp_path / "workers" / "metrics.jsonl").read_text().splitlines()]
        grpo = [r for r in records if r["phase"] == "grpo" and "reward/total" in r]
        assert [r["step"] for r in grpo] == [1, 2, 3]
        assert driver.rollout.versions() == [driver.version]
        assert driver.reward.versions() == [driver.version, driver.version]
        assert driver.reward.pool.restarts >= 1 and driver.rollout.pool.restarts >= 1
    finally:
        driver.close()
