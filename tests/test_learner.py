"""The DeepSpeed learner on the tiny model (CPU, gloo, ZeRO-2), in-process."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from coreseg.common.config import load_config
from coreseg.common.protocol import Completion, RolloutGroup
from coreseg.learner.grpo import loss_norm
from coreseg.learner.sft import sft_target_ids

pytestmark = pytest.mark.slow  # real stack: Ray, DeepSpeed, vLLM

OVERRIDES = ["learner.micro_batch_size=4", "model.lora_r=8", "learner.lr=5e-3", "learner.sft_lr=1e-2", "learner.adapter_lr=1e-3",
             "learner.kl_beta=0.0", "learner.mask_loss_weight=0.1"]


def make_core(policy_dir, extra=()):
    from coreseg.learner.worker import LearnerCore, free_port

    # the process group is created by the first core of this process and reused by the later ones
    return LearnerCore(load_config("tiny_cpu", OVERRIDES + list(extra)), str(policy_dir), master_port=free_port())


def _groups(core, samples, g=2, cut=24):
    tok = core.module.processor.tokenizer
    groups = []
    for s in samples:
        ids = sft_target_ids(tok, s, core.module.info.family)
        parts = [ids[k * cut:(k + 1) * cut - 4 * k] for k in range(g)]  # distinct token spans, unequal lengths
        prompt = core.encoder.encode(s)["input_ids"][0].tolist()  # as an engine tokenizes the rendered prompt
        comps = [Completion("", prompt, p, [0.0] * len(p), "length", core.version) for p in parts]
        groups.append(RolloutGroup(s.id, comps))
    return groups


@pytest.fixture(scope="module")
def core(tiny_policy_dir):
    return make_core(tiny_policy_dir)


def test_grpo_update_moves_logprobs_with_advantages(core, synth_samples):
    samples = synth_samples[:2]
    groups = _groups(core, samples)
    before = core.forward(groups, samples)
    adv = np.array([1.0, -1.0, 1.0, -1.0])
    lengths = [len(c.token_ids) for g in groups for c in g.completions]
    stats = core.update(groups, samples, adv, before.ref_logprobs,
                        loss_norm(lengths, int(before.seg_found.sum()), "token_mean"))
    after = core.forward(groups, samples)
    sums = lambda r: np.array([x.sum() for x in r.logprobs])  # noqa: E731
    delta = sums(after) - sums(before)
    assert delta[0] > 0 and delta[2] > 0 and delta[1] < 0 and delta[3] < 0
    assert np.isfinite(stats["pg_loss"]) and stats["tokens"] == 88 and core.version == 1
    assert before.ref_logprobs == [] and "kl" not in stats  # kl_beta = 0: no reference pass, no KL term


def test_bundle_loads_into_hf_peft_with_identical_logits(core, tiny_policy_dir, synth_samples):
    from peft import get_peft_model, set_peft_model_state_dict

    from coreseg.common.models.policy import load_policy
    from coreseg.common.models.token_rows import write_rows_torch
    from coreseg.rollout.lora_io import lora_config_from_dict

    bundle = core.export_weights()
    assert bundle.version == core.version and bundle.lora and bundle.adapter and bundle.mask_decoder
    model, processor = load_policy(tiny_policy_dir)
    peft_model = get_peft_model(model, lora_config_from_dict(bundle.peft_config))
    set_peft_model_state_dict(peft_model, bundle.lora)
    assert bundle.token_rows is not None  # trained `<seg>` rows (model.train_token_rows, the default)
    write_rows_torch(peft_model.get_base_model(), bundle.token_rows)
    groups = _groups(core, synth_samples[:1], g=1)
    from coreseg.learner.batch import build_batch
    batch = build_batch(core.encoder, synth_samples[:1], [groups[0].completions[0].token_ids], core.pad_id)
    with torch.no_grad():
        want = core.module.policy(**batch.model_inputs("cpu")).logits
        got = peft_model.eval()(**batch.model_inputs("cpu")).logits
    # the learner forms the `<seg>` logits as hidden @ rows^T, the plain model in its full GEMM: rounding apart
    torch.testing.assert_close(want, got, rtol=0, atol=1e-5)


def test_checkpoint_round_trip_is_bit_exact(tiny_policy_dir, synth_samples, tmp_path):
    a = make_core(tiny_policy_dir)
    samples = synth_samples[:4]
    counts = a.sft_norm(samples)
    a.sft_step(samples, counts)
    a.save_checkpoint(str(tmp_path / "ckpt"))
    a.sft_step(samples, counts)
    want = a.export_weights()
    b = make_core(tiny_policy_dir)
    b.load_checkpoint(str(tmp_path / "ckpt"))
    assert b.version == 1
    b.sft_step(samples, counts)
    got = b.export_weights()
    assert got.version == want.version == 2
    for part in ("lora", "adapter", "mask_decoder"):
        for k, v in getattr(want, part).items():
            assert torch.equal(v, getattr(got, part)[k]), (part, k)
    from peft import PeftModel
    from coreseg.common.models.policy import load_policy
    PeftModel.from_pretrained(load_policy(tiny_policy_dir)[0], str(tmp_path / "ckpt" / "peft"))


def test_sft_loss_halves(tiny_policy_dir, synth_samples):
    core = make_core(tiny_policy_dir, ["learner.micro_batch_size=8"])
    train = synth_samples[:32]  # SFT ignores the split; 32 samples as 4 batches of 8
    batches = [train[i:i + 8] for i in range(0, len(train), 8)]
    losses = []
    for step in range(60):
        batch = batches[step % len(batches)]
        stats = core.sft_step(batch, core.sft_norm(batch))
        losses.append(stats["ce"])
        assert np.isfinite(stats["ce"] + stats["dice_ce"]) and stats["lr"] == core.cfg.learner.sft_lr
        if len(losses) >= 4 and max(losses[-4:]) < 0.5 * losses[0]:  # a whole pass over the 32 samples
            break
    assert max(losses[-4:]) < 0.5 * losses[0], losses


def test_reference_is_the_policy_at_grpo_start(tiny_policy_dir, synth_samples, tmp_path):
    from coreseg.learner.batch import build_batch, per_completion

    core = make_core(tiny_policy_dir, ["learner.kl_beta=0.01"])
    sft = [replace(s, reasoning=s.reasoning[:40]) for s in synth_samples[:8]]
    for _ in range(3):  # SFT moves the LoRA away from the base model
        core.sft_step(sft, core.sft_norm(sft))
    samples = synth_samples[:2]
    groups = _groups(core, samples)
    first = core.forward(groups, samples)
    # at GRPO start the reference is the policy itself, not the base model
    np.testing.assert_allclose(np.concatenate(first.ref_logprobs), np.concatenate(first.logprobs), atol=1e-6)
    batch = build_batch(core.encoder, samples[:1], [groups[0].completions[0].token_ids], core.pad_id)
    with torch.no_grad(), core.module.policy.disable_adapter():
        base = core.module.policy_pass(batch, with_hidden=False)[0]
    (base,) = [x.numpy() for x in per_completion(base, batch)]
    assert base.shape == first.ref_logprobs[0].shape and np.abs(base - first.ref_logprobs[0]).max() > 1e-3
    lengths = [len(c.token_ids) for g in groups for c in g.completions]
    core.update(groups, samples, np.array([1.0, -1.0, 1.0, -1.0]), first.ref_logprobs,
                loss_norm(lengths, int(first.seg_found.sum()), "token_mean"))
    second = core.forward(groups, samples)
    assert np.abs(np.concatenate(second.logprobs) - np.concatenate(first.logprobs)).max() > 1e-4
    np.testing.assert_allclose(np.concatenate(second.ref_logprobs), np.concatenate(first.ref_logprobs), atol=1e-6)
    core.save_checkpoint(str(tmp_path / "ckpt"))  # the reference survives a checkpoint
    other = make_core(tiny_policy_dir, ["learner.kl_beta=0.01"])
    other.load_checkpoint(str(tmp_path / "ckpt"))
    again = other.forward(groups, samples)
    np.testing.assert_allclose(np.concatenate(again.ref_logprobs), np.concatenate(first.ref_logprobs), atol=1e-6)


def test_base_reference_is_the_adapter_switched_off(tiny_policy_dir, synth_samples):
    from coreseg.common.models.token_rows import rows_disabled
    from coreseg.learner.batch import build_batch, per_completion

    core = make_core(tiny_policy_dir, ["learner.kl_beta=0.01", "learner.reference=base",
                                       "learner.micro_batch_size=1"])
    sft = [replace(s, reasoning=s.reasoning[:40]) for s in synth_samples[:8]]
    core.sft_step(sft, core.sft_norm(sft))  # the LoRA differs from zero, so base != policy
    lora = {n: p.detach().clone() for n, p in core.module.policy.named_parameters() if p.requires_grad}
    samples = synth_samples[:2]
    groups = _groups(core, samples)
    result = core.forward(groups, samples)  # 4 micro-batches of one completion each
    comps = [(s, c) for s, g in zip(samples, groups) for c in g.completions]
    for (sample, comp), ref, old in zip(comps, result.ref_logprobs, result.logprobs):
        batch = build_batch(core.encoder, [sample], [comp.token_ids], core.pad_id)
        # the base model: LoRA off and `<seg>`'s trained rows off
        with torch.no_grad(), core.module.policy.disable_adapter(), rows_disabled(core.module.token_rows):
            (want,) = [x.numpy() for x in per_completion(core.module.policy_pass(batch, with_hidden=False)[0], batch)]
        # the learner packs its batches (learner.packed): the same values up to float round-off
        np.testing.assert_allclose(ref, want, rtol=1e-6, atol=1e-6)
        assert np.abs(old - ref).max() > 1e-4
    for n, p in core.module.policy.named_parameters():  # the forward left the trained LoRA in place
        if n in lora:
            assert torch.equal(p, lora[n]), n


def test_the_backpropagated_grpo_loss_is_the_tested_formula(tiny_policy_dir, synth_samples, monkeypatch):
    """Hooks the real update: the loss DeepSpeed backpropagates equals an independent numpy computation of
    the GRPO loss (clipped surrogate, k3 KL, DiceCE term) on the log-probs of that very pass."""
    core = make_core(tiny_policy_dir, ["learner.kl_beta=0.05", "learner.micro_batch_size=2"])
    samples = synth_samples[:2]
    groups = _groups(core, samples)
    full = sft_target_ids(core.module.processor.tokenizer, samples[0], core.module.info.family)  # holds a <seg>
    groups[0].completions[0] = replace(groups[0].completions[0], token_ids=full, logprobs=[0.0] * len(full))
    fwd = core.forward(groups, samples)
    assert fwd.seg_found.sum() == 1
    passes, losses, dice_sums = [], [], []
    real_pass, real_backward, real_dice = core.module.policy_pass, core.engine.backward, core._dice_sum
    monkeypatch.setattr(core.module, "policy_pass", lambda batch, **kw: passes.append((batch, real_pass(batch, **kw)))
                        or passes[-1][1])
    monkeypatch.setattr(core.engine, "backward", lambda loss, **kw: losses.append(loss.item()) or real_backward(loss, **kw))
    monkeypatch.setattr(core, "_dice_sum", lambda *a: dice_sums.append(real_dice(*a)) or dice_sums[-1])
    adv = np.array([1.5, -0.5, -1.0, 0.25])
    lengths = [len(c.token_ids) for g in groups for c in g.completions]
    masks = int(fwd.seg_found.sum())
    core.update(groups, samples, adv, fwd.ref_logprobs, loss_norm(lengths, masks, "token_mean"))
    assert len(losses) == 2 and len(passes) == 2  # two micro-batches of two completions
    assert float(dice_sums[0]) > 0 and float(dice_sums[1]) == 0
    total_tokens = sum(lengths)
    for k, ((batch, (logp, _, _)), loss) in enumerate(zip(passes, losses)):
        rows = range(2 * k, 2 * k + 2)
        expected = 0.0
        for i, row in enumerate(rows):
            p, n = batch.prompt_lens[i], batch.completion_lens[i]
            lp = logp[i, p:p + n].detach().double().numpy()
            ref = fwd.ref_logprobs[row].astype(np.float64)
            # on-policy: ratio 1, so the surrogate is -A per token; k3 KL against the reference
            expected += (-adv[row] * n + 0.05 * (np.exp(ref - lp) - (ref - lp) - 1).sum()) / total_tokens
        expected += 0.1 * float(dice_sums[k]) / masks
        assert loss == pytest.approx(expected, rel=1e-5), k  # world size 1: loss * world == loss


def test_on_policy_ratio_is_exactly_one_with_lora_dropout(tiny_policy_dir, synth_samples):
    """With LoRA dropout the update runs in train mode; old log-probs taken in eval mode would put dropout noise
    into the ratio (and the clip). On-policy, the ratio must be exactly 1 and nothing clipped."""
    core = make_core(tiny_policy_dir, ["model.lora_dropout=0.3"])
    samples = synth_samples[:2]
    groups = _groups(core, samples)
    sft = [replace(s, reasoning=s.reasoning[:40]) for s in synth_samples[:4]]
    core.sft_step(sft, core.sft_norm(sft))  # a non-zero LoRA, so dropout changes the log-probs
    groups = _groups(core, samples)
    fwd = core.forward(groups, samples)
    lengths = [len(c.token_ids) for g in groups for c in g.completions]
    stats = core.update(groups, samples, np.array([1.0, -1.0, 2.0, -2.0]), fwd.ref_logprobs,
                        loss_norm(lengths, int(fwd.seg_found.sum()), "token_mean"))
    assert stats["ratio_max"] == 1.0 and stats["ratio_mean"] == pytest.approx(1.0, abs=1e-12)
    assert stats["clip_frac"] == 0.0


def test_stale_completions_use_their_sampling_logprobs(tiny_policy_dir, synth_samples):
    """A completion sampled by an older version (async generation) takes its ratio against the engine's
    sampling log-probs: with sampling log-probs = the policy's own minus log(2), every ratio is 2."""
    core = make_core(tiny_policy_dir, ["learner.clip_high=5.0"])
    samples = synth_samples[:2]
    groups = _groups(core, samples)
    fwd = core.forward(groups, samples)
    stale = [RolloutGroup(g.sample_id, [replace(c, version=core.version - 1, logprobs=list(lp - np.log(2.0)))
                                        for c, lp in zip(g.completions, fwd.logprobs[2 * k:2 * k + 2])])
             for k, g in enumerate(groups)]
    lengths = [len(c.token_ids) for g in groups for c in g.completions]
    stats = core.update(stale, samples, np.array([1.0, -1.0, 1.0, -1.0]), fwd.ref_logprobs,
                        loss_norm(lengths, int(fwd.seg_found.sum()), "token_mean"))
    assert stats["ratio_max"] == pytest.approx(2.0, rel=1e-4) and stats["ratio_mean"] == pytest.approx(2.0, rel=1e-4)


