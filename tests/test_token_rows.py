"""Trainable `<seg>` rows (common/models/token_rows.py): the hooked model equals a plain model whose embedding
weights hold the rows, only the rows train, tied and untied embeddings."""
from __future__ import annotations

import pytest
import torch

from coreseg.common.models.token_rows import attach_token_rows, rows_disabled, token_rows_of, write_rows_torch


def _tiny_causal_lm(tied: bool, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    return Qwen2ForCausalLM(cfg).eval()


def _peft(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


@pytest.mark.parametrize("tied", [True, False])
def test_hooked_rows_equal_rows_written_into_the_weights(tied):
    ids = [90, 7]
    policy = _peft(_tiny_causal_lm(tied))
    x = torch.tensor([[1, 90, 5, 7, 7, 90, 3]])
    before = policy(input_ids=x).logits
    rows = attach_token_rows(policy, ids)
    assert rows.tied == tied and token_rows_of(policy) is rows
    # delta 0: the base model (the rows' logits come from a 2-column product, not the full GEMM: rounding apart)
    torch.testing.assert_close(policy(input_ids=x).logits, before, rtol=0, atol=1e-6)
    with torch.no_grad():
        rows.input_delta.normal_()
        if not tied:
            rows.output_delta.normal_()
    got = policy(input_ids=x).logits
    exported = rows.export()
    assert ("output" in exported) == (not tied) and exported["ids"].tolist() == ids
    # independent: a fresh model of the same weights with the rows written into its embedding tables
    plain = _peft(_tiny_causal_lm(tied))
    plain.load_state_dict({k: v for k, v in policy.state_dict().items() if "coreseg_token_rows" not in k})
    emb = plain.get_input_embeddings().weight
    want_in = emb[ids].detach() + rows.input_delta.detach()
    torch.testing.assert_close(exported["input"], want_in)
    write_rows_torch(plain.get_base_model(), exported)
    torch.testing.assert_close(plain.get_input_embeddings().weight[ids], want_in, rtol=0, atol=0)
    torch.testing.assert_close(got, plain(input_ids=x).logits, rtol=1e-5, atol=1e-5)
    with rows_disabled(rows):
        torch.testing.assert_close(policy(input_ids=x).logits, before, rtol=0, atol=0)


@pytest.mark.parametrize("tied", [True, False])
def test_only_the_rows_and_the_lora_train(tied):
    policy = _peft(_tiny_causal_lm(tied))
    rows = attach_token_rows(policy, [90])
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert {n for n in trainable if "coreseg_token_rows" in n} == (
        {"base_model.model.coreseg_token_rows.input_delta"} | (
            set() if tied else {"base_model.model.coreseg_token_rows.output_delta"}))
    assert all("lora_" in n or "coreseg_token_rows" in n for n in trainable)
    x = torch.tensor([[1, 90, 5, 90]])
    logits = policy(input_ids=x).logits
    logits[0, :, 90].sum().backward()  # the `<seg>` logits depend on the output row, the inputs at 90 on the input row
    assert rows.input_delta.grad.abs().sum() > 0
    if not tied:
        # d logit_90 / d output row = the final hidden states (summed over positions)
        assert rows.output_delta.grad.abs().sum() > 0
    assert policy.get_input_embeddings().weight.grad is None


def test_bad_rows_are_refused():
    model = _tiny_causal_lm(tied=False)
    with pytest.raises(ValueError, match="outside the embedding table"):
        write_rows_torch(model, {"ids": torch.tensor([96]), "input": torch.zeros(1, 32), "output": torch.zeros(1, 32)})
    with pytest.raises(ValueError, match="embeddings take"):
        write_rows_torch(model, {"ids": torch.tensor([5]), "input": torch.zeros(1, 16), "output": torch.zeros(1, 32)})
    with pytest.raises(ValueError, match="tied embeddings; this one's are untied"):
        write_rows_torch(model, {"ids": torch.tensor([5]), "input": torch.zeros(1, 32)})


def _spare_row_policy(src, dst, seg_id: int):
    """The tiny policy with `<seg>`'s input and output rows zeroed, as a spare row a real model never trained:
    its logit is 0 whatever the hidden state, while about half of the trained rows score above 0."""
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (dst / f.name).symlink_to(f.resolve())
    weights = load_file(str(src / "model.safetensors"))
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        weights[key][seg_id] = 0.0
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _seg_logprobs(core, samples):
    """Teacher-forced log-prob of `<seg>` at its place in each sample's SFT target."""
    from coreseg.common.protocol import Completion, RolloutGroup
    from coreseg.learner.sft import sft_target_ids

    tok, seg = core.module.processor.tokenizer, core.module.info.seg_token_id
    groups, where = [], []
    for s in samples:
        ids = sft_target_ids(tok, s, core.module.info.family)
        prompt = core.encoder.encode(s)["input_ids"][0].tolist()
        groups.append(RolloutGroup(s.id, [Completion("", prompt, ids, [0.0] * len(ids), "stop", core.version)]))
        where.append(ids.index(seg))
    out = core.forward(groups, samples)
    return [float(lp[i]) for lp, i in zip(out.logprobs, where)]


@pytest.mark.slow
def test_a_spare_seg_row_is_learnt_only_when_trainable_and_engines_agree(tiny_policy_dir, synth_samples, tmp_path):
    """SFT from a zeroed `<seg>` row (p ~ 3e-4 at its target place). With LoRA alone it stays unreachable: its
    logit is 0 for every hidden state while ~half of the 2048 random output rows score above 0, so p < 1/1000
    whatever LoRA does (asserted: < 0.005). With the rows trainable, the same 16 steps lift it above 0.05. The
    trained bundle then gives the same teacher-forced log-probs in vLLM (merged LoRA + rows written in place),
    the transformers engine and the learner."""
    import numpy as np
    from PIL import Image

    from coreseg.common.models.policy import policy_info
    from tests.test_learner import make_core
    from tests.test_rollout_engines import recompute_logprobs

    seg = policy_info(tiny_policy_dir).seg_token_id
    policy = _spare_row_policy(tiny_policy_dir, tmp_path / "spare", seg)
    samples, steps = synth_samples[:2], 16
    cores = {}
    for trainable in (False, True):
        core = make_core(policy, [f"model.train_token_rows={str(trainable).lower()}", "learner.mask_loss_weight=0"])
        assert max(_seg_logprobs(core, samples)) < np.log(0.005)  # untrained: unreachable in both arms
        for _ in range(steps):
            core.sft_step(samples, core.sft_norm(samples))
        cores[trainable] = (core, _seg_logprobs(core, samples))
    assert max(cores[False][1]) < np.log(0.005), cores[False][1]
    assert min(cores[True][1]) > np.log(0.05), cores[True][1]

    from vllm import SamplingParams

    from coreseg.rollout.hf_engine import HFEngine
    from coreseg.rollout.vllm_engine import VLLMEngine

    core = cores[True][0]
    bundle = core.export_weights().rollout_part()
    assert bundle.token_rows is not None and set(bundle.token_rows) == {"ids", "input", "output"}  # tiny: untied
    cfg = core.cfg
    hf = HFEngine(cfg, str(policy))
    hf.load_weights(bundle)
    vllm = VLLMEngine(cfg, str(policy))
    assert vllm.merged  # the CPU default
    vllm.load_weights(bundle)
    tok, family, s = hf.processor.tokenizer, core.module.info.family, samples[0]
    from coreseg.learner.sft import sft_target_ids
    target = tok.decode(sft_target_ids(tok, s, family), skip_special_tokens=False)
    out = vllm.llm.generate([{"prompt": family.prompt(s.question) + target,
                              "multi_modal_data": {"image": Image.fromarray(s.image)}}],
                            SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    n_prompt = len(hf.processor(text=[family.prompt(s.question)], images=[Image.fromarray(s.image)])["input_ids"][0])
    ids = list(out.prompt_token_ids)
    completion = ids[n_prompt:]
    assert seg in completion
    got = np.array([out.prompt_logprobs[n_prompt + j][t].logprob for j, t in enumerate(completion)])
    prompt_ids, want = recompute_logprobs(hf.model, hf.processor, s, completion)
    assert prompt_ids == ids[:n_prompt]
    np.testing.assert_allclose(got, want, atol=1e-4)
    from coreseg.common.protocol import Completion, RolloutGroup
    learner = core.forward([RolloutGroup(s.id, [Completion("", prompt_ids, completion, [0.0] * len(completion),
                                                                "stop", core.version)])], [s]).logprobs[0]
    np.testing.assert_allclose(learner, want, atol=1e-4)
    at = completion.index(seg)
    assert got[at] > np.log(0.05)
