"""Experiment trackers (`run.trackers`): Weights & Biases and MLflow, each behind the same four calls that
MetricsLogger fans out to: scalars (`phase/key`, as in TensorBoard), text (sampled completions), images (eval
masks) and close. The flattened config goes to each at start. Optional: `pip install 'coreseg[tracking]'`."""
from __future__ import annotations

import html
import math
import os
import re
import time
from pathlib import Path
from typing import Dict, List

INSTALL = "pip install 'coreseg[tracking]'"


class TrackerStartError(RuntimeError):
    """A tracker named in run.trackers is not installed, or could not start its run (bad URI, bad project)."""


def _require(module: str, tracker: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise TrackerStartError(f"config key 'run.trackers' lists '{tracker}' but its package is not installed "
                                f"({err}): {INSTALL}") from None


def scalar_items(phase: str, values: Dict[str, object]) -> Dict[str, float]:
    """The values a record sends to TensorBoard, under the same `phase/key` names: finite numbers only."""
    return {f"{phase}/{k}": float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and math.isfinite(v)}


class WandbTracker:
    """One W&B run. Each prefix of a key (`grpo`, `sft`, `eval`, `eval_masks`, ...) gets its own x-axis,
    `<prefix>_step`, since the phases count steps separately (W&B's own step must only grow). Mode, entity and
    key come from wandb's environment (WANDB_MODE=offline, WANDB_API_KEY, ...); its files go to WANDB_DIR, else
    the run folder."""

    name = "wandb"

    def __init__(self, project: str, run_name: str, run_dir: Path, hparams: Dict[str, object]):
        wandb = _require("wandb", self.name)
        self._wandb = wandb
        self._axes: set = set()
        self.run = wandb.init(project=project, name=run_name, config=hparams, reinit="create_new",
                              dir=None if os.environ.get("WANDB_DIR") else str(run_dir))

    def _log(self, items: Dict[str, object], step: int) -> None:
        by_prefix: Dict[str, Dict[str, object]] = {}
        for key, value in items.items():
            by_prefix.setdefault(key.split("/", 1)[0], {})[key] = value
        for prefix, row in by_prefix.items():
            axis = f"{prefix}_step"
            if prefix not in self._axes:
                self.run.define_metric(axis)
                self.run.define_metric(f"{prefix}/*", step_metric=axis)
                self._axes.add(prefix)
            self.run.log({axis: int(step), **row})

    def scalars(self, step: int, values: Dict[str, float]) -> None:
        self._log(values, step)

    def text(self, tag: str, text: str, step: int) -> None:
        self._log({tag: self._wandb.Html(f"<pre>{html.escape(text)}</pre>", inject=False,
                                                   data_is_not_path=True)}, step)

    def image(self, tag: str, image, step: int) -> None:
        self._log({tag: self._wandb.Image(image)}, step)

    def close(self) -> None:
        self.run.finish()


# MLflow's rules for param and metric names (mlflow.utils.validation): these characters only, at most 250 long
_MLFLOW_KEY_BAD = re.compile(r"[^/\w.\- :]")
_MLFLOW_BATCH = 100  # params per log_batch call (MLflow's limit; metrics allow 1000)


def mlflow_key(key: str) -> str:
    return _MLFLOW_KEY_BAD.sub("_", key)[:250]


class MlflowTracker:
    """One MLflow run in experiment `project`, through MlflowClient (no process-wide active run). Text and
    images are artifacts: `<tag>/step_<step>.md` and `.png`. Params longer than MLflow's limit are cut to it."""

    name = "mlflow"

    def __init__(self, project: str, run_name: str, tracking_uri: str, hparams: Dict[str, object]):
        _require("mlflow", self.name)
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        self.client = MlflowClient(tracking_uri=tracking_uri or None)
        experiment = self.client.get_experiment_by_name(project)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(project)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        params = [Param(mlflow_key(k), str(v)[:MAX_PARAM_VAL_LENGTH]) for k, v in hparams.items()]
        for i in range(0, len(params), _MLFLOW_BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + _MLFLOW_BATCH])

    def scalars(self, step: int, values: Dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(mlflow_key(k), v, now, int(step))
                                                    for k, v in values.items()])

    def text(self, tag: str, text: str, step: int) -> None:
        self.client.log_text(self.run_id, text, f"{tag}/step_{int(step):06d}.md")

    def image(self, tag: str, image, step: int) -> None:
        self.client.log_image(self.run_id, image, artifact_file=f"{tag}/step_{int(step):06d}.png")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def start_trackers(run_cfg, run_dir: Path, default_name: str, hparams: Dict[str, object]) -> List[object]:
    """The trackers `run_cfg.trackers` names, each with its run started. A tracker that cannot start is an error
    (TrackerStartError naming it); the ones started before it are closed first."""
    run_name = run_cfg.tracker_run_name or default_name
    started: List[object] = []
    for name in run_cfg.trackers:
        try:
            if name == "wandb":
                started.append(WandbTracker(run_cfg.tracker_project, run_name, run_dir, hparams))
            elif name == "mlflow":
                started.append(MlflowTracker(run_cfg.tracker_project, run_name, run_cfg.mlflow_tracking_uri,
                                             hparams))
            else:
                raise TrackerStartError(f"config key 'run.trackers': unknown tracker {name!r}")
        except Exception as err:
            for tracker in started:
                tracker.close()
            if isinstance(err, TrackerStartError):
                raise
            uri = run_cfg.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "MLflow's default"
            where = f", tracking URI {uri}" if name == "mlflow" else ""
            raise TrackerStartError(f"run.trackers: {name} could not start its run (project "
                                    f"{run_cfg.tracker_project!r}, run {run_name!r}{where}): "
                                    f"{type(err).__name__}: {err}") from err
    return started
