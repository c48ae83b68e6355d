"""run.trackers: W&B (offline, its run file read back record by record) and MLflow (a sqlite store in tmp_path,
read back through MlflowClient) get the scalars, text, images and config MetricsLogger writes; bad names, a
missing package and a tracker that cannot start are clear errors; a tracker failing mid-run does not stop the run."""
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from coreseg.common.config import ConfigError, load_config
from coreseg.deploy.metrics_log import MetricsLogger, flat_hparams, read_metrics
from coreseg.deploy.trackers import TrackerStartError, mlflow_key

TEXT = "**s1#0** reward 0.500\n\n    <think>a & b</think>"
MASK = np.arange(6 * 5 * 3, dtype=np.uint8).reshape(6, 5, 3)  # a distinct value per pixel channel


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """W&B offline, quiet, its caches and settings in tmp_path; files in the run folder (no WANDB_DIR)."""
    home = tmp_path / "wandb-home"
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                       "WANDB_DISABLE_GIT": "true", "WANDB_DISABLE_CODE": "true", "WANDB__DISABLE_STATS": "true",
                       "WANDB__DISABLE_META": "true", "WANDB_CACHE_DIR": str(home / "cache"),
                       "WANDB_CONFIG_DIR": str(home / "config"), "WANDB_DATA_DIR": str(home / "data")}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("WANDB_DIR", raising=False)


def wandb_records(run_dir: Path) -> list:
    """The records of the run's offline file (run-<id>.wandb): W&B's header, then LevelDB-log framing (32 KiB
    blocks of [crc32, length u16, type u8] + payload; type 1 whole, 2..4 first/middle/last piece), each payload
    one wandb_internal Record. W&B's service writes the file after run.finish() returns: its teardown waits."""
    import wandb
    from wandb.proto import wandb_internal_pb2

    wandb.teardown()
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, payload, out = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        payload += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            out.append(record)
            payload = b""
    return out


def wandb_history(records) -> list:
    """Each logged row as {key: value}, values decoded from JSON (W&B's own _step/_runtime/_timestamp left out)."""
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item
                         if not (i.key or i.nested_key[0]).startswith("_")})
    return rows


def _log_a_run(logger: MetricsLogger) -> None:
    logger.log("grpo", 1, {"reward/total": 0.25, "batch_ids": "a,b", "policy/entropy": float("nan")})
    logger.log("grpo", 2, {"reward/total": 0.75, "update": 3})
    logger.log("sft", 3, {"loss": 1.5})
    logger.text("grpo/rollouts", TEXT, 2)
    logger.image("eval_masks/val/s1", MASK, 2)


def test_wandb_offline_run_holds_the_scalars_text_image_and_config(tmp_path, wandb_offline):
    import html

    cfg = load_config("tiny_cpu", ["run.trackers=[wandb]", "run.tracker_project=coreseg-tests"])
    run_dir = tmp_path / "run-a"
    logger = MetricsLogger(run_dir, tensorboard=False, config=cfg)
    _log_a_run(logger)
    logger.close()
    records = wandb_records(run_dir)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.project, run.display_name) == ("coreseg-tests", "run-a")  # default name: the run folder's
    config = {u.key: json.loads(u.value_json) for u in run.config.update if u.key != "_wandb"}
    assert config == flat_hparams(cfg)
    rows = wandb_history(records)
    # each phase on its own x-axis; text-only values (batch_ids) and NaN stay out, as in TensorBoard
    assert rows[:3] == [{"grpo_step": 1, "grpo/reward/total": 0.25},
                        {"grpo_step": 2, "grpo/reward/total": 0.75, "grpo/update": 3.0},
                        {"sft_step": 3, "sft/loss": 1.5}]
    files = next(run_dir.glob("wandb/offline-run-*/files"))
    text_row, image_row = rows[3], rows[4]
    assert text_row["grpo_step"] == 2 and text_row["grpo/rollouts/_type"] == "html-file"
    assert (files / text_row["grpo/rollouts/path"]).read_text() == f"<pre>{html.escape(TEXT)}</pre>"
    assert image_row["eval_masks_step"] == 2 and image_row["eval_masks/val/s1/_type"] == "image-file"
    np.testing.assert_array_equal(np.asarray(Image.open(files / image_row["eval_masks/val/s1/path"])), MASK)
    assert records[-1].WhichOneof("record_type") == "exit"  # close() finished the run
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]


