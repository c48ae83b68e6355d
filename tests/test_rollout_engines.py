"""vLLM (CPU) and HF engines on the tiny Qwen2.5-VL: n completions, sampling log-probs equal an independent
transformers recomputation, LoRA hot-swap equals peft+transformers with the same weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from coreseg.common.config import load_config
from coreseg.common.models.family import family_for_type, model_family
from coreseg.common.models.lora import lora_state, make_lora_config, peft_config_dict
from coreseg.common.models.policy import load_policy
from coreseg.common.protocol import RolloutRequest, WeightBundle
from coreseg.rollout.engine import Sampling

pytestmark = pytest.mark.slow  # real stack: Ray, DeepSpeed, vLLM

G = 8
# Transformers needs mm_token_type_ids to place the image's M-RoPE positions; with it the full-forward
# recomputation matches vLLM's and HF's sampling log-probs to fp32 precision.
IMAGE_ATOL = 1e-4
TINY_FAMILY = family_for_type("qwen2_5_vl")  # the tiny preset's family
TEXT_PROMPT = "<|im_start|>user\nLocate and segment the polyp.<|im_end|>\n<|im_start|>assistant\n"


def _cfg(lora_mode="adapter"):
    return load_config("tiny_cpu", ["rollout.max_new_tokens=24", "rollout.max_model_len=512",
                                    f"rollout.lora_mode={lora_mode}"])


def _requests(samples, k=2):
    return [RolloutRequest(s.id, TINY_FAMILY.prompt(s.question), s.image) for s in samples[:k]]


def recompute_logprobs(model, processor, sample, completion_ids):
    enc = processor(text=[TINY_FAMILY.prompt(sample.question)], images=[Image.fromarray(sample.image)],
                    return_tensors="pt")
    ids = torch.cat([enc["input_ids"], torch.tensor([completion_ids])], dim=1)
    mm_types = torch.cat([enc["mm_token_type_ids"], torch.zeros(1, len(completion_ids), dtype=torch.long)], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=enc["pixel_values"],
                       image_grid_thw=enc["image_grid_thw"], mm_token_type_ids=mm_types).logits.float()
    start = enc["input_ids"].shape[1]
    lp = torch.log_softmax(logits[0, start - 1:-1], dim=-1)
    return enc["input_ids"][0].tolist(), lp.gather(-1, torch.tensor(completion_ids)[:, None])[:, 0].numpy()


def random_bundle(policy_dir, version, seed, **model_overrides):
    """A bundle of random LoRA weights (B ~ N(0, 0.2), so versions differ clearly) and the peft model holding
    them; `model_overrides` set ModelConfig keys (lora_r, lora_alpha, ...)."""
    from peft import get_peft_model

    model, _ = load_policy(policy_dir)
    torch.manual_seed(seed)
    model_cfg = load_config("tiny_cpu", [f"model.{k}={v}" for k, v in model_overrides.items()]).model
    peft_model = get_peft_model(model, make_lora_config(model_cfg, model_family(policy_dir), init_random=True))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    bundle = WeightBundle(version=version, lora=lora_state(peft_model),
                          peft_config=peft_config_dict(peft_model.peft_config["default"]), adapter={})
    return bundle, peft_model.eval()


@pytest.fixture(scope="module")
def reference(tiny_policy_dir):
    model, processor = load_policy(tiny_policy_dir)
    return model.eval(), processor


@pytest.fixture(scope="module")
def vllm_engine(tiny_policy_dir):
    from coreseg.rollout.vllm_engine import VLLMEngine

    return VLLMEngine(_cfg(), tiny_policy_dir)


def _check_groups(groups, n, version):
    for g in groups:
        assert g.error is None and len(g.completions) == n
        for c in g.completions:
            assert len(c.token_ids) == len(c.logprobs) > 0 and c.version == version
            assert all(np.isfinite(c.logprobs)) and isinstance(c.text, str)


def test_vllm_logprobs_match_transformers(vllm_engine, reference, synth_samples):
    model, processor = reference
    groups = vllm_engine.generate(_requests(synth_samples), G, Sampling(1.0, 1.0, 24, seed=3))
    _check_groups(groups, G, 0)
    # the G samples can share the prompt's prefill only if it fills at least one whole KV block
    block = vllm_engine.llm.llm_engine.vllm_config.cache_config.block_size
    assert block == 32 and all(len(g.completions[0].prompt_token_ids) >= 2 * block for g in groups)
    vision = set(vllm_engine.info.vision_token_ids)
    for sample, group in zip(synth_samples, groups):
        for comp in group.completions[:3]:
            assert not vision & set(comp.token_ids)
            prompt_ids, want = recompute_logprobs(model, processor, sample, comp.token_ids)
            assert prompt_ids == comp.prompt_token_ids
            np.testing.assert_allclose(comp.logprobs, want, atol=IMAGE_ATOL)


def text_only_check(engine, model, lora_request=None):
    """vLLM's sampling log-probs on a text-only prompt vs a transformers forward over the same tokens."""
    from vllm import SamplingParams

    out = engine.llm.generate([TEXT_PROMPT], SamplingParams(n=G, max_tokens=16, logprobs=0, seed=7),
                              lora_request=lora_request, use_tqdm=False)[0]
    assert len(out.outputs) == G
    for o in out.outputs:
        ids = list(out.prompt_token_ids) + list(o.token_ids)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits.float()
        start = len(out.prompt_token_ids)
        want = torch.log_softmax(logits[0, start - 1:-1], -1).gather(-1, torch.tensor(o.token_ids)[:, None])[:, 0]
        got = [step[t].logprob for t, step in zip(o.token_ids, o.logprobs)]
        np.testing.assert_allclose(got, want.numpy(), atol=1e-4)


