"""Cluster mode: a head and two worker nodes of our own on 127.0.0.1 (deploy/local_cluster.py: own ports and temp
dirs), a tiny run through `ray job submit`, then only that cluster's processes are stopped."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # real stack: Ray, DeepSpeed, vLLM; a job on 3 nodes

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def own_cluster():
    """A head and two worker nodes on 127.0.0.1, 2 CPUs each, each with its own temp dir and ports."""
    from coreseg.deploy.local_cluster import start_local_cluster

    cluster = start_local_cluster(workers=2, cpus_per_node=2)
    try:
        yield cluster
    finally:
        cluster.stop()


def test_ray_job_submit_on_three_nodes(own_cluster, tmp_path):
    """`ray job submit` of a tiny run with default training settings (mask loss on) and 2 learner ranks, 2 rollout
    and 2 reward workers spread over 3 nodes; data outside the working dir, the run folder at a file:// URI (read
    and written through pyarrow.fs, as s3:// or gs:// would be); each node stages on its own local folder."""
    import json

    from coreseg.common.synth import write_synth
    from coreseg.deploy.cli import submit_command

    address, env, ray_bin = own_cluster.dashboard, own_cluster.env, own_cluster.ray_bin
    data = write_synth(tmp_path / "data", 16, 112, 0).parent
    entry = ["coreseg", "train", "--config", "tiny_cpu", "cluster.mode=cluster", f"data.path={data}",
             f"run.output_dir=file://{tmp_path / 'runs'}", "run.name=job", "run.sft_steps=0", "run.steps=4",
             "run.save_every=2", "run.eval_every=0", "data.batch_size=3", "rollout.group_size=4",
             "rollout.max_new_tokens=32", "cluster.learner_workers=2", "cluster.rollout_workers=2",
             "cluster.reward_workers=2", "cluster.placement_strategy=SPREAD"]
    cmd = submit_command(address, entry)
    cmd[0] = ray_bin
    for _ in range(60):  # the job agent on a fresh head node takes a few seconds to register
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
        if "No available agent" not in result.stdout + result.stderr:
            break
        time.sleep(2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in (result.stdout + result.stderr).lower()
    run = tmp_path / "runs" / "job"
    placement = json.loads((run / "placement.json").read_text())
    assert {role: len(ids) for role, ids in placement.items()} == {"learner": 2, "rollout": 2, "reward": 2}
    # 6 one-CPU bundles on 3 nodes of 2 CPUs: every node hosts actors (which role lands where is up to Ray's
    # best-effort SPREAD), so weights, rollouts and scores cross nodes
    assert len({n for ids in placement.values() for n in ids}) == 3, placement
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["phase"] == "grpo" and "reward/total" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        # both ranks held identical weights after the step; every pool was checked to serve the learner's version
        assert r["learner/ranks_in_sync"] == 1.0 and r["version"] == r["step"], r
        assert r["reward/mask"] == r["reward/mask"]  # mask reward computed (not NaN)
    latest = (run / "checkpoints" / "latest").read_text().strip()
    learner_part = run / "checkpoints" / latest / "learner"
    assert latest == "grpo_000004_sft_000000"
    assert {"state_rank0.json", "state_rank1.json", "adapter.safetensors"} <= {p.name for p in learner_part.iterdir()}
    assert (run / "policy" / "config.json").exists()  # the policy was published once, in the run folder
    # the learner ranks and rollout workers (4 of the 6 one-CPU bundles on 3 two-CPU nodes: at least 2 nodes) each
    # staged the published policy onto their own node's staging folder
    staged = [d for d in own_cluster.stage_dirs() if any(d.glob("uri/policy-*/config.json"))]
    assert len(staged) >= 2, own_cluster.stage_dirs()