def test_mlflow_sqlite_run_holds_the_metrics_params_and_artifacts(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    monkeypatch.chdir(tmp_path)  # the sqlite store's default artifact root is ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # run.mlflow_tracking_uri "" -> MLflow's own lookup
    long_prompt = "x" * (MAX_PARAM_VAL_LENGTH + 10)
    cfg = load_config("tiny_cpu", ["run.trackers=[mlflow]", "run.tracker_project=coreseg-tests",
                                   "run.tracker_run_name=named", f"model.system_prompt={long_prompt}"])
    logger = MetricsLogger(tmp_path / "run-b", tensorboard=False, config=cfg)
    _log_a_run(logger)
    logger.close()

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("coreseg-tests").experiment_id])
    assert (run.info.run_name, run.info.status) == ("named", "FINISHED")
    history = {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
               for key in ("grpo/reward/total", "grpo/update", "sft/loss")}
    assert history == {"grpo/reward/total": [(1, 0.25), (2, 0.75)], "grpo/update": [(2, 3.0)], "sft/loss": [(3, 1.5)]}
    assert set(run.data.metrics) == set(history)  # batch_ids (text) and the NaN entropy are not sent
    expected = {k: str(v)[:MAX_PARAM_VAL_LENGTH] for k, v in flat_hparams(cfg).items()}
    assert run.data.params == expected and run.data.params["model.system_prompt"] == "x" * MAX_PARAM_VAL_LENGTH
    text = Path(client.download_artifacts(run.info.run_id, "grpo/rollouts/step_000002.md", str(tmp_path)))
    assert text.read_text() == TEXT
    png = client.download_artifacts(run.info.run_id, "eval_masks/val/s1/step_000002.png", str(tmp_path))
    np.testing.assert_array_equal(np.asarray(Image.open(png)), MASK)


def test_mlflow_key_keeps_allowed_characters_and_replaces_the_rest():
    assert mlflow_key("eval/val/mDice") == "eval/val/mDice"
    assert mlflow_key("reward/iou[0.5]@x") == "reward/iou_0.5__x"
    assert len(mlflow_key("k" * 300)) == 250


@pytest.mark.parametrize("trackers, why", [("[wandb,neptune]", "unknown: ['neptune']"), ("[mlflow,mlflow]", "once")])
def test_unknown_or_repeated_tracker_names_are_config_errors(trackers, why):
    with pytest.raises(ConfigError, match=r"'run\.trackers'.*must be one of \('wandb', 'mlflow'\)") as err:
        load_config("tiny_cpu", [f"run.trackers={trackers}"])
    assert why in str(err.value)


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_a_tracker_not_installed_names_the_install_command(tracker, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, tracker, None)  # `import <tracker>` raises ImportError, as when absent
    cfg = load_config("tiny_cpu", [f"run.trackers=[{tracker}]"])
    with pytest.raises(TrackerStartError, match=rf"lists '{tracker}' but its package is not installed.*"
                                                r"pip install 'coreseg\[tracking\]'"):
        MetricsLogger(tmp_path, tensorboard=False, config=cfg)


def test_a_tracker_that_cannot_start_is_an_error(tmp_path, wandb_offline):
    cfg = load_config("tiny_cpu", ["run.trackers=[wandb]", "run.tracker_project=no/slash?"])
    with pytest.raises(TrackerStartError, match=r"wandb could not start its run \(project 'no/slash\?', run 'run-c'\): "
                                                r"UsageError: Invalid project name"):
        MetricsLogger(tmp_path / "run-c", tensorboard=False, config=cfg)


def test_a_tracker_that_cannot_start_finishes_the_ones_started_before_it(tmp_path, wandb_offline):
    cfg = load_config("tiny_cpu", ["run.trackers=[wandb,mlflow]", "run.mlflow_tracking_uri=nosuchscheme://here"])
    with pytest.raises(TrackerStartError, match=r"mlflow could not start its run .*tracking URI nosuchscheme://here"):
        MetricsLogger(tmp_path / "run-c", tensorboard=False, config=cfg)
    assert wandb_records(tmp_path / "run-c")[-1].WhichOneof("record_type") == "exit"


def test_a_tracker_failing_mid_run_is_warned_once_counted_and_the_run_goes_on(tmp_path, wandb_offline, capsys):
    cfg = load_config("tiny_cpu", ["run.trackers=[wandb]"])
    logger = MetricsLogger(tmp_path, tensorboard=False, config=cfg)
    logger.log("grpo", 1, {"reward/total": 0.5})
    logger.trackers[0].run.finish()  # the W&B run ends under the logger: every later call raises
    with pytest.warns(RuntimeWarning, match=r"wandb failed in scalars \(UsageError") as warned:
        logger.log("grpo", 2, {"reward/total": 0.6})
        logger.text("grpo/rollouts", TEXT, 2)
        logger.log("grpo", 3, {"reward/total": 0.7})
    assert len(warned) == 1 and logger.tracker_failures == {"wandb": 3}
    logger.close()
    assert [(r["step"], r["reward/total"]) for r in read_metrics(tmp_path)] == [(1, 0.5), (2, 0.6), (3, 0.7)]
    assert f"run.trackers: {logger.tracker_failures['wandb']} wandb call(s) failed" in capsys.readouterr().out
    assert wandb_history(wandb_records(tmp_path)) == [{"grpo_step": 1, "grpo/reward/total": 0.5}]