def test_vllm_text_logprobs_match_transformers_exactly(vllm_engine, reference):
    text_only_check(vllm_engine, reference[0])


def test_vllm_lora_hot_swap_matches_peft(vllm_engine, tiny_policy_dir, synth_samples):
    sample = synth_samples[0]
    req = _requests(synth_samples, 1)
    before = vllm_engine.generate(req, 2, Sampling(1.0, 1.0, 24, seed=5))[0].completions[0]
    bundle, peft_model = random_bundle(tiny_policy_dir, version=1, seed=1)
    vllm_engine.load_weights(bundle)
    assert vllm_engine.version == 1
    group = vllm_engine.generate(req, 2, Sampling(1.0, 1.0, 24, seed=5))[0]
    _check_groups([group], 2, 1)
    processor = vllm_engine.processor
    comp = group.completions[0]
    text_only_check(vllm_engine, peft_model, vllm_engine._lora)  # LoRA served exactly
    _, want = recompute_logprobs(peft_model, processor, sample, comp.token_ids)
    base = load_policy(tiny_policy_dir)[0].eval()
    _, base_lp = recompute_logprobs(base, processor, sample, comp.token_ids)
    np.testing.assert_allclose(comp.logprobs, want, atol=IMAGE_ATOL)
    assert np.abs(np.asarray(comp.logprobs) - base_lp).max() > 0.2  # and differ from the previous version
    assert before.version == 0


def test_ten_versions_keep_at_most_two_adapters(vllm_engine, tiny_policy_dir, synth_samples):
    bundle, _ = random_bundle(tiny_policy_dir, version=0, seed=2)
    for v in range(2, 12):
        bundle.version = v
        vllm_engine.load_weights(bundle)
        assert len(vllm_engine.loaded_adapters()) <= 2
    assert vllm_engine.generate(_requests(synth_samples, 1), 1, Sampling(1.0, 1.0, 8))[0].completions[0].version == 11


def test_vllm_adapter_mode_serves_token_rows(vllm_engine, tiny_policy_dir):
    """Adapter mode (the GPU default) with trained `<seg>` rows: the LoRA comes as an adapter, the rows are written
    into vLLM's embedding and LM head in place; log-probs equal peft+transformers with the rows in its weights.
    (Before the merged-mode test: a second engine in this process tears down vLLM's parallel state on exit.)"""
    from coreseg.common.models.token_rows import write_rows_torch

    bundle, peft_model = random_bundle(tiny_policy_dir, version=100, seed=20)
    hidden = peft_model.get_input_embeddings().weight.shape[1]
    g = torch.Generator().manual_seed(0)
    bundle.token_rows = {"ids": torch.tensor([vllm_engine.info.seg_token_id]),
                         "input": torch.randn(1, hidden, generator=g), "output": 0.5 * torch.randn(1, hidden, generator=g)}
    vllm_engine.load_weights(bundle)
    assert not vllm_engine.merged and vllm_engine.version == 100
    write_rows_torch(peft_model.get_base_model(), bundle.token_rows)
    text_only_check(vllm_engine, peft_model, vllm_engine._lora)


def test_bad_requests_are_isolated(vllm_engine, synth_samples):
    reqs = _requests(synth_samples, 2)
    reqs.insert(1, RolloutRequest("bad-image", reqs[0].prompt, b"not an image"))
    reqs.append(RolloutRequest("too-long", "word " * 600 + reqs[0].prompt, synth_samples[0].image))
    groups = vllm_engine.generate(reqs, 2, Sampling(1.0, 1.0, 8))
    assert [g.sample_id for g in groups] == [r.sample_id for r in reqs]
    assert "cannot be decoded" in groups[1].error and "max_model_len" in groups[3].error
    _check_groups([groups[0], groups[2]], 2, vllm_engine.version)


