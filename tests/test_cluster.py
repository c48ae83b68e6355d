"""Cluster mode: a head and two worker nodes of our own on 127.0.0.1 (deploy/local_cluster.py: own ports and temp
dirs), a tiny run through `ray job submit`, then only that cluster's processes are stopped."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # real stack: Ray, DeepSpeed, vLLM

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def own_cluster():
    """A head and two worker nodes on 127.0.0.1, 2 CPUs each, each with its own temp dir and ports."""
    from deploy.local_cluster import start_local_cluster

    cluster = start_local_cluster(workers=2, cpus_per_node=2)
    try:
        yield cluster.dashboard, cluster.env, cluster.ray_bin
    finally:
        cluster.stop()


def test_ray_job_submit_one_step(own_cluster, tmp_path):
    from common.synth import write_synth
    from deploy.cli import submit_command

    address, env, ray_bin = own_cluster
    data = write_synth(tmp_path / "data", 16, 112, 0).parent
    entry = ["coreseg", "train", "--config", "tiny_cpu", "cluster.mode=cluster", f"data.path={data}",
             f"run.output_dir={tmp_path / 'runs'}", "run.name=job", "run.sft_steps=1", "run.steps=1",
             "run.save_every=0", "run.eval_every=0", "rollout.engine=hf", "data.batch_size=2",
             "rollout.group_size=2", "rollout.max_new_tokens=16", "cluster.reward_workers=1"]
    cmd = submit_command(address, entry)
    cmd[0] = ray_bin
    # wait until the job server answers
    for _ in range(60):
        if subprocess.run([ray_bin, "job", "list", "--address", address], env=env, capture_output=True).returncode == 0:
            break
        time.sleep(1)
    for _ in range(60):  # the job agent on a fresh head node takes a few seconds to register
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
        if "No available agent" not in result.stdout + result.stderr:
            break
        time.sleep(2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in (result.stdout + result.stderr).lower()
    metrics = (tmp_path / "runs" / "job" / "metrics.jsonl").read_text()
    assert '"phase": "grpo", "step": 1' in metrics
