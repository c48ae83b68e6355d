"""GRPO math (pure torch): group advantages, clipped policy loss with clip-higher, KL estimators,
loss aggregation modes.

Shapes: B completions, T completion tokens (right-padded), mask [B, T] with 1 on real tokens. The
ratio/KL math runs in at least float32: bf16 log-probs are upcast before the subtraction and exp().
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Sequence, Tuple

import numpy as np
import torch

from coreseg.learner.registry import register

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
KL_ESTIMATORS = ("k1", "k2", "k3")


@register("advantage", "grpo")
def grpo_advantages(rewards: torch.Tensor, eps: float) -> torch.Tensor:
    """(r - mean) / (std + eps) with the *population* std of the group (ddof=0, so a group's advantages have
    RMS 1 whatever G is)."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    return centred / (rewards.std(dim=1, keepdim=True, unbiased=False) + eps)


@register("advantage", "dr_grpo")
def dr_grpo_advantages(rewards: torch.Tensor, eps: float) -> torch.Tensor:
    """r - mean (no std, Dr.GRPO)."""
    return rewards - rewards.mean(dim=1, keepdim=True)


def group_advantages(rewards, mode: str = "grpo", eps: float = 1e-6,
                     drop_zero_variance: bool = False) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Advantages [P, G] (float64), keep [P] (bool), number of dropped groups, for rewards shaped [P, G].

    mode: a registered advantage estimator (`grpo`, `dr_grpo`) or an import path (learner/registry.py).
    A group whose rewards are all equal (max == min, so float round-off in the mean cannot hide it)
    gets advantage 0; with `drop_zero_variance` it is also marked keep=False and counted, and the caller
    removes it from the batch before the learner (DAPO dynamic sampling). Non-finite rewards are an error:
    they would poison the whole group.
    """
    from coreseg.learner.registry import resolve

    try:
        estimator = resolve("advantage", mode)
    except ValueError as err:
        raise ValueError(f"learner.advantage: {err}") from None
    if isinstance(rewards, torch.Tensor):
        r = rewards.detach().to("cpu", torch.float64).clone()
    else:
        r = torch.as_tensor(np.array(rewards, dtype=np.float64))
    if r.dim() != 2 or r.shape[1] == 0:
        raise ValueError(f"rewards must be [prompts, G] with G >= 1, got shape {tuple(r.shape)}")
    if not bool(torch.isfinite(r).all()):
        raise ValueError("rewards contain NaN or inf")
    adv = torch.as_tensor(estimator(r, eps), dtype=torch.float64)
    if adv.shape != r.shape:
        raise ValueError(f"advantage estimator {mode!r} returned shape {tuple(adv.shape)} for rewards {tuple(r.shape)}")
    zero_var = r.amax(dim=1) == r.amin(dim=1)
    adv[zero_var] = 0.0
    keep = ~zero_var if drop_zero_variance else torch.ones_like(zero_var)
    return adv, keep, int((~keep).sum())


def _masked(values: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """values with padding set to 0 (where, not multiply: a NaN/inf in padding must not leak), float mask."""
    if values.shape != mask.shape or values.dim() != 2:
        raise ValueError(f"values and mask must both be [B, T], got {tuple(values.shape)} and {tuple(mask.shape)}")
    valid = mask.bool()
    return torch.where(valid, values, torch.zeros((), dtype=values.dtype, device=values.device)), valid.to(values.dtype)


def partial_sum(values: torch.Tensor, mask: torch.Tensor, mode: str, max_len: int | None = None):
    """(numerator, units) of `aggregate` for one shard of a batch: the full-batch value is
    sum(numerators) / sum(units), so data-parallel shards and micro-batches combine exactly.
    Units are tokens for token_mean, sequences with >= 1 valid token for the per-sequence modes."""
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {mode!r}; expected one of {AGGREGATIONS}")
    v, m = _masked(values, mask)
    if mode == "token_mean":
        return v.sum(), float(m.sum())
    counts = m.sum(dim=1)
    has = counts > 0
    seq_sum = v.sum(dim=1)
    if mode == "seq_mean_token_mean":
        per_seq = seq_sum / counts.clamp(min=1)
    else:
        norm = float(values.shape[1] if max_len is None else max_len)
        if norm <= 0:
            raise ValueError(f"max_len must be positive, got {max_len}")
        per_seq = seq_sum / norm
    return (per_seq * has.to(per_seq.dtype)).sum(), float(has.sum())


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: str = "token_mean", max_len: int | None = None):
    """Reduce per-token values [B, T] under mask [B, T] to a scalar.

    token_mean: sum over all valid tokens of the batch / their count;
    seq_mean_token_mean: each sequence's mean over its valid tokens, then the mean over sequences;
    seq_mean_token_sum_norm (Dr.GRPO): each sequence's token sum / max_len (default T), mean over sequences.
    The per-sequence modes skip sequences with no valid token. An all-padding batch gives 0, still
    connected to the graph so backward() works.
    """
    numerator, units = partial_sum(values, mask, mode, max_len)
    return numerator / max(units, 1.0)


def _compute_dtype(logprobs: torch.Tensor) -> torch.dtype:
    """float32, or float64 when the log-probs already are."""
    return torch.promote_types(logprobs.dtype, torch.float32)


def per_token_policy_loss(logprobs, old_logprobs, advantages, clip_low: float, clip_high: float):
    """-min(r*A, clip(r, 1-clip_low, 1+clip_high)*A) per token [B, T] (float32 or wider), whether the clipped term
    was the one chosen (clipping changed the loss) [B, T] bool, and the ratio r = exp(logp - old) [B, T].
    advantages: [B] (one per completion) or [B, T] (per token)."""
    if logprobs.shape != old_logprobs.shape or logprobs.dim() != 2:
        raise ValueError(f"logprobs and old_logprobs must both be [B, T], got {tuple(logprobs.shape)} "
                         f"and {tuple(old_logprobs.shape)}")
    dtype = _compute_dtype(logprobs)
    adv = torch.as_tensor(advantages).to(device=logprobs.device, dtype=dtype)
    if adv.dim() == 1 and adv.shape[0] == logprobs.shape[0]:
        adv = adv.unsqueeze(1)
    elif adv.shape != logprobs.shape:
        raise ValueError(f"advantages must be [B] or [B, T] for logprobs {tuple(logprobs.shape)}, "
                         f"got {tuple(adv.shape)}")
    ratio = torch.exp(logprobs.to(dtype) - old_logprobs.detach().to(dtype))
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    return -torch.minimum(unclipped, clipped), clipped < unclipped, ratio


@register("policy_loss", "ppo_clip")
def ppo_clip(logprobs, old_logprobs, advantages, cfg):
    """The clipped surrogate with clip-higher (DAPO): `per_token_policy_loss` with cfg.clip_low/clip_high."""
    return per_token_policy_loss(logprobs, old_logprobs, advantages, cfg.clip_low, cfg.clip_high)


def kl_penalty(logprobs, ref_logprobs, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimators [B, T] (float32 or wider) of KL(pi || ref) for tokens sampled from pi (Schulman, 2020):
    k1 = logp - ref (unbiased, high variance, can be negative); k2 = (logp - ref)^2 / 2 (biased, >= 0);
    k3 = exp(ref - logp) - (ref - logp) - 1 (unbiased, >= 0). The reference is a constant (detached)."""
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} differ")
    dtype = _compute_dtype(logprobs)
    log_ratio = logprobs.to(dtype) - ref_logprobs.detach().to(dtype)
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio ** 2
    if estimator == "k3":
        return torch.exp(-log_ratio) + log_ratio - 1.0
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


