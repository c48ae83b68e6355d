"""Atomic run checkpoints (deploy/checkpoints.py) without Ray: a failed or killed save never leaves a half
checkpoint behind `latest`; a step is saved once; old checkpoints are pruned; a full disk says so."""
from __future__ import annotations

import pytest

from coreseg.deploy.checkpoints import LATEST, complete_checkpoints, save_atomic


def writer(calls, fail_after=None):
    def write(folder):
        calls.append(folder.name)
        (folder / "a.bin").write_bytes(b"x" * 10)
        if fail_after is not None:
            raise fail_after
        (folder / "driver.json").write_text("{}")
    return write


def test_a_failed_save_leaves_latest_and_earlier_checkpoints_intact(tmp_path):
    calls = []
    first = save_atomic(tmp_path, "grpo_000002", writer(calls))
    assert (tmp_path / LATEST).read_text() == "grpo_000002" and (first / "driver.json").exists()
    with pytest.raises(RuntimeError, match="killed"):
        save_atomic(tmp_path, "grpo_000004", writer(calls, RuntimeError("killed mid-save")))
    assert (tmp_path / LATEST).read_text() == "grpo_000002"
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["grpo_000002"]
    assert not (tmp_path / "grpo_000004").exists() and not (tmp_path / "grpo_000004.tmp").exists()
    again = save_atomic(tmp_path, "grpo_000004", writer(calls))  # the retry succeeds
    assert (tmp_path / LATEST).read_text() == "grpo_000004" and (again / "driver.json").exists()


def test_a_step_already_saved_is_not_saved_again(tmp_path):
    calls = []
    save_atomic(tmp_path, "grpo_000005", writer(calls))
    save_atomic(tmp_path, "grpo_000005", writer(calls))
    assert calls == ["grpo_000005.tmp"]


def test_a_leftover_tmp_folder_from_a_killed_save_is_replaced(tmp_path):
    (tmp_path / "grpo_000001.tmp").mkdir(parents=True)
    (tmp_path / "grpo_000001.tmp" / "torn.bin").write_bytes(b"\0" * 3)
    path = save_atomic(tmp_path, "grpo_000001", writer([]))
    assert sorted(p.name for p in path.iterdir()) == ["a.bin", "driver.json"]


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    for step in range(1, 6):
        save_atomic(tmp_path, f"grpo_{step:06d}", writer([]), keep=2)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["grpo_000004", "grpo_000005"]
    assert (tmp_path / LATEST).read_text() == "grpo_000005"


def test_a_full_disk_is_reported_as_such_naming_the_checkpoint(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 ** 9, 10 ** 9 - 1000, 1000))
    with pytest.raises(OSError, match=r"no space left on device while writing checkpoint .*grpo_000003"):
        save_atomic(tmp_path, "grpo_000003", writer([], RuntimeError("basic_ios::clear: iostream error")))
    assert not (tmp_path / LATEST).exists()
