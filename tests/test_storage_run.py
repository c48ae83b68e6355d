"""A run whose folder is a `file://` URI (standing in for s3/gs/hdfs): 2 GRPO steps with a checkpoint after each,
then a driver with another staging folder (another node's local disk) resumes from the first checkpoint at the
URI and redoes step 2 exactly."""
from __future__ import annotations

import json

import pytest

from coreseg.common.config import load_config
from coreseg.common.storage import STAGE_ENV
from coreseg.common.synth import write_synth

pytestmark = pytest.mark.slow  # DeepSpeed learner, two tiny runs


def test_run_folder_at_a_uri_trains_checkpoints_and_resumes_on_another_node(tmp_path, monkeypatch):
    from coreseg.deploy.driver import Driver
    from coreseg.deploy.metrics_log import read_metrics

    data = write_synth(tmp_path / "data", 12, 112, 0).parent
    run_path = tmp_path / "bucket" / "runs" / "uri"
    run_uri = "file://" + str(run_path)
    cfg = load_config("tiny_cpu", [
        f"data.path={data}", f"model.assets_dir={tmp_path / 'driver_cache'}", "data.batch_size=2",
        "rollout.group_size=3", "rollout.max_new_tokens=24", "rollout.engine=hf", "run.sft_steps=0",
        "cluster.reward_workers=1", "run.save_every=1", "run.eval_every=0"])
    monkeypatch.setenv(STAGE_ENV, str(tmp_path / "node_a"))
    driver = Driver(cfg, run_uri, local=True)
    try:
        driver.train(2)
    finally:
        driver.close()
    first = {r["step"]: r for r in read_metrics(run_path) if r["phase"] == "grpo" and "reward/total" in r}
    assert sorted(first) == [1, 2]
    ckpts = run_path / "checkpoints"
    assert (ckpts / "latest").read_text() == "grpo_000002_sft_000000"
    assert sorted(p.name for p in ckpts.iterdir()) == ["grpo_000001_sft_000000", "grpo_000002_sft_000000", "latest"]
    part = ckpts / "grpo_000001_sft_000000"
    assert json.loads((part / "driver.json").read_text())["step"]["grpo"] == 1
    assert {"adapter.safetensors", "state_rank0.json", "rng_rank0.safetensors"} <= {
        p.name for p in (part / "learner").iterdir()}
    assert (run_path / "policy" / "config.json").exists() and (run_path / "config.yaml").exists()

    monkeypatch.setenv(STAGE_ENV, str(tmp_path / "node_b"))  # another node's local disk
    resumed = Driver(cfg, run_uri, local=True)
    try:
        resumed.restore(resumed.run.join("checkpoints", "grpo_000001_sft_000000"))
        assert resumed.step["grpo"] == 1
        record = resumed.grpo_step()
        resumed.evaluate(["val"], limit=2, tag="uri")
    finally:
        resumed.close()
    # the policy and the checkpoint came from the URI onto node b's disk
    assert any((tmp_path / "node_b" / "uri").glob("learner-*/adapter.safetensors"))
    assert any((tmp_path / "node_b" / "uri").glob("policy-*/config.json"))
    assert not (tmp_path / "node_b" / "driver_cache").exists()
    want = first[2]
    assert record["batch_ids"] == want["batch_ids"]
    for key in ("reward/total", "learner/loss"):
        assert record[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), key
    redone = [r["step"] for r in read_metrics(run_path) if r["phase"] == "grpo" and "reward/total" in r]
    assert redone == [1, 2]  # the records after the checkpoint were dropped, step 2 logged once
    assert len(json.loads((run_path / "eval" / "uri.json").read_text())["val"]["records"]) == 2
