"""The data of one GRPO step between the pools (no Ray here): answered groups, the training batch that
survives the advantage filter, reward statistics, phase timers."""
from __future__ import annotations

import logging
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from coreseg.common.data import LesionSample
from coreseg.common.protocol import ForwardResult, RolloutGroup, Score, ScoreItem
from coreseg.rollout.engine import PROMPT_TOO_LONG

logger = logging.getLogger("coreseg.rollout")
from coreseg.deploy.learning_metrics import sampled_stats


@contextmanager
def timed(timings: Dict[str, float], name: str):
    """Adds the block's wall time to timings['time/<name>'] (a phase run several times in a step adds up)."""
    start = time.perf_counter()
    yield
    key = f"time/{name}"
    timings[key] = timings.get(key, 0.0) + time.perf_counter() - start


@dataclass
class Answered:
    """Groups that were generated, forwarded and scored; `failed` holds (sample, error) of failed generations."""
    samples: List[LesionSample]
    groups: List[RolloutGroup]
    forward: Optional[ForwardResult]
    scores: List[Score]
    failed: List[Tuple[LesionSample, str]]

    def __post_init__(self):
        for sample, error in self.failed:  # never a silent drop: each failed sample is named
            logger.warning("sample %r gets no rollouts this step: %s", sample.id, error)


@dataclass
class TrainBatch:
    """What a GRPO update trains on: the kept groups (prompt-major, G completions each) and their advantages;
    `scores` covers every scored completion, kept or dropped (what the policy sampled)."""
    samples: List[LesionSample] = field(default_factory=list)
    groups: List[RolloutGroup] = field(default_factory=list)
    advantage_rows: List[np.ndarray] = field(default_factory=list)  # [G] per kept group
    forwards: List[ForwardResult] = field(default_factory=list)
    scores: List[Score] = field(default_factory=list)
    failed: List[Tuple[LesionSample, str]] = field(default_factory=list)
    # every answered group of the step, kept or dropped, aligned with `scores` (for the learning signals)
    sampled_samples: List[LesionSample] = field(default_factory=list)
    sampled: List[RolloutGroup] = field(default_factory=list)
    dropped: int = 0
    extra_draws: int = 0
    lag: int = 0

    def add(self, answered: Answered, keep: np.ndarray, advantages: np.ndarray) -> None:
        """Keeps groups `keep` (indices into answered) with their advantage rows."""
        G = len(answered.groups[0].completions)
        rows = [k * G + j for k in keep for j in range(G)]
        self.sampled_samples += answered.samples
        self.sampled += answered.groups
        self.samples += [answered.samples[k] for k in keep]
        self.groups += [answered.groups[k] for k in keep]
        self.advantage_rows += [np.asarray(advantages[k], np.float64) for k in keep]
        self.forwards.append(answered.forward.select(rows))

    def truncate(self, groups: int) -> None:
        """At most `groups` groups (dynamic sampling can overshoot by part of a batch)."""
        if len(self.samples) <= groups:
            return
        G = len(self.groups[0].completions)
        forward = self.forward.select(range(groups * G))
        self.samples, self.groups = self.samples[:groups], self.groups[:groups]
        self.advantage_rows, self.forwards = self.advantage_rows[:groups], [forward]

    @property
    def advantages(self) -> np.ndarray:
        return np.concatenate(self.advantage_rows) if self.advantage_rows else np.zeros(0)

    @property
    def forward(self) -> ForwardResult:
        parts = [f for f in self.forwards if len(f.seg_found)]
        return ForwardResult([x for f in parts for x in f.logprobs], [x for f in parts for x in f.ref_logprobs],
                             np.concatenate([f.seg_states for f in parts]), np.concatenate([f.seg_found for f in parts]))

    def stats(self) -> Dict[str, float]:
        lengths = [len(c.token_ids) for g in self.groups for c in g.completions]
        return {"rollout/errors": float(len(self.failed)),
                "rollout/prompt_too_long": float(sum(error.startswith(PROMPT_TOO_LONG) for _, error in self.failed)),
                "rollout/policy_lag": float(self.lag),
                "rollout/mean_length": float(np.mean(lengths)) if lengths else 0.0,
                "rollout/logprob_diff": logprob_diff(self.groups, self.forward) if self.groups else 0.0,
                "adv/dropped_groups": float(self.dropped), "adv/kept_groups": float(len(self.samples)),
                "adv/extra_draws": float(self.extra_draws), **sampled_stats(self.sampled, self.scores)}


def logprob_diff(groups: List[RolloutGroup], forward: ForwardResult) -> float:
    """Mean |sampling log-prob - learner log-prob| per token: how far the rollout engine's numerics (and, at
    policy lag 1, the policy) are from the learner's."""
    sampled = [np.asarray(c.logprobs, np.float64) for g in groups for c in g.completions]
    pairs = [(a, np.asarray(b, np.float64)) for a, b in zip(sampled, forward.logprobs) if len(a) == len(b) and len(a)]
    if not pairs:
        return 0.0
    return float(np.concatenate([np.abs(a - b) for a, b in pairs]).mean())


def score_items(samples: List[LesionSample], groups: List[RolloutGroup], forward: ForwardResult) -> List[ScoreItem]:
    items, k = [], 0
    for sample, group in zip(samples, groups):
        for comp in group.completions:
            state = forward.seg_states[k] if forward.seg_found[k] else None
            items.append(ScoreItem(sample_id=sample.id, text=comp.text, seg_state=state, image=sample.image,
                                   gt_masks=sample.masks, gt_boxes=sample.boxes))
            k += 1
    return items


def reward_stats(scores: List[Score]) -> Dict[str, float]:
    out = {"reward/total": float(np.mean([s.total for s in scores]))}
    for name in scores[0].components:
        out[f"reward/{name}"] = float(np.mean([s.components[name] for s in scores]))
    out["reward/dice"] = float(np.mean([s.dice for s in scores]))
    out["reward/format_ok"] = float(np.mean([s.format_ok for s in scores]))
    reasons = Counter(r for s in scores for r in s.reasons)
    out.update({f"reason/{k}": float(v) for k, v in reasons.items()})
    return out
