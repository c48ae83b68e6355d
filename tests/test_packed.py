"""Packed learner batches (learner/packed.py, learner/prefix_attention.py) against the padded one-row-per-completion
path on the tiny Qwen2.5-VL with LoRA and `<seg>` rows: same log-probs, `<seg>` states, GRPO loss, reference
log-probs and every trainable parameter's gradient (fp32). In-process, no Ray or DeepSpeed; the tests that load
the model are marked slow (~40 s together), the attention tests are fast."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from coreseg.common.config import load_config
from coreseg.learner.batch import PromptEncoder, build_batch, per_completion
from coreseg.learner.grpo import grpo_loss
from coreseg.learner.losses import dice_ce_loss
from coreseg.learner.packed import build_packed
from coreseg.learner.prefix_attention import prefix_layout, shared_prefix_attention
from coreseg.learner.sft import sft_target_ids

RTOL = 1e-5


def _reference_attention(q, k, v, seqs, scale):
    """Each sequence (a list of row positions, its own order) attends causally over itself alone: plain softmax
    attention written out, one sequence at a time. Returns {position: output [H, d]} (the last occurrence wins,
    which for a shared prompt position is the same value)."""
    out = {}
    n_rep = q.shape[1] // k.shape[1]
    for seq in seqs:
        idx = torch.as_tensor(seq)
        qs = q[0][:, idx]
        ks, vs = (x[0][:, idx].repeat_interleave(n_rep, 0) for x in (k, v))
        scores = qs @ ks.transpose(-1, -2) * scale
        scores = scores.masked_fill(torch.ones(len(seq), len(seq)).triu(1).bool(), float("-inf"))
        o = torch.softmax(scores, -1) @ vs  # [H, n, d]
        out.update({int(p): o[:, j] for j, p in enumerate(seq)})
    return out


def test_shared_prefix_attention_is_each_sequence_alone():
    torch.manual_seed(0)
    prompts, comps = [5, 3], [[2, 4, 1], [3]]
    layout = prefix_layout(prompts, comps)
    L = layout.length
    assert L == 5 + 7 + 3 + 3
    q, k, v = torch.randn(1, 4, L, 8), torch.randn(1, 2, L, 8), torch.randn(1, 2, L, 8)
    seqs, at = [], 0
    for p, lens in zip(prompts, comps):
        prompt = list(range(at, at + p))
        at += p
        for n in lens:
            seqs.append(prompt + list(range(at, at + n)))
            at += n
    want = _reference_attention(q, k, v, seqs, 0.3)
    got = shared_prefix_attention(q, k, v, layout, 0.3)[0]  # [L, H, d]
    for pos in range(L):
        torch.testing.assert_close(got[pos], want[pos], rtol=1e-5, atol=1e-6)


def test_layout_rejects_empty_completion():
    with pytest.raises(ValueError, match="non-empty completions"):
        prefix_layout([4], [[2, 0]])


@pytest.fixture(scope="module")
def module(tiny_policy_dir):
    from coreseg.learner.model import CoreSegModule

    cfg = load_config("tiny_cpu", ["model.lora_r=8", "learner.kl_beta=0.05", "learner.reference=base"])
    m = CoreSegModule(cfg, str(tiny_policy_dir))
    assert m.packed  # the default for Qwen2.5-VL
    torch.manual_seed(1)
    with torch.no_grad():  # LoRA B starts at 0 and the token rows' delta too: move them so they matter
        for p in m.policy.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return m


@pytest.fixture(scope="module")
def rows(module, synth_samples):
    """Groups of G = 3, 1, 2 with ragged completions ending in `<seg>` spans; the second group's image is bigger
    (more vision tokens), so the groups' prompts differ in length."""
    from coreseg.common.synth import generate

    big = generate(1, image_size=168, seed=3, progress=False)[0]
    tok = module.processor.tokenizer
    encoder = PromptEncoder(module.processor, module.info.family, module.cfg.model.system_prompt)
    out = []
    for sample, g in ((synth_samples[0], 3), (big, 1), (synth_samples[1], 2)):
        target = sft_target_ids(tok, sample, module.info.family)
        prompt = encoder.encode(sample)["input_ids"][0].tolist()
        for k in range(g):
            out.append((sample, prompt, target[k * 3:len(target) - 2 * k]))  # distinct starts, unequal lengths
    assert len({len(p) for _, p, _ in out}) >= 2 and any(module.info.seg_token_id in c for _, _, c in out)
    return encoder, out


