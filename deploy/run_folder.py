"""The run folder: a local path on storage every node sees, or a URI (`file://`, `s3://`, ... through pyarrow.fs).

It holds config.yaml, metrics.jsonl, tb/, placement.json, eval/, report.md, the published policy (policy/) and
checkpoints/. For a URI, the files the driver appends to live in a working copy in this node's staging folder
(`local`) and are uploaded after each write (`publish`); checkpoints are written by their writers (each learner
rank its own part, the driver driver.json) into `checkpoints/NAME.tmp`, which becomes NAME when complete, and
`latest` is replaced last. A local run folder uses deploy/checkpoints.py (rename + fsync) unchanged.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, List, Optional, Tuple

from coreseg.common import storage
from coreseg.common.config import ConfigError, absolute_path
from coreseg.deploy.checkpoints import LATEST, TMP_SUFFIX, save_atomic

CHECKPOINTS = "checkpoints"
# not mirrored into the working copy of a URI run folder: large, and read from where they are
NOT_MIRRORED = (CHECKPOINTS, "policy")


class RunFolder:
    def __init__(self, location: str | Path):
        location = str(location)
        self.remote = storage.is_uri(location)
        self.location = location.rstrip("/") if self.remote else str(Path(location).expanduser().resolve())
        if self.remote:
            digest = hashlib.sha1(self.location.encode()).hexdigest()[:12]
            self.local = storage.stage_dir() / "runs" / f"{Path(self.location).name}-{digest}"
            self.local.mkdir(parents=True, exist_ok=True)
            for name in storage.list_dir(self.location):  # an existing run (resume, eval): its records
                if name not in NOT_MIRRORED and not name.endswith(TMP_SUFFIX):
                    src = storage.join(self.location, name)
                    (storage.copy_dir if storage.kind(src) == "dir" else storage.copy_file)(src, self.local / name)
        else:
            self.local = Path(self.location)
            self.local.mkdir(parents=True, exist_ok=True)

    def __str__(self) -> str:
        return self.location

    def join(self, *parts: str) -> str:
        return storage.join(self.location, *parts)

    def publish(self, *names: str) -> None:
        """URI run folder: uploads these files or folders of the working copy (no-op for a local folder)."""
        if not self.remote:
            return
        for name in names:
            src = self.local / name
            if src.is_dir():
                storage.copy_dir(src, self.join(name))
            elif src.exists():
                storage.copy_file(src, self.join(name))

    # ---- checkpoints ---------------------------------------------------------------------------
    def latest_checkpoint(self) -> Optional[str]:
        """The location of the newest complete checkpoint, or None."""
        latest = self.join(CHECKPOINTS, LATEST)
        if not storage.exists(latest):
            return None
        return self.join(CHECKPOINTS, storage.read_text(latest).strip())

    def save_checkpoint(self, name: str, write: Callable[[str], None], keep: int = 0) -> str:
        """`write(location)` fills checkpoint NAME (a folder path or URI); returns its location."""
        if not self.remote:
            return str(save_atomic(self.local / CHECKPOINTS, name, lambda folder: write(str(folder)), keep=keep))
        root = self.join(CHECKPOINTS)
        final = storage.join(root, name)
        if storage.exists(final):
            return final  # that step is saved
        tmp = final + TMP_SUFFIX
        storage.delete_dir(tmp)  # a save killed earlier
        try:
            write(tmp)
        except BaseException:
            storage.delete_dir(tmp)
            raise
        storage.move_dir(tmp, final)
        storage.write_text(storage.join(root, LATEST), name)
        if keep > 0:
            for old in complete_checkpoints(root)[:-keep]:
                if old != name:
                    storage.delete_dir(storage.join(root, old))
        return final


def record_placement(run: RunFolder, pools: dict) -> None:
    """`placement.json` in the run folder: the Ray node of every actor, per role and index."""
    nodes = {role: pool.pool.call_all("node_id") for role, pool in pools.items() if pool is not None}
    (run.local / "placement.json").write_text(json.dumps(nodes, indent=1))
    run.publish("placement.json")
    print(f"[coreseg] actors on {len({n for ids in nodes.values() for n in ids})} node(s): see placement.json")


def _run_location(cfg, given: str | None) -> str:
    """An absolute path or a URI: `given` (--run-dir) or run.output_dir/run.name."""
    if given:
        return absolute_path(given, Path.cwd())
    return storage.join(cfg.run.output_dir, cfg.run.name)


def fresh_run_dir(cfg, given: str | None) -> str:
    """The folder (path or URI) of a new run. A new run never appends to an old one (its metrics and report
    would mix): if the folder already holds a run, the next free `NAME-2`, `NAME-3`, ... is used and the old run
    is kept."""
    base = _run_location(cfg, given)
    if not storage.exists(storage.join(base, "metrics.jsonl")):
        return base
    n = 2
    while storage.exists(storage.join(f"{base}-{n}", "metrics.jsonl")):
        n += 1
    out = f"{base}-{n}"
    print(f"[coreseg] {base} already holds a run; this run goes to {out} (continue the old one with --resume {base})")
    return out


def saved_config(run_dir: str) -> Path:
    """A run's config.yaml on local disk (a URI run folder's is downloaded to the staging folder)."""
    location = storage.join(run_dir, "config.yaml")
    if not storage.exists(location):
        raise ConfigError(f"{location} does not exist: {run_dir} is not a run folder")
    if not storage.is_uri(location):
        return Path(location)
    local = storage.stage_dir() / f"config-{os.getpid()}.yaml"
    local.write_text(storage.read_text(location))
    return local


def local_run_copy(location: str, checkpoint: Optional[str] = None) -> Tuple[str, Optional[str]]:
    """(run folder, checkpoint) for commands that read a run from local disk (predict, export): a local folder as
    it is; for a URI, its records and the one checkpoint needed (`checkpoint`: a name or URI under checkpoints/,
    default the latest) downloaded to this node's staging folder, with checkpoints/latest naming it."""
    if not storage.is_uri(location):
        return location, checkpoint
    run = RunFolder(location)
    if checkpoint:
        name = checkpoint.rstrip("/").rsplit("/", 1)[-1]
    else:
        latest = run.latest_checkpoint()
        if latest is None:
            raise ConfigError(f"{location}: no checkpoints/latest (the run saved no checkpoint)")
        name = latest.rsplit("/", 1)[-1]
    local = run.local / CHECKPOINTS
    if not (local / name).exists():
        storage.copy_dir(run.join(CHECKPOINTS, name), local / (name + TMP_SUFFIX))
        (local / (name + TMP_SUFFIX)).rename(local / name)
    (local / LATEST).write_text(name)
    return str(run.local), name


def complete_checkpoints(root: str) -> List[str]:
    """Names of the finished checkpoints under a checkpoints folder (path or URI), oldest first."""
    return [n for n in storage.list_dir(root) if n != LATEST and not n.endswith(TMP_SUFFIX)
            and storage.kind(storage.join(root, n)) == "dir"]


def write_driver_state(location: str, state: dict) -> None:
    storage.write_text(storage.join(location, "driver.json"), json.dumps(state, indent=1))


def read_driver_state(location: str) -> dict:
    return json.loads(storage.read_text(storage.join(location, "driver.json")))
