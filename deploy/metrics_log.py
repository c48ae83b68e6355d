"""Run logging: metrics.jsonl (one JSON object per record) + TensorBoard scalars, text (sampled completions),
images (predicted masks at eval) and the run's hyperparameters; the same go to the experiment trackers that
`run.trackers` names (deploy/trackers.py)."""
from __future__ import annotations

import errno
import json
import math
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional

from coreseg.deploy.checkpoints import write_text_atomic
from coreseg.deploy.trackers import scalar_items, start_trackers

ROLLOUTS = "rollouts.jsonl"  # run.dump_rollouts: sampled completions with their rewards, one JSON object per line


class MetricsLogger:
    def __init__(self, run_dir: str | Path, tensorboard: bool = True, config=None,
                 on_write: Optional[Callable[[], None]] = None, run_name: Optional[str] = None):
        """config: the run's TrainConfig; its flattened keys go to TensorBoard's HParams tab and, with its
        run.trackers, to each tracker, whose runs start here (an error if one cannot). run_name: the trackers'
        default run name (run.tracker_run_name overrides it); default the folder's name.
        on_write: called after every write (a URI run folder uploads its working copy)."""
        self.path = Path(run_dir) / "metrics.jsonl"
        self._on_write = on_write or (lambda: None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        hparams = flat_hparams(config) if config is not None else {}
        self.trackers = [] if config is None else start_trackers(config.run, self.path.parent,
                                                                  run_name or self.path.parent.name, hparams)
        self.tracker_failures: Dict[str, int] = {}  # tracker name -> calls that raised (see _to_trackers)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(Path(run_dir) / "tb"))
            except ImportError:  # tensorboard is a declared dependency; keep logging if it is absent
                self._tb = None
        if config is not None and self._tb is not None:
            self._hparams(hparams)

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
        scalars = scalar_items(phase, values)  # the finite numbers, under TensorBoard's `phase/key` names
        if self._tb is not None:
            for tag, value in scalars.items():
                self._tb.add_scalar(tag, value, step)
            self._tb.flush()
        self._on_write()
        if scalars:
            self._to_trackers("scalars", step, scalars)

    def text(self, tag: str, text: str, step: int) -> None:
        if self._tb is not None:
            self._tb.add_text(tag, text, step)
            self._tb.flush()
            self._on_write()
        self._to_trackers("text", tag, text, step)

    def image(self, tag: str, image, step: int) -> None:
        """image: HxWx3 uint8."""
        if self._tb is not None:
            self._tb.add_image(tag, image, step, dataformats="HWC")
            self._tb.flush()
            self._on_write()
        self._to_trackers("image", tag, image, step)

    def _to_trackers(self, call: str, *args) -> None:
        """One call on every tracker. A tracker that raises mid-run (network, server, a run deleted under it) does
        not stop the run: metrics.jsonl and TensorBoard have every record; its first failure is a warning, every
        one is counted in tracker_failures and the count is printed at close."""
        for tracker in self.trackers:
            try:
                getattr(tracker, call)(*args)
            except Exception as err:
                count = self.tracker_failures[tracker.name] = self.tracker_failures.get(tracker.name, 0) + 1
                if count == 1:
                    warnings.warn(f"run.trackers: {tracker.name} failed in {call} ({type(err).__name__}: {err}); the "
                                  f"run goes on (metrics.jsonl and TensorBoard keep every record), further "
                                  f"{tracker.name} failures are counted and reported at the end", RuntimeWarning)

    def _hparams(self, values: Dict[str, object]) -> None:
        """Writes the HParams summary into this run's own event file (SummaryWriter.add_hparams would open a
        second run folder), with the eval metrics as the tab's metric columns."""
        from torch.utils.tensorboard.summary import hparams

        metrics = {f"eval/{split}/{m}": 0.0 for split in ("val", "test_id", "test_ood")
                   for m in ("mDice", "failure_rate")}
        for summary in hparams(values, metrics):
            self._tb.file_writer.add_summary(summary)

    def truncate_after(self, phase: str, step: int) -> None:
        """On resume: drop records of `phase` beyond the checkpointed step (they will be redone), and for GRPO the
        dumped rollouts of those steps (rollouts.jsonl)."""
        dump = self.path.parent / ROLLOUTS
        if phase == "grpo" and dump.exists():
            rows = [json.loads(line) for line in dump.read_text().splitlines() if line.strip()]
            write_text_atomic(dump, "".join(json.dumps(r) + "\n" for r in rows if r["step"] <= step))
        if not self.path.exists():
            return
        kept = [r for r in read_metrics(self.path) if not (r["phase"] == phase and r["step"] > step)]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._on_write()

    def clear(self) -> None:
        """On a resume that starts over (no complete checkpoint): every record goes, as every step is redone."""
        if self.path.exists():
            write_text_atomic(self.path, "")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        self._to_trackers("close")
        self.trackers = []
        for name, count in self.tracker_failures.items():
            print(f"[coreseg] run.trackers: {count} {name} call(s) failed; {self.path} has every record")


def flat_hparams(config) -> Dict[str, object]:
    """A config dataclass tree as dotted keys -> int/float/str/bool (lists and dicts as text)."""
    from dataclasses import asdict

    out: Dict[str, object] = {}

    def walk(prefix: str, node) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict) and prefix == "":
                walk(name + ".", value)
            elif isinstance(value, (bool, int, float, str)):
                out[name] = value
            else:
                out[name] = json.dumps(value)
    walk("", asdict(config))
    return out


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
