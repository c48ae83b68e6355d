"""Cluster mode: our own `ray start --head` on 127.0.0.1 (own ports, own temp dir), a 1-step tiny run through
`ray job submit`, then only that cluster's processes are stopped."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow  # real stack: Ray, DeepSpeed, vLLM

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_own_cluster(temp_dir: str) -> None:
    """Terminate only the processes of the cluster rooted at `temp_dir` (never a bare `ray stop`)."""
    procs = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in (p.info["cmdline"] or [])):
                procs.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for p in procs:
        p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        p.kill()


@pytest.fixture()
def own_cluster():
    temp_dir = tempfile.mkdtemp(prefix="/tmp/cs")
    port, dash = _free_port(), _free_port()
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    ray_bin = str(Path(sys.executable).parent / "ray")
    subprocess.run([ray_bin, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                    "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--include-dashboard", "true",
                    "--temp-dir", temp_dir, "--num-cpus", "4", "--disable-usage-stats",
                    # own ports for every agent, so another Ray instance on this machine cannot collide
                    "--dashboard-agent-listen-port", str(_free_port()), "--dashboard-agent-grpc-port",
                    str(_free_port()), "--metrics-export-port", str(_free_port()), "--runtime-env-agent-port",
                    str(_free_port())],
                   check=True, env=env, capture_output=True, timeout=120)
    try:
        yield f"http://127.0.0.1:{dash}", env, ray_bin
    finally:
        _stop_own_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


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
