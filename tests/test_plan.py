"""`coreseg plan`: its counts and formulas against hand arithmetic, torch's own parameter count and the Qwen
image processor's own token count."""
from __future__ import annotations

import json

import numpy as np
import pytest

from coreseg.deploy.plan import (GIB, KNOWN_SHAPES, PolicyShape, activation_bytes_per_token_layer, gpus_needed,
                         kv_bytes_per_token, learner_activation_bytes, lm_params, lora_params, make_plan,
                         shape_from_config, trainable_state_bytes, vision_params, vision_tokens)

SMALL = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=96, vocab=320, v_hidden=32, v_depth=2,
             v_intermediate=48)


def _small_model(tied: bool):
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    s = SMALL
    text = dict(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                tie_word_embeddings=tied, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                           "mrope_section": [2, 3, 3]})
    vision = dict(depth=s["v_depth"], hidden_size=s["v_hidden"], intermediate_size=s["v_intermediate"], num_heads=2,
                  out_hidden_size=s["hidden"], patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tied)
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(config)


@pytest.mark.parametrize("tied", [True, False])
def test_parameter_counts_equal_torchs(tied):
    model = _small_model(tied)
    shape = shape_from_config(model.config.to_dict())
    visual = sum(p.numel() for n, p in model.named_parameters() if ".visual." in f".{n}")
    total = sum(p.numel() for p in model.parameters())  # tied weights are one parameter here
    assert shape.tied is tied
    assert vision_params(shape) == visual
    assert lm_params(shape) == total - visual


def test_3b_counts_by_hand():
    s = KNOWN_SHAPES["Qwen2.5-VL-3B-Instruct"]
    # per layer: q 2048*2048+2048, k and v 2048*256+256, o 2048*2048, MLP 3*2048*11008, 2 norms of 2048
    layer = (2048 * 2048 + 2048) + 2 * (2048 * 256 + 256) + 2048 * 2048 + 3 * 2048 * 11008 + 2 * 2048
    assert layer == 77_076_992
    assert lm_params(s) == 36 * layer + 151_936 * 2048 + 2048 == 3_085_938_688  # tied: one 151,936 x 2048 matrix
    # LoRA r=64 on the 7 linears: 64 x (in + out) each
    per_layer = 64 * ((2048 + 2048) * 2 + (2048 + 256) * 2 + (2048 + 11008) * 3)
    assert lora_params(s, 64, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]) \
        == 36 * per_layer == 119_734_272
    assert kv_bytes_per_token(s, 2) == 2 * 36 * 2 * 128 * 2 == 36_864
    with pytest.raises(ValueError, match="qkv"):
        lora_params(s, 8, ["qkv"])


@pytest.mark.parametrize("size", [(1024, 1024), (300, 500), (20, 20), (4000, 3000)])
def test_vision_tokens_equal_the_processors(size):
    from transformers import Qwen2VLImageProcessor

    h, w = size
    processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=1024 * 1024, patch_size=14, merge_size=2,
                                      temporal_patch_size=2)
    grid = processor(images=[np.zeros((h, w, 3), np.uint8)], return_tensors="pt")["image_grid_thw"]
    shape = PolicyShape(**SMALL, tied=True, min_pixels=56 * 56, max_pixels=1024 * 1024)
    assert vision_tokens(h, w, shape) == int(grid.prod()) // 4


def test_vision_tokens_of_1024_by_hand():
    # 1024 / 28 = 36.57 -> 37 blocks a side, far below the 12.8 MP default budget
    assert vision_tokens(1024, 1024, KNOWN_SHAPES["Qwen2.5-VL-3B-Instruct"]) == 37 * 37 == 1369


def test_zero_stages_split_state_by_hand():
    n = 1000
    assert trainable_state_bytes(n, True, 0, 4) == {"weights": 2000, "gradients": 2000, "optimizer": 12000}
    assert trainable_state_bytes(n, True, 1, 4) == {"weights": 2000, "gradients": 2000, "optimizer": 3000}
    assert trainable_state_bytes(n, True, 2, 4) == {"weights": 2000, "gradients": 500, "optimizer": 3000}
    assert trainable_state_bytes(n, True, 3, 4) == {"weights": 500, "gradients": 500, "optimizer": 3000}
    assert trainable_state_bytes(n, False, 2, 2) == {"weights": 4000, "gradients": 2000, "optimizer": 4000}


def test_activations_by_hand():
    s = PolicyShape(**SMALL, tied=True)  # h 64, kv 2 x 16 = 32, I 96
    per = 2 * (10 * 64 + 4 * 32 + 4 * 96) + 8 * 64
    assert activation_bytes_per_token_layer(s, 2) == per == 2816
    assert learner_activation_bytes(s, 100, 2, checkpointing=False) == 2 * 100 * per
    assert learner_activation_bytes(s, 100, 2, checkpointing=True) == 2 * 100 * 64 * 2 + 100 * per


