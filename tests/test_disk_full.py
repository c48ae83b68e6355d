"""A full disk under a checkpoint save and under the metrics log: on a small real tmpfs where this process may
mount one (root on Linux), else with ENOSPC raised where the kernel would raise it. The error says "no space left"
and names the path; `latest` and the earlier checkpoint stay good; a torn metrics line is dropped on resume; a
save killed between its rename and `latest` is adopted, not redone; a resume without any checkpoint starts over."""
from __future__ import annotations

import errno
import json
import os
import pathlib
import subprocess

import pytest
import torch

from coreseg.deploy.checkpoints import LATEST, save_atomic
from coreseg.deploy.metrics_log import MetricsLogger, read_metrics

DISK_BYTES = 1 << 20


@pytest.fixture()
def small_disk(tmp_path):
    """(folder, real): a 1 MiB tmpfs mounted on `folder` when possible (real=True), else a plain folder."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = hasattr(os, "geteuid") and os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(folder)], capture_output=True).returncode == 0
    try:
        yield folder, mounted
    finally:
        if mounted:
            subprocess.run(["umount", "--lazy", str(folder)], check=True)  # a file a failed writer left open


def fill(folder) -> pathlib.Path:
    """Fills the file system of `folder` to the last byte; returns the filler file."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 512)
        except OSError as err:
            assert err.errno == errno.ENOSPC
    return filler


def test_a_checkpoint_save_on_a_full_disk_says_so_and_keeps_latest(small_disk, monkeypatch):
    folder, real = small_disk
    root = folder / "checkpoints"
    small = {"w": torch.arange(1000, dtype=torch.float32)}
    save_atomic(root, "grpo_000001", lambda d: torch.save(small, d / "state.pt"))
    big = {"w": torch.zeros(DISK_BYTES // 2)}  # 2 MiB of float32: does not fit in what is left

    def write_big(d):
        if not real:  # what torch's writer raises when the kernel says ENOSPC, and a disk that is full
            import shutil
            from collections import namedtuple
            monkeypatch.setattr(shutil, "disk_usage", lambda p: namedtuple("u", "total used free")(1, 1, 0))
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        torch.save(big, d / "state.pt")

    with pytest.raises(OSError, match=r"no space left on device while writing checkpoint .*grpo_000002") as err:
        save_atomic(root, "grpo_000002", write_big)
    assert str(root) in str(err.value)
    assert (root / LATEST).read_text() == "grpo_000001"
    assert sorted(p.name for p in root.iterdir()) == ["grpo_000001", LATEST]  # the partial save is gone
    back = torch.load(root / "grpo_000001" / "state.pt", weights_only=True)
    assert torch.equal(back["w"], small["w"])


def test_metrics_on_a_full_disk_name_the_file_and_resume_drops_the_torn_line(small_disk, monkeypatch):
    folder, real = small_disk
    log = MetricsLogger(folder / "run", tensorboard=False)
    log.log("grpo", 1, {"reward/total": 0.5})
    big = {"reward/total": 0.25, "batch_ids": "x" * 20000}  # longer than any page left: the write is cut
    if real:
        filler = fill(folder)
    else:
        original = pathlib.Path.open

        def open_full(path, mode="r", *args, **kwargs):  # writes a part of the line, then the disk is full
            f = original(path, mode, *args, **kwargs)
            if "a" in mode:
                def write(text, f=f):
                    f.buffer.write(text[:100].encode())
                    f.buffer.flush()
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                f.write = write
            return f

        monkeypatch.setattr(pathlib.Path, "open", open_full)
    with pytest.raises(OSError, match=r"no space left on device while appending a grpo record \(step 2\) to "
                                      r".*metrics\.jsonl"):
        log.log("grpo", 2, big)
    text = (folder / "run" / "metrics.jsonl").read_text()
    assert text.startswith(json.dumps({"phase": "grpo", "step": 1, "reward/total": 0.5}) + "\n")
    assert not text.endswith("\n")  # a torn line was left
    if real:
        filler.unlink()
    else:
        monkeypatch.undo()
    with pytest.warns(UserWarning, match="line 2 is a torn record"):
        log.truncate_after("grpo", 1)  # what a resume from step 1 does
    log.log("grpo", 2, big)
    assert [(r["step"], r["reward/total"]) for r in read_metrics(folder / "run")] == [(1, 0.5), (2, 0.25)]


def test_a_save_killed_between_its_rename_and_latest_is_adopted(tmp_path):
    save_atomic(tmp_path, "grpo_000002", lambda d: (d / "a").write_text("2"))
    (tmp_path / "grpo_000003").mkdir()  # renamed, complete; the kill came before `latest` was replaced
    (tmp_path / "grpo_000003" / "a").write_text("3")
    calls = []
    save_atomic(tmp_path, "grpo_000003", calls.append)
    assert calls == [] and (tmp_path / LATEST).read_text() == "grpo_000003"
    save_atomic(tmp_path, "grpo_000002", calls.append)  # an older step found saved does not move `latest` back
    assert calls == [] and (tmp_path / LATEST).read_text() == "grpo_000003"


def test_a_resume_without_a_complete_checkpoint_starts_over(tmp_path, capsys):
    from types import SimpleNamespace

    from coreseg.deploy.recovery import resume
    from coreseg.deploy.run_folder import RunFolder

    log = MetricsLogger(tmp_path, tensorboard=False)
    for step in (0, 1, 2):
        log.log("grpo", step, {"reward/total": 0.1 * step})
    (tmp_path / "checkpoints" / "grpo_000003_sft_000000.tmp").mkdir(parents=True)  # the only save, cut by a kill

    def restore():
        raise AssertionError("nothing to restore")

    resume(SimpleNamespace(run=RunFolder(str(tmp_path)), run_dir=tmp_path, logger=log, restore=restore))
    assert "starts over from step 0" in capsys.readouterr().out
    assert read_metrics(tmp_path) == []
