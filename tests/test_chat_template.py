"""The task prompt is rendered once by the model folder's chat template with the system prompt from the config:
the driver's renderer and the learner's SFT encoding both equal the processor's apply_chat_template output."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from coreseg.common.config import load_config
from coreseg.common.data import LesionSample
from coreseg.common.models.family import PromptRenderer
from coreseg.common.prompts import SYSTEM_PROMPT, build_user_text

QUESTION = "Locate and segment the polyp."


@pytest.fixture(scope="module")
def processor(tiny_policy_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(tiny_policy_dir))


def _messages(system):
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": build_user_text(QUESTION)}]}
    return ([{"role": "system", "content": system}] if system else []) + [user]


def test_config_default_system_prompt_is_the_task_prompt():
    assert load_config("tiny_cpu").model.system_prompt == SYSTEM_PROMPT


@pytest.mark.parametrize("system", [SYSTEM_PROMPT, "You are a radiologist. Answer briefly."])
def test_renderer_equals_apply_chat_template_with_the_configured_system_prompt(tiny_policy_dir, processor, system):
    cfg = load_config("tiny_cpu", [f"model.system_prompt={system}"])
    rendered = PromptRenderer(tiny_policy_dir, cfg.model.system_prompt)(QUESTION)
    assert rendered == processor.apply_chat_template(_messages(system), tokenize=False, add_generation_prompt=True)
    # ChatML written out by hand: the system turn carries the configured text, one image, the assistant header
    assert rendered == (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"
                        f"<|vision_start|><|image_pad|><|vision_end|>{build_user_text(QUESTION)}<|im_end|>\n"
                        "<|im_start|>assistant\n")


def test_empty_system_prompt_leaves_the_system_turn_out(tiny_policy_dir, processor):
    rendered = PromptRenderer(tiny_policy_dir, "")(QUESTION)
    assert rendered == processor.apply_chat_template(_messages(""), tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<|im_start|>user\n")


def test_sft_encodes_the_same_rendering_with_the_configured_system_prompt(tiny_policy_dir, processor):
    from coreseg.learner.batch import PromptEncoder

    system = "You are a radiologist. Answer briefly."
    image = np.random.default_rng(0).integers(0, 256, size=(112, 112, 3), dtype=np.uint8)
    sample = LesionSample(id="s1", image=image, masks=[np.zeros((112, 112), bool)], boxes=np.zeros((1, 4)),
                          question=QUESTION)
    family = PromptRenderer(tiny_policy_dir, system).family
    encoded = PromptEncoder(processor, family, system).encode(sample)
    text = processor.apply_chat_template(_messages(system), tokenize=False, add_generation_prompt=True)
    want = processor(text=[text], images=[Image.fromarray(image)], return_tensors="pt")["input_ids"]
    assert encoded["input_ids"].tolist() == want.tolist()
    # and differs from the default system prompt's encoding: the config reaches the learner
    default = PromptEncoder(processor, family).encode(sample)
    assert default["input_ids"].tolist() != want.tolist()