def test_gpu_count_of_the_3b_preset():
    from coreseg.common.config import load_config

    cfg = load_config("qwen25vl_3b", [])
    # 4 learner GPUs, 2 rollout GPUs, 4 reward workers at 0.5 GPU packed on 2
    assert gpus_needed(cfg.cluster) == {"learner": 4, "rollout": 2, "reward": 2, "total": 8}
    colocated = load_config("qwen25vl_3b", ["cluster.colocate=true", "cluster.rollout_workers=4"])
    # 4 engines share the 4 learner GPUs
    assert gpus_needed(colocated.cluster)["total"] == 6


def test_plan_of_the_3b_preset_by_hand():
    from coreseg.common.config import load_config

    cfg = load_config("qwen25vl_3b", ["learner.gradient_checkpointing=true"])
    plan = make_plan(cfg, gpu_mem_gib=80, image_size=1024, prompt_text_tokens=100)
    rows = {(r.role, r.item.split(",")[0]): r.nbytes for r in plan.rows}
    assert rows[("learner", "policy weights")] == (3_085_938_688 + 668_684_288) * 2
    # the preset's max_pixels (1024^2) resizes a 1024^2 image to 1008^2 px: 36 x 36 = 1296 vision tokens
    seq = 1296 + 100 + 512
    # micro-batch 4 rows; checkpointing: 36 layer inputs of 2048 bf16 values + one layer's activations
    per = 2 * (10 * 2048 + 4 * 256 + 4 * 11008) + 8 * 2048
    assert rows[("learner", "LM activations")] == 4 * seq * (36 * 2048 * 2 + per)
    assert rows[("rollout", "vLLM KV cache + activations")] == 0.6 * 80 * GIB - (3_085_938_688 + 668_684_288) * 2
    assert plan.gpus["total"] == 8 and not plan.warnings


def test_plan_warns_when_a_role_does_not_fit():
    from coreseg.common.config import load_config

    cfg = load_config("qwen25vl_3b", ["learner.gradient_checkpointing=false", "rollout.max_model_len=1024"])
    plan = make_plan(cfg, gpu_mem_gib=24, image_size=1024)
    text = "\n".join(plan.warnings)
    assert "learner GPU: needs" in text and "above --gpu-mem-gib 24" in text
    assert "gradient_checkpointing=true" in text
    assert "exceeds rollout.max_model_len=1024" in text


def test_cli_plan_reads_a_policy_folder(tmp_path, capsys):
    from coreseg.deploy.cli import main

    model = _small_model(True)
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    main(["plan", f"model.policy={tmp_path}", "--image-size", "112", "--gpu-mem-gib", "24"])
    out = capsys.readouterr().out
    assert f"{tmp_path}/config.json" in out and "16 vision" in out  # 112 px: 4 x 4 blocks of 28 px
    assert "GPUs: 0" in out


def test_sam_encoder_peak_by_hand():
    from coreseg.deploy.plan import sam_encoder_peak_bytes

    n = 64 * 64  # vit_b at 1024 px: 16 px patches
    assert sam_encoder_peak_bytes(1024, 12, 768) == 2 * 12 * n * n * 4 + 8 * n * 768 * 4
    assert sam_encoder_peak_bytes(1024, 12, 768, batch=8, dtype_bytes=2) == 8 * (2 * 12 * n * n + 8 * n * 768) * 2


def test_cpu_plan_rows_by_hand(tmp_path):
    """On CPU (no GPU in cluster.*): fp32 weights, vLLM-CPU's second lm_head copy, the configured KV cache."""
    from coreseg.common.config import load_config

    model = _small_model(True)
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    cfg = load_config("tiny_cpu", [f"model.policy={tmp_path}", "rollout.cpu_kv_cache_gb=2"])
    plan = make_plan(cfg, image_size=112)
    rows = {(r.role, r.item): r.nbytes for r in plan.rows}
    n = sum(p.numel() for p in model.parameters())
    assert rows[("learner", "policy weights")] == rows[("rollout", "vLLM weights")] == n * 4
    assert rows[("rollout", "vLLM-CPU packed lm_head copy")] == 320 * 64 * 4
    assert rows[("rollout", "vLLM KV cache")] == 2 * GIB
    assert plan.gpus["total"] == 0 and plan.device == "cpu"


def test_an_unknown_policy_without_a_folder_is_an_error_naming_the_known_shapes():
    from coreseg.deploy.plan import resolve_shape

    shape, source = resolve_shape("/absent/Qwen2.5-VL-7B-Instruct")
    assert shape == KNOWN_SHAPES["Qwen2.5-VL-7B-Instruct"] and "no folder" in source
    with pytest.raises(FileNotFoundError, match="Qwen2.5-VL-3B-Instruct"):
        resolve_shape("/absent/SomeOtherModel")


def test_cli_plan_names_a_policy_it_cannot_size(capsys):
    from coreseg.deploy.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["plan", "model.policy=/absent/SomeOtherModel"])
    assert "coreseg plan: model.policy='/absent/SomeOtherModel'" in str(exit_.value)
