"""Faults that take a whole process or node: `coreseg train` SIGKILLed while it writes its final checkpoint resumes
with `--resume` and ends with every step once; a worker node of a simulated 3-node cluster killed mid-run (every
process of that node, by PID) is survived: its actors come back on the nodes left and the run finishes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coreseg.common.synth import write_synth
from coreseg.deploy.fault_injection import kill_tree, process_tree

pytestmark = pytest.mark.slow  # real stack: Ray, DeepSpeed, in processes of their own

ROOT = Path(__file__).resolve().parent.parent
TINY = ["run.sft_steps=0", "run.eval_every=0", "data.batch_size=2", "rollout.group_size=3",
        "rollout.max_new_tokens=16", "rollout.engine=hf"]


def coreseg(*args) -> list:
    return [sys.executable, "-m", "coreseg.deploy.cli", *args]


def grpo_steps(run: Path) -> list:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if x.strip() and '"reward/total"' in x and '"phase": "grpo"' in x]


def local_env() -> dict:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # a Ray of its own, not the test session's
    return env


@pytest.mark.timeout(600)  # two runs of the CLI, each starting its own Ray
def test_a_kill_during_the_final_save_leaves_a_resumable_run(tmp_path):
    data = write_synth(tmp_path / "data", 16, 112, 0).parent
    run = tmp_path / "runs" / "final"
    args = ["train", "--config", "tiny_cpu", f"data.path={data}", f"run.output_dir={tmp_path / 'runs'}",
            "run.name=final", "run.steps=3", "run.save_every=2", "cluster.reward_workers=1", *TINY]
    final = run / "checkpoints" / "grpo_000003_sft_000000"
    partial = final.with_name(final.name + ".tmp")
    log = tmp_path / "train.log"
    with log.open("w") as out:  # a file, not a pipe: a full pipe would stall the run
        proc = subprocess.Popen(coreseg(*args), cwd=ROOT, env=local_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while not (partial.is_dir() and any(p.is_file() for p in partial.rglob("*"))):  # a file of it written
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the final save never started"
            time.sleep(0.01)
        tree = process_tree(proc.pid)  # the CLI, its Ray and Ray's workers: all started here
        kill_tree(tree)
    finally:
        if proc.poll() is None:
            kill_tree(process_tree(proc.pid))
    assert not final.exists(), "the kill came after the save finished"
    assert (run / "checkpoints" / "latest").read_text() == "grpo_000002_sft_000000"
    before = {r["step"]: r["reward/total"] for r in grpo_steps(run)}
    assert sorted(before) == [1, 2, 3]

    resumed = subprocess.run(coreseg("train", "--resume", str(run)), cwd=ROOT, env=local_env(), capture_output=True,
                             text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    steps = grpo_steps(run)
    assert [r["step"] for r in steps] == [1, 2, 3]  # step 3 redone from checkpoint 2, logged once
    assert {r["step"]: r["reward/total"] for r in steps} == pytest.approx(before, abs=1e-6)
    assert (run / "checkpoints" / "latest").read_text() == "grpo_000003_sft_000000"
    assert not list((run / "checkpoints").glob("*.tmp"))


@pytest.mark.timeout(600)  # a 3-node cluster, a run, a node's death detected and its bundles placed again
def test_a_lost_worker_node_is_survived(tmp_path, monkeypatch):
    """3 simulated nodes of 3 CPUs; 1 learner rank, 2 rollout and 2 reward workers SPREAD over them. After step 1
    every process of the worker node with the most actors (the learner's, if it is on a worker node) is
    SIGKILLed: Ray places its bundles on the nodes left, the pools bring their workers back, a lost learner is
    rebuilt from checkpoint 1; the run ends with its 4 steps, each once, a lost learner in its metrics."""
    from coreseg.deploy.local_cluster import start_local_cluster

    # the head declares a silent node dead after ~3 s instead of the default ~30 s
    for key, value in {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                       "RAY_health_check_failure_threshold": "3"}.items():
        monkeypatch.setenv(key, value)
    data = write_synth(tmp_path / "data", 16, 112, 0).parent
    run = tmp_path / "runs" / "node"
    log = tmp_path / "train.log"
    args = ["train", "--config", "tiny_cpu", "cluster.mode=cluster", f"data.path={data}",
            f"run.output_dir={tmp_path / 'runs'}", "run.name=node", "run.steps=4", "run.save_every=1",
            "cluster.learner_workers=1", "cluster.rollout_workers=2", "cluster.reward_workers=2",
            "cluster.placement_strategy=SPREAD", *TINY]
    cluster = start_local_cluster(workers=2, cpus_per_node=3)
    proc = None
    try:
        env = dict(cluster.env, RAY_ADDRESS=cluster.address)
        with log.open("w") as out:  # a file, not a pipe: a full pipe would stall the run
            proc = subprocess.Popen(coreseg(*args), cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while not ((run / "checkpoints" / "latest").exists() and (run / "metrics.jsonl").exists()
                   and grpo_steps(run)):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "step 1 never finished"
            time.sleep(0.2)
        placement = json.loads((run / "placement.json").read_text())
        dirs = cluster.node_ids()
        hosted = {}
        for role, nodes in placement.items():
            for node in nodes:
                if dirs[node] != cluster.temp_dirs[0]:  # the head holds the GCS: losing it ends any Ray cluster
                    hosted.setdefault(node, []).append(role)
        victim = max(hosted, key=lambda n: ("learner" in hosted[n], len(hosted[n])))
        assert cluster.kill_node(dirs[victim])
        proc.wait(timeout=900)
        assert proc.returncode == 0, log.read_text()[-5000:]
    finally:
        if proc is not None and proc.poll() is None:
            kill_tree(process_tree(proc.pid))
        cluster.stop()
    steps = grpo_steps(run)
    assert [r["step"] for r in steps] == [1, 2, 3, 4], log.read_text()[-3000:]
    last = steps[-1]
    lost = hosted[victim]
    # (a worker Ray restarted that got its weights from the push after the learner rebuild was never found
    # stale, so `restarts/<role>` counts only the workers the pools had to recover)
    faults = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"phase": "fault"' in x]
    assert len(faults) == ("learner" in lost) and last["restarts/learner"] == ("learner" in lost)
    assert (run / "checkpoints" / "latest").read_text() == "grpo_000004_sft_000000"
