"""Run checkpoints that a crash or a full disk cannot corrupt: a checkpoint is written into `NAME.tmp`, flushed,
then renamed to NAME; `latest` is replaced atomically only after; a step already saved is not saved again;
only the newest `keep` are kept."""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Callable, List

LATEST = "latest"
TMP_SUFFIX = ".tmp"
LOW_SPACE_BYTES = 64 * 1024 * 1024


def write_text_atomic(path: Path, text: str) -> None:
    """`path` holds either its old content or `text`, never a part (write a sibling, fsync, rename)."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sync_tree(folder: Path) -> None:
    for file in folder.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())


def _no_space(err: BaseException) -> bool:
    """Whether an OSError with errno ENOSPC is in the chain of `err` (torch's writer reports a full disk as
    "basic_ios::clear: iostream error", so the free space is checked too)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        err = err.__cause__ or err.__context__
    return False


def complete_checkpoints(root: Path) -> List[Path]:
    """Finished checkpoints (renamed from their .tmp folder), oldest first by name (names sort by step)."""
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.endswith(TMP_SUFFIX))


def save_atomic(root: Path, name: str, write: Callable[[Path], None], keep: int = 0) -> Path:
    """`write(folder)` fills a new checkpoint `root/name`; returns its path. Skipped when `root/name` exists (that
    step is saved; `latest` is moved to it if it named an older one). A failure leaves `latest` and earlier
    checkpoints as they were; a full disk is reported as such, naming the folder. keep > 0: afterwards only the
    newest `keep` checkpoints remain."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    if final.exists():
        latest = root / LATEST
        current = latest.read_text().strip() if latest.exists() else ""
        if name > current:  # a save killed between its rename and `latest`: the folder is complete
            write_text_atomic(latest, name)
        return final
    tmp = root / (name + TMP_SUFFIX)
    shutil.rmtree(tmp, ignore_errors=True)  # a save killed earlier
    tmp.mkdir()
    try:
        write(tmp)
        _sync_tree(tmp)
    except BaseException as err:
        free = shutil.disk_usage(root).free  # before the partial checkpoint is removed and frees its space
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, Exception) and (free < LOW_SPACE_BYTES or _no_space(err)):
            raise OSError(f"no space left on device while writing checkpoint {final} ({free} bytes free on "
                          f"{root}); the previous checkpoints and `latest` are intact") from err
        raise
    os.replace(tmp, final)
    write_text_atomic(root / LATEST, name)
    if keep > 0:
        for old in complete_checkpoints(root)[:-keep]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final