def _batches(module, encoder, rows):
    samples, prompts, comps = zip(*rows)
    naive = build_batch(encoder, samples, comps, module.processor.tokenizer.pad_token_id, prompts)
    packed = build_packed(encoder, samples, comps, module.prompt_positions, prompts)
    return naive, packed


def _loss(module, batch, samples, adv, ref):
    """The GRPO loss with KL and the DiceCE on the `<seg>` states, as the learner computes it."""
    logp, states, found = module.policy_pass(batch)
    mask = batch.completion_mask
    ref_t = torch.zeros_like(logp)
    for i, r in enumerate(ref):
        ref_t[i, batch.prompt_lens[i]:batch.prompt_lens[i] + len(r)] = r
    idx = found.nonzero(as_tuple=True)[0]
    (logits, target), = module.mask_loss_pair(states[idx], [samples[int(i)] for i in idx])
    dice, _ = dice_ce_loss(logits, target, 1.0, 1.0)
    loss, _ = grpo_loss(logp, logp.detach() - 0.01, ref_t, adv, mask, cfg=module.cfg.learner,
                        dice_sum=dice * len(idx))
    return loss, logp, states, found


def _rel(a, b):
    return float((a - b).norm() / max(float(b.norm()), 1e-12))


@pytest.mark.slow
def test_packed_matches_padded_rows(module, rows):
    encoder, rs = rows
    naive, packed = _batches(module, encoder, rs)
    assert packed.input_ids.shape[1] == sum(packed.group_prompt_lens) + sum(len(c) for _, _, c in rs)
    assert len(packed.group_prompt_lens) == 3
    samples = [s for s, _, _ in rs]
    adv = torch.tensor([1.0, -0.5, 0.3, 0.8, -1.0, 0.4])
    module.eval()
    with torch.no_grad(), module.reference_policy():
        ref_n = per_completion(module.policy_pass(naive, with_hidden=False)[0], naive)
        ref_p = per_completion(module.policy_pass(packed, with_hidden=False)[0], packed)
    for a, b in zip(ref_n, ref_p):
        assert _rel(b, a) <= RTOL
    module.train()
    results = []
    for batch in (naive, packed):
        module.zero_grad(set_to_none=True)
        loss, logp, states, found = _loss(module, batch, samples, adv, ref_n)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad and p.grad is not None}
        results.append((loss.detach(), per_completion(logp.detach(), batch), states.detach(), found, grads))
    (ln, lpn, sn, fn, gn), (lp, lpp, sp, fp, gp) = results
    assert bool(fn.any()) and torch.equal(fn, fp)
    assert math.isclose(float(lp), float(ln), rel_tol=RTOL)
    for a, b in zip(lpn, lpp):
        assert a.shape == b.shape and _rel(b, a) <= RTOL
    assert _rel(sp, sn) <= RTOL
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    lora = [n for n in trainable if "lora_" in n]
    assert lora and set(gn) == set(gp) and set(lora) <= set(gn)
    assert any("token_rows" in n for n in gn) and any("mask_decoder" in n for n in gn)
    # a gradient that is 0 in exact arithmetic (a key bias: softmax ignores a shift shared by all keys) holds
    # only round-off in both paths; it is compared against the largest gradient's scale instead of its own
    scale = max(float(g.norm()) for g in gn.values())
    worst = max((float((gp[n] - gn[n]).norm()) / max(float(gn[n].norm()), 1e-4 * scale), n) for n in gn)
    assert worst[0] <= RTOL, worst
    module.zero_grad(set_to_none=True)


@pytest.mark.slow
def test_vision_features_are_computed_once_per_image(module, rows):
    encoder, rs = rows
    _, packed = _batches(module, encoder, rs)
    module._vision = type(module._vision)(1 << 30)
    calls = []
    family = module.info.family
    original = family.image_features
    family.image_features = lambda model, inputs: calls.append(len(inputs)) or original(model, inputs)
    try:
        with torch.no_grad():
            module.policy_pass(packed)
            module.policy_pass(packed, with_hidden=False)
    finally:
        del family.image_features
    assert calls == [3]  # three distinct images, one vision call for the first pass, none for the second


@pytest.mark.slow
def test_packed_off_keeps_the_padded_rows(tiny_policy_dir):
    from coreseg.learner.model import CoreSegModule
    from coreseg.learner.prefix_attention import ATTENTION_NAME

    m = CoreSegModule(load_config("tiny_cpu", ["learner.packed=false"]), str(tiny_policy_dir))
    assert not m.packed
    assert m.policy.get_base_model().config.get_text_config()._attn_implementation != ATTENTION_NAME