class _Payload:
    """Unpickling this runs a command: what a crafted checkpoint file would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_pickle_in_a_checkpoint_does_not_execute(tiny_policy_dir, tmp_path):
    from coreseg.learner.checkpoint import UnsafeCheckpointError

    core = make_core(tiny_policy_dir)
    core.save_checkpoint(str(tmp_path / "ckpt"))
    core.load_checkpoint(str(tmp_path / "ckpt"))  # DeepSpeed's own files load with weights_only=True
    marker = tmp_path / "pwned"
    target = tmp_path / "ckpt" / "deepspeed" / "state" / "mp_rank_00_model_states.pt"
    torch.save({"module": _Payload(marker)}, target)
    with pytest.raises(UnsafeCheckpointError, match="mp_rank_00_model_states.pt"):
        core.load_checkpoint(str(tmp_path / "ckpt"))
    assert not marker.exists()
    assert torch.load is not None and torch.load.__module__.startswith("torch")  # the real torch.load is back


def test_optimizer_learning_rates_follow_the_schedule(tiny_policy_dir, synth_samples):
    """Both optimizer groups carry base lr x the schedule's factor at every step, and Adam's first step moves the
    weights by that rate (|update| = lr * |g| / (|g| + eps) ~ lr for the largest gradients)."""
    core = make_core(tiny_policy_dir, ["run.sft_steps=4", "learner.sft_lr_schedule=cosine",
                                       "learner.sft_lr_warmup_steps=2", "learner.lr_min_ratio=0.1", "run.steps=4",
                                       "learner.lr_schedule=linear"])
    L = core.cfg.learner
    groups = core.optimizer.param_groups  # DeepSpeed's ZeRO optimizer exposes the wrapped AdamW's groups
    lora_b = {n: p.detach().clone() for n, p in core.module.named_parameters() if "lora_B" in n and p.requires_grad}
    heads = [p.detach().clone() for p in core.module.param_groups()[1]]
    batch = synth_samples[:4]
    # hand values: warmup (k+1)/2 for k < 2, then 0.1 + 0.9 * 0.5 * (1 + cos(pi * (k - 2) / 2))
    want = [0.5, 1.0, 1.0, 0.55]
    for k, factor in enumerate(want):
        stats = core.sft_step(batch, core.sft_norm(batch), step=k)
        assert stats["lr"] == pytest.approx(1e-2 * factor)
        assert [g["lr"] for g in groups] == pytest.approx([L.sft_lr * factor, L.adapter_lr * factor])
        if k == 0:
            moved = max(float((p.detach() - lora_b[n]).abs().max()) for n, p in core.module.named_parameters()
                        if n in lora_b)
            assert moved == pytest.approx(1e-2 * 0.5, rel=1e-3)
            moved = max(float((p.detach() - h).abs().max()) for p, h in zip(core.module.param_groups()[1], heads))
            assert moved == pytest.approx(1e-3 * 0.5, rel=1e-3)
    # GRPO: linear from 1 at step 0 to 0.1 at step 4: step 2 -> 0.1 + 0.9 * 0.5
    samples = synth_samples[:2]
    g = _groups(core, samples)
    lengths = [len(c.token_ids) for gr in g for c in gr.completions]
    stats = core.update(g, samples, np.array([1.0, -1.0, 1.0, -1.0]), [], loss_norm(lengths, 2, "token_mean"), step=2)
    assert stats["lr"] == pytest.approx(5e-3 * 0.55)
    assert [gr["lr"] for gr in groups] == pytest.approx([L.lr * 0.55, L.adapter_lr * 0.55])