@dataclass(frozen=True)
class LossNorm:
    """Global normalisers of one update, computed from the whole batch before it is split over ranks and
    micro-batches, so the sum of the shards' losses is the full-batch loss: `units` divides the policy and
    KL sums (tokens for token_mean, non-empty sequences otherwise), `masks` the DiceCE sum (completions with a
    `<seg>`), `tokens` the clipped-token count."""
    units: float
    tokens: float
    masks: float


def loss_norm(completion_lengths: Sequence[int], num_masks: int, agg: str) -> LossNorm:
    if agg not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {agg!r}; expected one of {AGGREGATIONS}")
    tokens = float(sum(completion_lengths))
    units = tokens if agg == "token_mean" else float(sum(1 for n in completion_lengths if n > 0))
    return LossNorm(max(units, 1.0), tokens, float(num_masks))


def grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, *, cfg, max_len: int | None = None,
              dice_sum: torch.Tensor | None = None, norm: LossNorm | None = None):
    """The GRPO loss of one shard (micro-batch) and its stats; this is what the learner backpropagates.

    loss = policy_sum / units + kl_beta * kl_sum / units + mask_loss_weight * dice_sum / masks, where the sums
    run over this shard (aggregation `cfg.loss_agg`, see `partial_sum`), the policy term is the registered
    `cfg.policy_loss` and the KL term (skipped when `ref_logprobs` is None or kl_beta = 0) is `cfg.kl_estimator`.
    `norm` holds the whole batch's normalisers (`loss_norm`); None = this shard is the whole batch.
    cfg: LearnerConfig (or any object with its loss fields). Every stat is this shard's share, so the stats of
    all shards add up to the full batch's: pg_loss, kl, dice_ce, loss, clip_frac (clipped tokens / tokens),
    ratio_mean (ratio summed over tokens / tokens), tokens; ratio_max combines by max.
    """
    from coreseg.learner.registry import resolve

    per_tok, clipped, ratio = resolve("policy_loss", cfg.policy_loss)(logprobs, old_logprobs, advantages, cfg)
    pg_sum, units = partial_sum(per_tok, mask, cfg.loss_agg, max_len)
    valid = mask.bool()
    if norm is None:
        norm = LossNorm(max(units, 1.0), float(valid.sum()), 1.0 if dice_sum is not None else 0.0)
    loss = pg_sum / norm.units
    stats = {"pg_loss": float(pg_sum.detach()) / norm.units}
    if ref_logprobs is not None and cfg.kl_beta > 0:
        kl_sum, _ = partial_sum(kl_penalty(logprobs, ref_logprobs, cfg.kl_estimator), mask, cfg.loss_agg, max_len)
        loss = loss + cfg.kl_beta * kl_sum / norm.units
        stats["kl"] = float(kl_sum.detach()) / norm.units
    if dice_sum is not None and norm.masks > 0:
        loss = loss + cfg.mask_loss_weight * dice_sum / norm.masks
        stats["dice_ce"] = float(dice_sum.detach()) / norm.masks
    else:
        stats["dice_ce"] = 0.0
    with torch.no_grad():
        tokens = max(norm.tokens, 1.0)
        stats.update(loss=float(loss.detach()), tokens=float(valid.sum()),
                     clip_frac=float((clipped & valid).sum()) / tokens,
                     ratio_mean=float(ratio[valid].sum()) / tokens,
                     ratio_max=float(ratio[valid].max()) if bool(valid.any()) else 1.0)
    return loss, stats


def combine_stats(shards: Sequence[Dict[str, float]]) -> Dict[str, float]:
    """Stats of a batch from its shards' (`grpo_loss`/`sft_loss`): sums, except ratio_max (max)."""
    keys = [k for k in shards[0] if all(k in s for s in shards)]
    return {k: float(max(s[k] for s in shards) if k == "ratio_max" else sum(s[k] for s in shards)) for k in keys}
