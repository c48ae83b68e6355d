"""A multi-node Ray cluster simulated on one machine: a head and N worker nodes on 127.0.0.1, each started with
`ray start`, its own temp dir, ports and CPUs, and stopped by its own PIDs (never a bare `ray stop`, which would
stop every Ray on the machine). For tests and benchmarks of the cluster paths (`coreseg submit`, placement)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_ports(avoid: range = range(0)) -> List[str]:
    """Own ports for every agent of a node, so other Ray instances on this machine cannot collide; none inside
    `avoid` (the node's worker port range: Ray refuses to start a node whose ports overlap)."""
    def port() -> int:
        while True:
            p = free_port()
            if p not in avoid:
                return p
    return [arg for name in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
                             "--runtime-env-agent-port", "--node-manager-port", "--object-manager-port")
            for arg in (name, str(port()))]


def _own_processes(temp_dir: str) -> list:
    """The processes of the node rooted at `temp_dir` and all their descendants (Ray's agents rename their
    process title, so only the parent tree ties them to the node)."""
    found = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in (p.info["cmdline"] or [])):
                for q in [p, *p.children(recursive=True)]:
                    found[q.pid] = q
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return list(found.values())


@dataclass
class LocalCluster:
    address: str  # GCS address (HOST:PORT) for ray.init
    dashboard: str  # http://HOST:PORT for `ray job submit --address`
    env: Dict[str, str]  # environment for the `ray` CLI against this cluster (auth off, no RAY_ADDRESS)
    ray_bin: str
    temp_dirs: List[str] = field(default_factory=list)

    def stage_dirs(self) -> List[Path]:
        """Each node's local staging folder (CORESEG_STAGE_DIR of its processes): its stand-in local disk."""
        return [Path(d) / "stage" for d in self.temp_dirs]

    def node_ids(self) -> Dict[str, str]:
        """Ray node id -> the node's temp dir (read from each node's raylet command line)."""
        out = {}
        for d in self.temp_dirs:
            for p in _own_processes(d):
                try:
                    flags = [a for a in p.cmdline() if a.startswith("--node_id=")]
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                if flags:
                    out[flags[0].split("=", 1)[1]] = d
        return out

    def kill_node(self, temp_dir: str) -> List[int]:
        """SIGKILL every process of the node rooted at `temp_dir` (its raylet, agents and workers), as a host
        that loses power; returns their PIDs. Its temp dir stays for `stop` to remove."""
        procs = _own_processes(temp_dir)
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=30)
        return [p.pid for p in procs]

    def stop(self) -> None:
        """Terminate this cluster's processes by PID, then remove its temp dirs."""
        procs = [p for d in self.temp_dirs for p in _own_processes(d)]
        for p in procs:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=10)
        for p in alive:
            p.kill()
        for d in self.temp_dirs:
            shutil.rmtree(d, ignore_errors=True)


def _node_env(env: Dict[str, str], temp_dir: str) -> Dict[str, str]:
    """A node's environment: its own staging folder (common/storage.py), as a separate machine's local disk."""
    from coreseg.common.storage import STAGE_ENV

    return dict(env, **{STAGE_ENV: str(Path(temp_dir) / "stage")})


NODE_START_TRIES = 3  # a port picked free can be taken by another process before the node binds it


def _start_node(cluster: "LocalCluster", prefix: str, args_for, env: Dict[str, str], timeout_s: float) -> None:
    """`ray start` one node in a fresh temp dir; `args_for()` gives its arguments with freshly picked ports. A try
    that fails (a port taken meanwhile by another Ray on this machine) is stopped and retried with new ports; the
    last failure's output is in the error."""
    for attempt in range(1, NODE_START_TRIES + 1):
        node_dir = tempfile.mkdtemp(prefix=prefix)
        cluster.temp_dirs.append(node_dir)
        args = args_for()
        done = subprocess.run([cluster.ray_bin, "start", *args, "--temp-dir", node_dir],
                              env=_node_env(env, node_dir), capture_output=True, text=True, timeout=timeout_s)
        if done.returncode == 0:
            return
        cluster.kill_node(node_dir)
        if attempt == NODE_START_TRIES:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
            raise RuntimeError(f"`ray start` of a local node ({' '.join(args[:3])} ...) failed {attempt} times "
                               f"(exit {done.returncode}); its last output:\n{tail}")


def start_local_cluster(workers: int = 2, cpus_per_node: int = 2, timeout_s: float = 120) -> LocalCluster:
    """Head + `workers` worker nodes on 127.0.0.1; on failure, whatever started is stopped again."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    cluster = LocalCluster("", "", env, ray_bin)

    def head_args() -> List[str]:
        port, dash = free_port(), free_port()
        cluster.address, cluster.dashboard = f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}"
        return ["--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--dashboard-host", "127.0.0.1",
                "--dashboard-port", str(dash), "--include-dashboard", "true", "--num-cpus", str(cpus_per_node),
                "--disable-usage-stats", *_node_ports()]

    def worker_args() -> List[str]:
        low = min(free_port(), 64000)  # each node's worker processes in their own port range
        return ["--address", cluster.address, "--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus_per_node),
                "--disable-usage-stats", "--min-worker-port", str(low), "--max-worker-port", str(low + 999),
                *_node_ports(avoid=range(low, low + 1000))]

    try:
        _start_node(cluster, "/tmp/csh", head_args, env, timeout_s)
        for k in range(workers):
            _start_node(cluster, f"/tmp/csw{k}", worker_args, env, timeout_s)
    except BaseException:
        cluster.stop()
        raise
    return cluster
