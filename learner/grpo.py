"""GRPO math (pure torch): group advantages, clipped policy loss with clip-higher, KL estimators,
loss aggregation modes."""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch


def group_advantages(rewards, mode: str = "grpo", eps: float = 1e-6,
                     drop_zero_variance: bool = False) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Advantages for rewards shaped [prompts, G].

    grpo: (r - mean) / (std + eps), std the population std of the group (ddof=0);
    dr_grpo: r - mean. Zero-variance groups get advantage 0; with `drop_zero_variance` they are also
    marked keep=False (DAPO dynamic sampling) and counted.
    """
    r = torch.as_tensor(np.asarray(rewards, dtype=np.float64))
    if r.dim() != 2:
        raise ValueError(f"rewards must be [prompts, G], got shape {tuple(r.shape)}")
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True, unbiased=False)
    centred = r - mean
    if mode == "grpo":
        adv = centred / (std + eps)
    elif mode == "dr_grpo":
        adv = centred
    else:
        raise ValueError(f"unknown advantage mode {mode!r}")
    zero_var = std.squeeze(1) == 0
    adv[zero_var] = 0.0
    keep = ~zero_var if drop_zero_variance else torch.ones_like(zero_var)
    return adv, keep, int((~keep).sum())


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: str = "token_mean", max_len: int | None = None):
    """Reduce per-token values [B, T] under mask [B, T] to a scalar."""
    mask = mask.to(values.dtype)
    if mode == "token_mean":
        return (values * mask).sum() / mask.sum().clamp(min=1)
    per_seq_sum = (values * mask).sum(dim=1)
    counts = mask.sum(dim=1)
    has = counts > 0
    if mode == "seq_mean_token_mean":
        per_seq = per_seq_sum[has] / counts[has]
    elif mode == "seq_mean_token_sum_norm":
        per_seq = per_seq_sum[has] / float(max_len or values.shape[1])
    else:
        raise ValueError(f"unknown loss aggregation {mode!r}")
    return per_seq.mean() if per_seq.numel() else values.sum() * 0.0


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_low: float = 0.2, clip_high: float = 0.28,
                agg: str = "token_mean", max_len: int | None = None) -> Tuple[torch.Tensor, Dict[str, float]]:
    """PPO-style clipped surrogate with separate lower/upper clip ranges (clip-higher)."""
    per_token, was_clipped, ratio = per_token_policy_loss(logprobs, old_logprobs, advantages, clip_low, clip_high)
    loss = aggregate(per_token, mask, agg, max_len)
    valid = mask.bool()
    was_clipped = was_clipped & valid
    n = valid.sum().clamp(min=1)
    stats = {"clip_frac": float(was_clipped.sum() / n),
             "ratio_mean": float((ratio * valid).sum() / n),
             "ratio_max": float(ratio[valid].max()) if valid.any() else 1.0}
    return loss, stats


def per_token_policy_loss(logprobs, old_logprobs, advantages, clip_low: float, clip_high: float):
    """-min(r*A, clip(r, 1-clip_low, 1+clip_high)*A) per token, whether clipping chose the term, and r."""
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages.to(logprobs.dtype).unsqueeze(1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    return -torch.minimum(unclipped, clipped), clipped < unclipped, ratio


def partial_sum(values: torch.Tensor, mask: torch.Tensor, mode: str, max_len: int | None = None):
    """(numerator, units) of `aggregate` for one shard of a batch: the full-batch value is
    sum(numerators) / sum(units), so data-parallel shards and micro-batches combine exactly."""
    mask = mask.to(values.dtype)
    if mode == "token_mean":
        return (values * mask).sum(), float(mask.sum())
    counts = mask.sum(dim=1)
    has = counts > 0
    seq_sum = (values * mask).sum(dim=1)[has]
    if mode == "seq_mean_token_mean":
        return (seq_sum / counts[has]).sum(), float(has.sum())
    if mode == "seq_mean_token_sum_norm":
        return (seq_sum / float(max_len or values.shape[1])).sum(), float(has.sum())
    raise ValueError(f"unknown loss aggregation {mode!r}")


def kl_penalty(logprobs, ref_logprobs, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimators of KL(pi || ref) for tokens sampled from pi (Schulman's k1/k2/k3)."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio ** 2
    if estimator == "k3":
        return torch.exp(-log_ratio) + log_ratio - 1.0
    raise ValueError(f"unknown KL estimator {estimator!r}")


def grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, *, clip_low: float, clip_high: float,
              agg: str, kl_beta: float, kl_estimator: str, max_len: int | None = None):
    pg, stats = policy_loss(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, agg, max_len)
    kl = aggregate(kl_penalty(logprobs, ref_logprobs, kl_estimator), mask, agg, max_len)
    stats.update(pg_loss=float(pg), kl=float(kl))
    return pg + kl_beta * kl, stats


def pad_sequences(seqs: Sequence, pad_value: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """List of 1-D arrays -> (padded [B, T] float tensor, mask [B, T])."""
    length = max([len(s) for s in seqs] + [1])
    out = torch.full((len(seqs), length), float(pad_value))
    mask = torch.zeros((len(seqs), length))
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.as_tensor(np.asarray(s, dtype=np.float32))
        mask[i, :len(s)] = 1
    return out, mask
