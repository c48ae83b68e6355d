"""Faults during a run (local Ray, tiny models), each a SIGKILL of a real actor process by its PID at a chosen
call (deploy/fault_injection.py): a lost learner is rebuilt from the latest checkpoint and the run goes on, the
redone steps logged once and scoring what an uninterrupted run from that checkpoint scores; rollout and reward
workers are restarted by Ray and brought back by their pools. Every restart is counted in the metrics."""
from __future__ import annotations

import json
import os
import signal

import psutil
import pytest

from coreseg.common.config import load_config
from coreseg.common.synth import write_synth
from coreseg.deploy.fault_injection import Kill, actor_pid, kill_on_call, wait_gone

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]  # real stack: Ray, DeepSpeed


def tiny(tmp_path, name, *more):
    write_synth(tmp_path / "data", 16, 112, 0)
    return load_config("tiny_cpu", [
        f"data.path={tmp_path / 'data'}", f"run.output_dir={tmp_path}", f"run.name={name}", "data.batch_size=2",
        "rollout.group_size=3", "rollout.max_new_tokens=16", "rollout.engine=hf", "run.eval_every=0", *more])


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def grpo_steps(run_dir):
    return [r for r in records(run_dir) if r["phase"] == "grpo" and "reward/total" in r]


def test_a_learner_killed_mid_update_and_mid_save_is_rebuilt_from_the_latest_checkpoint(tmp_path):
    from coreseg.deploy.driver import Driver

    cfg = tiny(tmp_path, "learner", "run.save_every=2", "cluster.reward_workers=1", "run.max_failures=2")
    run = tmp_path / "learner"
    driver = Driver(cfg, run)
    try:
        driver.train(3)  # uninterrupted; checkpoint at step 2
        clean = {r["step"]: r["reward/total"] for r in grpo_steps(run)}
        driver.restore(version_after=driver.version)  # back to the state right after step 2
        first = actor_pid(driver.learner.workers[0])
        # SIGKILL the learner while step 3's update is in flight, then the rebuilt one while it saves step 3
        with kill_on_call(Kill("learner", "update_rows"), Kill("learner", "save_checkpoint")) as kills:
            driver.train(1, save_at_end=True)
        assert kills[0].killed == [first] and len(kills[1].killed) == 1 and kills[1].killed[0] != first
        assert not psutil.pid_exists(first)
        assert driver.learner_restarts == 2
        grpo = grpo_steps(run)
        assert [r["step"] for r in grpo] == [1, 2, 3]  # every step once
        assert {r["step"]: r["reward/total"] for r in grpo} == pytest.approx(clean, abs=1e-6)
        assert grpo[-1]["restarts/learner"] == 2  # counted in the metrics
        faults = [r for r in records(run) if r["phase"] == "fault"]
        assert [(f["step"], f["learner_restarts"], f["lost_after_step"]) for f in faults] == [(2, 1, 2), (2, 2, 3)]
        checkpoints = run / "checkpoints"
        assert (checkpoints / "latest").read_text() == "grpo_000003_sft_000000"
        assert not list(checkpoints.glob("*.tmp"))  # the save cut by the kill left nothing behind
        assert driver.rollout.versions() == [driver.version] and driver.reward.versions() == [driver.version]
        pid = actor_pid(driver.learner.workers[0])
        os.kill(pid, signal.SIGKILL)  # a third loss exceeds run.max_failures=2
        wait_gone(pid)
        with pytest.raises(RuntimeError, match="max_failures"):
            driver.train(1)
    finally:
        driver.close()


def test_workers_killed_mid_generation_and_during_the_weight_push_are_recovered(tmp_path):
    """A rollout worker SIGKILLed while it generates step 2, a reward worker while it loads the weights pushed
    after step 2: Ray restarts both, their pools reload the current weights and re-send the lost calls; the run
    logs every step once with every sample scored, at one version everywhere."""
    from coreseg.deploy.driver import Driver

    cfg = tiny(tmp_path, "workers", "run.save_every=0", "cluster.reward_workers=2")
    run = tmp_path / "workers"
    driver = Driver(cfg, run)
    try:
        # reward worker 1 loads at the first push (version 0 -> 1 before step 1), then after steps 1 and 2
        with kill_on_call(Kill("rollout", "generate", actor=0, nth=2),
                          Kill("reward", "load_weights", actor=1, nth=3)) as (gen, push):
            driver.train(3)
        assert len(gen.killed) == 1 and len(push.killed) == 1
        assert not psutil.pid_exists(gen.killed[0]) and not psutil.pid_exists(push.killed[0])
        grpo = grpo_steps(run)
        assert [r["step"] for r in grpo] == [1, 2, 3]
        for r in grpo:  # no sample lost: every prompt generated, scored and accounted for
            assert r["rollout/errors"] == 0
            assert r["adv/kept_groups"] + r["adv/dropped_groups"] == cfg.data.batch_size
            assert r["version"] == r["step"]
        assert grpo[-1]["restarts/rollout"] == 1 and grpo[-1]["restarts/reward"] == 1
        assert grpo[-1]["reward_pool/restarts/actor_died"] == 1
        assert driver.rollout.versions() == [driver.version]
        assert driver.reward.versions() == [driver.version, driver.version]
        assert actor_pid(driver.rollout.workers[0]) != gen.killed[0]
    finally:
        driver.close()
