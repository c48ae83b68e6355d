"""Run logging: metrics.jsonl (one JSON object per record) + TensorBoard scalars."""
from __future__ import annotations

import errno
import json
import math
import warnings
from pathlib import Path
from typing import Dict, List

from deploy.checkpoints import write_text_atomic


class MetricsLogger:
    def __init__(self, run_dir: str | Path, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(Path(run_dir) / "tb"))
            except ImportError:  # tensorboard is a declared dependency; keep logging if it is absent
                self._tb = None

    def log(self, phase: str, step: int, values: Dict[str, float]) -> None:
        record = {"phase": phase, "step": int(step)}
        record.update({k: _clean(v) for k, v in values.items()})
        try:
            # one write of a whole line; a torn tail (full disk, kill) is dropped on read
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise OSError(errno.ENOSPC, f"no space left on device while appending a {phase} record (step "
                                            f"{step}) to {self.path}; a torn last line is dropped on --resume",
                              str(self.path)) from err
            raise
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"{phase}/{key}", value, step)
            self._tb.flush()

    def truncate_after(self, phase: str, step: int) -> None:
        """On resume: drop records of `phase` beyond the checkpointed step (they will be redone)."""
        if not self.path.exists():
            return
        kept = [r for r in read_metrics(self.path) if not (r["phase"] == phase and r["step"] > step)]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def clear(self) -> None:
        """On a resume that starts over (no complete checkpoint): every record goes, as every step is redone."""
        if self.path.exists():
            write_text_atomic(self.path, "")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    return value


def read_metrics(path: str | Path) -> List[dict]:
    """The records of a metrics.jsonl (or of a run folder's). A torn last line (a write cut by a kill or a full
    disk) is dropped with a warning; a bad line anywhere else is an error naming the file and line."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):
                warnings.warn(f"{path}: line {number} is a torn record ({err.msg}); dropped")
                continue
            raise ValueError(f"{path}: line {number} is not a JSON record: {err.msg}") from None
    return records