def test_hf_engine_contract_and_lora(tiny_policy_dir, reference, synth_samples):
    from coreseg.rollout.hf_engine import HFEngine

    engine = HFEngine(_cfg(), tiny_policy_dir)
    groups = engine.generate(_requests(synth_samples), 4, Sampling(1.0, 1.0, 16, seed=1))
    _check_groups(groups, 4, 0)
    model, processor = reference
    comp = groups[0].completions[0]
    _, want = recompute_logprobs(model, processor, synth_samples[0], comp.token_ids)
    np.testing.assert_allclose(comp.logprobs, want, atol=1e-4)
    bundle, peft_model = random_bundle(tiny_policy_dir, version=4, seed=4)
    engine.load_weights(bundle)
    comp = engine.generate(_requests(synth_samples, 1), 2, Sampling(1.0, 1.0, 16, seed=2))[0].completions[1]
    assert comp.version == 4
    _, want = recompute_logprobs(peft_model, processor, synth_samples[0], comp.token_ids)
    np.testing.assert_allclose(comp.logprobs, want, atol=1e-4)
    # a second version replaces the first (merged from the base weights, not on top of version 4)
    bundle, peft_model = random_bundle(tiny_policy_dir, version=5, seed=5)
    engine.load_weights(bundle)
    comp = engine.generate(_requests(synth_samples, 1), 2, Sampling(1.0, 1.0, 16, seed=3))[0].completions[0]
    _, want = recompute_logprobs(peft_model, processor, synth_samples[0], comp.token_ids)
    np.testing.assert_allclose(comp.logprobs, want, atol=1e-4)


def test_sampling_from_rollout_config_and_default():
    from coreseg.common.config import RolloutConfig
    from coreseg.rollout.engine import as_sampling

    cfg = _cfg()
    got = as_sampling(RolloutConfig(temperature=0.7, top_p=0.9, max_new_tokens=5, seed=3), cfg)
    assert (got.temperature, got.top_p, got.max_new_tokens, got.seed) == (0.7, 0.9, 5, 3)
    assert as_sampling(None, cfg).max_new_tokens == cfg.rollout.max_new_tokens
    fixed = Sampling(0.5, 1.0, 4, seed=1)
    assert as_sampling(fixed, cfg) is fixed


@pytest.mark.parametrize("image, reason", [
    (b"\x89PNG\r\n\x1a\n truncated", "cannot be decoded"),
    (np.zeros((32, 32), np.uint8), "HxWx3 uint8"),  # grayscale
    (np.zeros((32, 32, 3), np.float32), "HxWx3 uint8"),  # wrong dtype
    (np.zeros((4, 32, 3), np.uint8), "HxWx3 uint8"),  # too small
])
def test_bad_images_give_an_error_message(image, reason):
    from coreseg.rollout.engine import request_image

    pil, err = request_image(RolloutRequest("x", "p", image))
    assert pil is None and reason in err


def test_png_bytes_decode():
    import io

    from coreseg.rollout.engine import request_image

    buf = io.BytesIO()
    Image.fromarray(np.full((16, 20, 3), 7, np.uint8)).save(buf, format="PNG")
    pil, err = request_image(RolloutRequest("x", "p", buf.getvalue()))
    assert err is None and pil.size == (20, 16) and np.asarray(pil)[0, 0, 0] == 7


def test_vllm_seeded_batch_larger_than_one_prefill_step(vllm_engine, synth_samples):
    """80 seeded sequences (~9k prompt tokens) exceed one step's token budget: on CPU vLLM must not split a
    prefill (that rewinds seeded generators, which CPU generators cannot do); everything completes."""
    reqs = _requests(synth_samples, 10)
    groups = vllm_engine.generate(reqs, G, Sampling(1.0, 1.0, 4, seed=11))
    assert [g.sample_id for g in groups] == [r.sample_id for r in reqs]
    assert all(g.error is None and len(g.completions) == G for g in groups)


def test_merged_lora_serves_each_version_exactly(tiny_policy_dir, synth_samples):
    """Merged mode (the CPU default): each version's log-probs equal peft+transformers with its weights; going
    back to an earlier version gives its log-probs again (no drift, no KV cached under other weights)."""
    from coreseg.rollout.vllm_engine import VLLMEngine

    engine = VLLMEngine(_cfg("auto"), tiny_policy_dir)
    assert engine.merged and engine.loaded_adapters() == []
    sample, req = synth_samples[0], _requests(synth_samples, 1)
    processor = engine.processor
    versions = [random_bundle(tiny_policy_dir, version=v, seed=v) for v in (1, 2)]
    first = None
    for version, (bundle, peft_model) in zip((1, 2, 3), versions + [versions[0]]):
        bundle.version = version
        assert engine.load_weights(bundle) == version
        group = engine.generate(req, 2, Sampling(1.0, 1.0, 24, seed=5))[0]  # the same ~110-token prompt each time
        _check_groups([group], 2, version)
        for comp in group.completions:
            _, want = recompute_logprobs(peft_model, processor, sample, comp.token_ids)
            np.testing.assert_allclose(comp.logprobs, want, atol=IMAGE_ATOL)
        first = first or group.completions[0]
    _, other = recompute_logprobs(versions[1][1], processor, sample, first.token_ids)
    assert np.abs(np.asarray(first.logprobs) - other).max() > 0.2  # the versions really differ

