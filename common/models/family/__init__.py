"""Model families: everything specific to one multimodal LLM family (chat format, special tokens, processor
inputs, LoRA scope, checkpoint key names, vision tokens) behind one `ModelFamily` object, chosen from the model
folder's `config.json` `model_type`. A new family is one module here plus its line in FAMILIES."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

from coreseg.common.models.family.base import ModelFamily, PromptIdsError
from coreseg.common.models.family.qwen2_5_vl import Qwen25VL

FAMILIES: Dict[str, ModelFamily] = {f.model_type: f for f in (Qwen25VL(),)}

__all__ = ["FAMILIES", "ModelFamily", "PromptIdsError", "PromptRenderer", "UnknownModelFamily", "family_for_type",
           "model_family"]


class UnknownModelFamily(ValueError):
    """The model's config names a model_type no family serves."""


def family_for_type(model_type: str, where: str = "") -> ModelFamily:
    family = FAMILIES.get(model_type)
    if family is None:
        raise UnknownModelFamily(
            f"{where or 'model'}: model_type {model_type!r} has no model family; known: {sorted(FAMILIES)} "
            f"(add one as common/models/family/<model_type>.py and register it in FAMILIES)")
    return family


def model_family(policy_dir: str | Path) -> ModelFamily:
    """The family of a model folder, from its config.json `model_type`."""
    config = Path(policy_dir) / "config.json"
    try:
        model_type = json.loads(config.read_text()).get("model_type", "")
    except (OSError, ValueError) as err:
        raise UnknownModelFamily(f"{policy_dir}: cannot read model_type from {config} ({err})") from err
    return family_for_type(model_type, str(policy_dir))


class PromptRenderer:
    """Renders each task prompt once, with the model folder's chat template and model.system_prompt: the rollout
    requests carry the text, the engines tokenize it, and the learner trains on the engine's prompt ids."""

    def __init__(self, policy_dir: str | Path, system_prompt: str):
        from transformers import AutoProcessor

        self.family = model_family(policy_dir)
        self.processor = AutoProcessor.from_pretrained(str(policy_dir))  # the chat template only: no image budget
        self.system_prompt = system_prompt

    def __call__(self, question: str) -> str:
        return self.family.render_prompt(self.processor, question, self.system_prompt)
