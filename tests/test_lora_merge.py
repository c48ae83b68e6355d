"""LoRA deltas and merged weights against peft's own merge (merge_and_unload) on the tiny policy."""
from __future__ import annotations

import math

import pytest
import torch

from coreseg.rollout.lora_merge import CheckpointReader, lora_deltas
from tests.test_rollout_engines import random_bundle


@pytest.mark.parametrize("r,alpha", [(8, 16), (4, 4)])
def test_deltas_equal_peft_merge(tiny_policy_dir, r, alpha):
    bundle, peft_model = random_bundle(tiny_policy_dir, 1, seed=r, lora_r=r, lora_alpha=alpha)
    lora, config = bundle.lora, bundle.peft_config
    deltas = lora_deltas(lora, config)
    base = CheckpointReader(tiny_policy_dir)
    merged = dict(peft_model.merge_and_unload().named_parameters())
    assert len(deltas) == len(lora) // 2 > 0
    for module, delta in deltas.items():
        key = base.weight_key(module)
        torch.testing.assert_close(base.get(key) + delta, merged[f"{module}.weight"], atol=1e-6, rtol=0)
    # one module by hand: scale * B @ A with scale = alpha / r
    name = sorted(deltas)[0]
    a = lora[f"base_model.model.{name}.lora_A.weight"]
    b = lora[f"base_model.model.{name}.lora_B.weight"]
    torch.testing.assert_close(deltas[name], (alpha / r) * b @ a)


def test_rslora_scale_and_bad_adapters(tiny_policy_dir):
    bundle, _ = random_bundle(tiny_policy_dir, 1, seed=0)
    lora, config = bundle.lora, bundle.peft_config
    name = sorted(lora_deltas(lora, config))[0]
    plain = lora_deltas(lora, config)[name]
    rs = lora_deltas(lora, {**config, "use_rslora": True})[name]
    torch.testing.assert_close(rs, plain * config["r"] / math.sqrt(config["r"]))
    with pytest.raises(ValueError, match="DoRA"):
        lora_deltas(lora, {**config, "use_dora": True})
    with pytest.raises(ValueError, match="lacks lora_B"):
        lora_deltas({k: v for k, v in lora.items() if "lora_B" not in k}, config)
    with pytest.raises(KeyError, match="no weight in the checkpoint"):
        CheckpointReader(tiny_policy_dir).weight_key("model.language_model.layers.99.mlp.up_proj")
