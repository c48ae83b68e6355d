"""Adapter folders (the one weight-push path with files): where they go and the sweep of dead processes' folders."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from coreseg.rollout.lora_io import adapter_parent, new_adapter_folder, sweep_stale_adapter_folders


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_sweep_removes_only_folders_of_dead_processes(tmp_path):
    mine = new_adapter_folder(tmp_path, 3)
    assert mine.name.startswith(f"coreseg-lora-{os.getpid()}-v3-")
    dead = tmp_path / f"coreseg-lora-{_dead_pid()}-v1-abc"
    dead.mkdir()
    (dead / "adapter_model.safetensors").write_bytes(b"x" * 10)
    other = tmp_path / "coreseg-lora-notapid"  # not ours by name: kept
    other.mkdir()
    assert sweep_stale_adapter_folders([tmp_path]) == [dead]
    assert not dead.exists() and mine.exists() and other.exists()


def test_adapter_parent_needs_room_for_two_versions(tmp_path):
    import shutil

    free = shutil.disk_usage(tmp_path).free
    assert adapter_parent(1024, [tmp_path]) == tmp_path
    with pytest.raises(OSError, match="no room"):
        adapter_parent(free // 2 + 1, [tmp_path])
