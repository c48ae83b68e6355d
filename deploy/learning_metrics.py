"""What shows whether GRPO is learning, per step: policy entropy, truncation, the reward spread inside groups
(GRPO's signal), and a dump of sampled completions with their rewards (JSONL + TensorBoard text).

Entropy comes from the rollout engine's sampling log-probs (no extra pass): the mean of -log p(token) over the
sampled completion tokens, p the untempered policy. At temperature 1 this is an unbiased Monte Carlo estimate of
the policy's per-token entropy; at temperature T < 1 it is the cross-entropy of the tempered sampler to the
policy (lower than at T = 1, but it moves with the entropy: a collapsing policy drives it to 0).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

from coreseg.common.protocol import RolloutGroup, Score
from coreseg.deploy.metrics_log import ROLLOUTS


def token_entropy_estimate(groups: Sequence[RolloutGroup]) -> float:
    """Mean -log p over every sampled completion token of `groups` (0 when there are no tokens)."""
    lps = [np.asarray(c.logprobs, np.float64) for g in groups for c in g.completions if len(c.logprobs)]
    return float(-np.concatenate(lps).mean()) if lps else 0.0


def truncation_ratio(groups: Sequence[RolloutGroup]) -> float:
    """Share of completions that stopped at max_new_tokens (finish reason `length`) instead of end-of-turn."""
    reasons = [c.finish_reason for g in groups for c in g.completions]
    return float(np.mean([r == "length" for r in reasons])) if reasons else 0.0


def group_reward_spread(totals: np.ndarray, eps: float = 1e-9) -> Dict[str, float]:
    """totals [P, G] (prompt-major rewards): mean within-group std (population std, as GRPO normalises) and the
    share of groups whose G rewards are all equal (they give zero advantage: no gradient)."""
    totals = np.asarray(totals, np.float64)
    if totals.size == 0:
        return {"adv/group_reward_std": 0.0, "adv/zero_variance_share": 0.0}
    std = totals.std(axis=1)
    return {"adv/group_reward_std": float(std.mean()), "adv/zero_variance_share": float(np.mean(std <= eps))}


def sampled_stats(groups: Sequence[RolloutGroup], scores: Sequence[Score]) -> Dict[str, float]:
    """The per-step learning signals over every sampled group (kept by the advantage filter or not); scores
    prompt-major, aligned with the groups' completions."""
    out = {"policy/entropy": token_entropy_estimate(groups), "rollout/truncation_ratio": truncation_ratio(groups)}
    if groups and scores:
        G = len(groups[0].completions)
        out.update(group_reward_spread(np.array([s.total for s in scores], np.float64).reshape(-1, G)))
    return out


def rollout_records(step: int, sample_ids: Sequence[str], groups: Sequence[RolloutGroup], scores: Sequence[Score],
                    count: int) -> List[dict]:
    """Up to `count` completions of a step, spread over its groups (first completion of every group, then the
    second, ...), each with its rewards."""
    if count <= 0 or not groups:
        return []
    G = len(groups[0].completions)
    order = [(i, j) for j in range(G) for i in range(len(groups))][:count]
    out = []
    for i, j in order:
        comp, score = groups[i].completions[j], scores[i * G + j]
        out.append({"step": int(step), "sample_id": sample_ids[i], "completion": j, "text": comp.text,
                    "finish_reason": comp.finish_reason, "tokens": len(comp.token_ids), "reward": score.total,
                    "components": dict(score.components), "dice": score.dice, "format_ok": bool(score.format_ok),
                    "reasons": list(score.reasons)})
    return out


def dump_rollouts(logger, count: int, step: int, batch) -> None:
    """`run.dump_rollouts` completions of the step into rollouts.jsonl (run folder) and TensorBoard text."""
    if logger is None or count <= 0:
        return
    records = rollout_records(step, [s.id for s in batch.sampled_samples], batch.sampled, batch.scores, count)
    path = Path(logger.path).parent / ROLLOUTS
    with path.open("a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
    text = "\n\n".join(f"**{r['sample_id']}#{r['completion']}** reward {r['reward']:.3f} "
                       f"({', '.join(f'{k} {v:.2f}' for k, v in r['components'].items())}), "
                       f"{r['finish_reason']}, {r['tokens']} tokens\n\n    " + r["text"].replace("\n", "\n    ")
                       for r in records)
    logger.text("grpo/rollouts", text, step)
