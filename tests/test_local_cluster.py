"""deploy/local_cluster.py's node start: a `ray start` that fails (a port taken meanwhile) is retried with fresh
ports in a fresh temp dir; the last failure's output is in the error. `subprocess.run` is replaced, no Ray runs."""
import subprocess
from pathlib import Path

import pytest

from coreseg.deploy import local_cluster
from coreseg.deploy.local_cluster import NODE_START_TRIES, LocalCluster, _start_node


def _fake_run(results, calls):
    def run(cmd, **kw):
        calls.append(cmd)
        code, out = results.pop(0)
        return subprocess.CompletedProcess(cmd, code, stdout=out, stderr="")
    return run


def test_a_failed_node_start_is_retried_with_fresh_ports(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(local_cluster.subprocess, "run", _fake_run([(1, "port taken"), (0, "started")], calls))
    ports = iter(["1111", "2222"])
    cluster = LocalCluster("", "", {}, "ray")
    _start_node(cluster, str(tmp_path / "n"), lambda: ["--port", next(ports)], {}, 5)
    assert [c[c.index("--port") + 1] for c in calls] == ["1111", "2222"]
    dirs = [c[c.index("--temp-dir") + 1] for c in calls]
    assert dirs == cluster.temp_dirs and len(set(dirs)) == 2 and all(Path(d).is_dir() for d in dirs)


def test_the_last_failure_output_is_in_the_error(monkeypatch, tmp_path):
    calls = []
    results = [(1, f"try {k}: address already in use") for k in range(1, NODE_START_TRIES + 1)]
    monkeypatch.setattr(local_cluster.subprocess, "run", _fake_run(results, calls))
    cluster = LocalCluster("", "", {}, "ray")
    with pytest.raises(RuntimeError, match=rf"(?s)failed {NODE_START_TRIES} times \(exit 1\).*try {NODE_START_TRIES}: "
                                           r"address already in use"):
        _start_node(cluster, str(tmp_path / "n"), lambda: ["--port", "1"], {}, 5)
    assert len(calls) == NODE_START_TRIES == len(cluster.temp_dirs)
