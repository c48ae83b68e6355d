"""The image budget (model.min_pixels / model.max_pixels): the rollout engines and the learner give one image the
same number of vision tokens, equal to Qwen's resize rule worked by hand; a prompt that cannot fit
rollout.max_model_len is a counted, named per-sample error."""
import logging
import math

import numpy as np
import pytest

from coreseg.common.config import ConfigError, load_config
from coreseg.common.data import LesionSample
from coreseg.common.models.family import family_for_type
from coreseg.common.protocol import RolloutRequest

FAMILY = family_for_type("qwen2_5_vl")
BUDGET = ["model.min_pixels=3136", f"model.max_pixels={1024 * 1024}"]
# (height, width): a 1024^2 image, a non-square one, one above the budget, one below min_pixels
SIZES = [(1024, 1024), (700, 1300), (2000, 2000), (20, 30)]


def qwen_vision_tokens(height: int, width: int, min_pixels: int, max_pixels: int) -> int:
    """Qwen2-VL's resize rule by hand: each side rounded to a multiple of 28 px (14 px patches, 2x2 merged into one
    token); when the area leaves [min_pixels, max_pixels] both sides are scaled by the same factor, rounding
    down (too large) or up (too small) to multiples of 28. One vision token per 28 x 28 px."""
    h, w = max(28, round(height / 28) * 28), max(28, round(width / 28) * 28)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = max(28, math.floor(height / beta / 28) * 28), max(28, math.floor(width / beta / 28) * 28)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / 28) * 28, math.ceil(width * beta / 28) * 28
    return (h // 28) * (w // 28)


def test_the_preset_budget_gives_a_1024_image_1296_tokens():
    # 1024 / 28 = 36.6 -> 37 * 28 = 1036 px, 1036^2 > 1024^2, so each side floors to 36 * 28 = 1008 px:
    # 36 x 36 = 1296 vision tokens (~1.3k), which leaves room for text and 512 new tokens in 4096
    assert qwen_vision_tokens(1024, 1024, 3136, 1024 * 1024) == 1296
    cfg = load_config("qwen25vl_3b")
    assert (cfg.model.min_pixels, cfg.model.max_pixels) == (3136, 1024 * 1024)


def _image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def budget_paths(tiny_policy_dir):
    """The transformers engine and the learner module, both built from a config with the budget."""
    from coreseg.learner.model import CoreSegModule
    from coreseg.rollout.hf_engine import HFEngine

    cfg = load_config("tiny_cpu", BUDGET + ["rollout.engine=hf", "rollout.max_model_len=4096",
                                            "rollout.max_new_tokens=16"])
    return cfg, HFEngine(cfg, tiny_policy_dir), CoreSegModule(cfg, str(tiny_policy_dir))


@pytest.mark.parametrize("hw", SIZES)
def test_engine_and_learner_give_the_hand_computed_token_count(budget_paths, hw):
    from PIL import Image

    cfg, engine, learner = budget_paths
    image = _image(*hw)
    want = qwen_vision_tokens(*hw, cfg.model.min_pixels, cfg.model.max_pixels)
    pad = learner.info.image_token_id
    # the engine: the prompt ids it generates from (vLLM's and transformers' prepare)
    (prepared,) = engine.prepare([RolloutRequest("s", FAMILY.prompt("Where?"), image)], 16)
    assert sum(i == pad for i in prepared[1]) == want
    # the learner: the image inputs its GRPO pass pairs with the engine's ids, and its own SFT prompt
    image_inputs = FAMILY.encode_image(learner.processor, Image.fromarray(image))
    assert FAMILY.image_token_count(learner.processor, image_inputs) == want
    sft = FAMILY.encode_prompt(learner.processor, "Where?", Image.fromarray(image))
    assert int((sft["input_ids"] == pad).sum()) == want
    FAMILY.encode_with_prompt_ids(learner.processor, prepared[1], image_inputs, "s")  # accepted: counts agree


def test_budget_is_checked_in_the_config():
    with pytest.raises(ConfigError, match="model.min_pixels"):
        load_config("tiny_cpu", ["model.min_pixels=5000", "model.max_pixels=4000"])
    with pytest.raises(ConfigError, match="model.max_pixels"):
        load_config("tiny_cpu", ["model.max_pixels=-1"])


def test_a_prompt_over_max_model_len_is_a_named_counted_error(tiny_policy_dir, caplog):
    from coreseg.deploy.step import Answered, TrainBatch
    from coreseg.rollout.engine import PROMPT_TOO_LONG
    from coreseg.rollout.hf_engine import HFEngine

    # 1296 vision tokens cannot fit 1024 - 16 tokens
    cfg = load_config("tiny_cpu", BUDGET + ["rollout.engine=hf", "rollout.max_model_len=1024",
                                            "rollout.max_new_tokens=16"])
    engine = HFEngine(cfg, tiny_policy_dir)
    big, small = _image(1024, 1024), _image(112, 112)
    with caplog.at_level(logging.WARNING, logger="coreseg.rollout"):
        groups = engine.generate([RolloutRequest("big-1", FAMILY.prompt("Where?"), big),
                                  RolloutRequest("small-1", FAMILY.prompt("Where?"), small)], n=2)
    assert groups[0].error.startswith(PROMPT_TOO_LONG) and "'big-1'" in groups[0].error
    assert "1296 vision tokens" in groups[0].error and "model.max_pixels" in groups[0].error
    assert groups[1].error is None and len(groups[1].completions) == 2
    assert engine.errors == 1 and any("big-1" in r.getMessage() for r in caplog.records)

    sample = LesionSample(id="big-1", image=big, masks=[np.zeros((1024, 1024), bool)], boxes=[[0, 0, 1, 1]],
                          category="lesion", question="Where?")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="coreseg.rollout"):
        answered = Answered([], [], None, [], [(sample, groups[0].error)])
    assert any("'big-1'" in r.getMessage() for r in caplog.records)
    stats = TrainBatch(failed=answered.failed + [(sample, "image cannot be decoded")]).stats()
    assert stats["rollout/errors"] == 2 and stats["rollout/prompt_too_long"] == 1


@pytest.mark.slow  # imports vLLM (~40 s)
def test_vllm_processor_gives_the_same_token_count(tiny_policy_dir):
    import os

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY

    cfg = load_config("tiny_cpu", BUDGET)
    # the mm_processor_kwargs rollout/vllm_engine.py gives vLLM
    kwargs = FAMILY.processor_kwargs(cfg.model.min_pixels, cfg.model.max_pixels)
    info = MULTIMODAL_REGISTRY.create_processor(ModelConfig(model=str(tiny_policy_dir), mm_processor_kwargs=kwargs,
                                                            dtype="float32", max_model_len=4096)).info
    for h, w in SIZES:
        got = info.get_num_image_tokens(image_width=w, image_height=h, image_processor=info.get_image_processor(),
                                        mm_kwargs={})
        assert got == qwen_vision_tokens(h, w, cfg.model.min_pixels, cfg.model.max_pixels), (h, w)
