"""GRPO math (pure torch): group advantages, clipped policy loss with clip-higher, KL estimators,
loss aggregation modes.

Shapes: B completions, T completion tokens (right-padded), mask [B, T] with 1 on real tokens. The
ratio/KL math runs in at least float32: bf16 log-probs are upcast before the subtraction and exp().
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import numpy as np
import torch

ADVANTAGE_MODES = ("grpo", "dr_grpo")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
KL_ESTIMATORS = ("k1", "k2", "k3")


def group_advantages(rewards, mode: str = "grpo", eps: float = 1e-6,
                     drop_zero_variance: bool = False) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Advantages [P, G] (float64), keep [P] (bool), number of dropped groups, for rewards shaped [P, G].

    grpo: (r - mean) / (std + eps) with the *population* std of the group (ddof=0, so a group's
    advantages have RMS 1 whatever G is); dr_grpo: r - mean (no std, Dr.GRPO).
    A group whose rewards are all equal (max == min, so float round-off in the mean cannot hide it)
    gets advantage 0; with `drop_zero_variance` it is also marked keep=False and counted (DAPO
    dynamic sampling). Non-finite rewards are an error: they would poison the whole group.
    """
    if mode not in ADVANTAGE_MODES:
        raise ValueError(f"unknown advantage mode {mode!r}; expected one of {ADVANTAGE_MODES}")
    if isinstance(rewards, torch.Tensor):
        r = rewards.detach().to("cpu", torch.float64).clone()
    else:
        r = torch.as_tensor(np.array(rewards, dtype=np.float64))
    if r.dim() != 2 or r.shape[1] == 0:
        raise ValueError(f"rewards must be [prompts, G] with G >= 1, got shape {tuple(r.shape)}")
    if not bool(torch.isfinite(r).all()):
        raise ValueError("rewards contain NaN or inf")
    centred = r - r.mean(dim=1, keepdim=True)
    if mode == "grpo":
        adv = centred / (r.std(dim=1, keepdim=True, unbiased=False) + eps)
    else:
        adv = centred
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


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_low: float = 0.2, clip_high: float = 0.28,
                agg: str = "token_mean", max_len: int | None = None) -> Tuple[torch.Tensor, Dict[str, float]]:
    """PPO-style clipped surrogate with separate lower/upper clip ranges (clip-higher, DAPO).

    stats: clip_frac = share of valid tokens where the clipped term was selected; ratio_mean/ratio_max
    over valid tokens (1.0 when there are none).
    """
    per_token, was_clipped, ratio = per_token_policy_loss(logprobs, old_logprobs, advantages, clip_low, clip_high)
    loss = aggregate(per_token, mask, agg, max_len)
    valid = mask.bool()
    n = int(valid.sum())
    with torch.no_grad():
        stats = {"clip_frac": float((was_clipped & valid).sum()) / max(n, 1),
                 "ratio_mean": float(ratio[valid].mean()) if n else 1.0,
                 "ratio_max": float(ratio[valid].max()) if n else 1.0}
    return loss, stats


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


def grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, *, clip_low: float, clip_high: float,
              agg: str, kl_beta: float, kl_estimator: str, max_len: int | None = None):
    """policy_loss + kl_beta * aggregate(kl_penalty) (same aggregation); stats add pg_loss and kl."""
    pg, stats = policy_loss(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, agg, max_len)
    kl = aggregate(kl_penalty(logprobs, ref_logprobs, kl_estimator), mask, agg, max_len)
    stats.update(pg_loss=float(pg.detach()), kl=float(kl.detach()))
    return pg + kl_beta * kl, stats


def pad_sequences(seqs: Sequence, pad_value: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """List of 1-D arrays -> (right-padded [B, T] float32 tensor, float mask [B, T] with 1 on real entries)."""
    arrays = [np.asarray(s, dtype=np.float32) for s in seqs]
    bad = [i for i, a in enumerate(arrays) if a.ndim != 1]
    if bad:
        raise ValueError(f"pad_sequences takes 1-D sequences; entry {bad[0]} has shape {arrays[bad[0]].shape}")
    length = max([len(a) for a in arrays] + [1])
    out = torch.full((len(arrays), length), float(pad_value))
    mask = torch.zeros((len(arrays), length))
    for i, a in enumerate(arrays):
        out[i, :len(a)] = torch.from_numpy(a)
        mask[i, :len(a)] = 1
    return out, mask
