"""Model families: chosen from the model folder's config.json, the prompt they render, and the learner's batch
built from the rollout engine's prompt ids."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from coreseg.common.models.family import FAMILIES, PromptIdsError, UnknownModelFamily, model_family
from coreseg.common.models.family.qwen2_5_vl import Qwen25VL
from coreseg.learner.batch import PromptEncoder, build_batch


@pytest.fixture(scope="module")
def policy(tiny_policy_dir):
    from coreseg.common.models.policy import load_policy

    model, processor = load_policy(tiny_policy_dir)
    return model.eval(), processor


def _engine_prompt_ids(processor, prompt, sample):
    """What an engine returns as prompt ids: the processor's tokens of the prompt, image pads expanded."""
    return processor(text=[prompt], images=[Image.fromarray(sample.image)])["input_ids"][0]


def test_family_comes_from_the_model_config_and_renders_the_chat_template(tiny_policy_dir, policy):
    family = model_family(tiny_policy_dir)
    assert isinstance(family, Qwen25VL) and family.model_type == "qwen2_5_vl"
    processor = policy[1]
    from coreseg.common.prompts import SYSTEM_PROMPT, build_user_text

    question = "Locate and segment the polyp."
    messages = [{"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": build_user_text(question)}]}]
    # the jinja chat template saved with the tokenizer is an independent rendering of the same conversation
    want = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert family.prompt(question) == want
    assert want.count("<|image_pad|>") == 1 and want.endswith("<|im_start|>assistant\n")


def test_unknown_model_type_names_the_folder_and_the_known_families(tmp_path):
    from coreseg.common.models.policy import ensure_policy_dir

    folder = tmp_path / "some-llava"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llava"}))
    for call in (lambda: model_family(folder), lambda: ensure_policy_dir(str(folder))):
        with pytest.raises(UnknownModelFamily) as err:
            call()
        text = str(err.value)
        assert str(folder) in text and "'llava'" in text and "qwen2_5_vl" in text


def test_a_registered_family_is_chosen_by_its_model_type(tmp_path, monkeypatch):
    class OtherVL(Qwen25VL):  # a new family: one subclass and one registry entry
        model_type = "other_vl"

    monkeypatch.setitem(FAMILIES, "other_vl", OtherVL())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "other_vl"}))
    assert isinstance(model_family(tmp_path), OtherVL)


def test_batch_from_engine_prompt_ids_scores_like_a_direct_forward(tiny_policy_dir, policy, synth_samples):
    """Family chosen from the config -> batch from the engine's prompt ids (two rows of different lengths, so
    one is padded) -> the policy's logits equal a forward over the same tokens assembled by hand."""
    model, processor = policy
    family = model_family(tiny_policy_dir)
    samples = synth_samples[:2]
    prompts = [_engine_prompt_ids(processor, family.prompt(s.question), s) for s in samples]
    completions = [[40, 41, 42, 43, 44], [50, 51, 52]]
    pad = processor.tokenizer.pad_token_id
    batch = build_batch(PromptEncoder(processor, family), samples, completions, pad, prompt_ids=prompts)
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert batch.prompt_lens == [len(p) for p in prompts] and batch.completion_lens == [5, 3]
    with torch.no_grad():
        logits = model(**batch.model_inputs("cpu")).logits
    for i, (s, p, c) in enumerate(zip(samples, prompts, completions)):
        ids = torch.tensor([list(p) + c])
        n = ids.shape[1]
        assert torch.equal(batch.input_ids[i, :n], ids[0]) and (batch.input_ids[i, n:] == pad).all()
        assert batch.attention_mask[i].sum() == n and batch.completion_mask[i].sum() == len(c)
        mm_types = (ids == image_id).long()  # 1 at image tokens, 0 elsewhere (completion included)
        assert torch.equal(batch.extra_inputs["mm_token_type_ids"][i, :n], mm_types[0])
        image = processor.image_processor(images=[Image.fromarray(s.image)], return_tensors="pt")
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=image["pixel_values"],
                         image_grid_thw=image["image_grid_thw"], mm_token_type_ids=mm_types).logits
        np.testing.assert_allclose(logits[i, :n].numpy(), want[0].numpy(), atol=1e-4)


def test_prompt_ids_that_do_not_fit_the_image_name_the_sample(tiny_policy_dir, policy, synth_samples):
    _, processor = policy
    family = model_family(tiny_policy_dir)
    sample = synth_samples[0]
    ids = list(_engine_prompt_ids(processor, family.prompt(sample.question), sample))
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    n_image = ids.count(image_id)
    assert n_image > 1
    short = ids[:ids.index(image_id)] + ids[ids.index(image_id) + 1:]  # one image token missing
    encoder = PromptEncoder(processor, family)
    for bad, got in ((short, n_image - 1), ([], 0)):
        with pytest.raises(PromptIdsError, match=rf"sample '{sample.id}'.* hold {got} <\|image_pad\|> tokens, "
                                                 rf"its image needs {n_image}"):
            build_batch(encoder, [sample], [[40, 41]], 0, prompt_ids=[bad])


def test_rendered_batch_equals_engine_ids_batch(tiny_policy_dir, policy, synth_samples):
    """SFT renders the prompt through the family; GRPO takes the engine's ids: for the same prompt the batches
    agree tensor for tensor."""
    _, processor = policy
    family = model_family(tiny_policy_dir)
    samples = synth_samples[2:5]
    completions = [[60, 61], [62], [63, 64, 65]]
    prompts = [_engine_prompt_ids(processor, family.prompt(s.question), s) for s in samples]
    rendered = build_batch(PromptEncoder(processor, family), samples, completions, 0)
    from_ids = build_batch(PromptEncoder(processor, family), samples, completions, 0, prompt_ids=prompts)
    assert rendered.prompt_lens == from_ids.prompt_lens
    for k, v in rendered.model_inputs("cpu").items():
        assert torch.equal(v, from_ids.model_inputs("cpu")[k]), k
