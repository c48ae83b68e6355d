"""LoRA on the language model (never the vision tower; the family names its scope) and its JSON-able PEFT config."""
from __future__ import annotations

from typing import Dict

import torch

from coreseg.common.config import ModelConfig
from coreseg.common.models.family import ModelFamily


def make_lora_config(cfg: ModelConfig, family: ModelFamily, init_random: bool = False):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=family.lora_target_regex(cfg.lora_target_modules), bias="none",
                      init_lora_weights=not init_random)


def peft_config_dict(config) -> dict:
    """LoraConfig -> JSON-able dict (sets become sorted lists), as written to adapter_config.json."""
    out = {}
    for key, value in config.to_dict().items():
        if isinstance(value, set):
            value = sorted(value)
        if hasattr(value, "value"):  # enums
            value = value.value
        out[key] = value
    return out


def cpu_copies(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """One contiguous CPU copy of each tensor, in its own dtype (the learner keeps training the originals; a GPU
    learner's bf16 stays bf16: half the bytes of float32 on every push)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}


def lora_state(peft_model) -> Dict[str, torch.Tensor]:
    """LoRA tensors with PEFT names (as in adapter_model.safetensors) in the learner's dtype (bf16 on GPU, float32
    on CPU), copied to CPU."""
    from peft import get_peft_model_state_dict

    return cpu_copies(get_peft_model_state_dict(peft_model))
