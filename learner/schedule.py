"""Learning-rate schedules: the factor the base learning rate is multiplied by at a stage's step.

Warmup rises linearly over the first `warmup` steps ((step + 1) / warmup, so the first step already trains);
after it, `constant` stays at 1, `linear` falls from 1 towards `min_ratio` and `cosine` follows half a cosine
from 1 towards `min_ratio`, reaching it at step `total` (steps past `total` stay at `min_ratio`).
"""
from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(step: int, total: int, schedule: str = "constant", warmup: int = 0, min_ratio: float = 0.0) -> float:
    """The multiplier of the base learning rate at 0-based `step` of a stage of `total` steps."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}: one of {SCHEDULES}")
    if step < 0 or warmup < 0 or not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"lr_factor needs step >= 0, warmup >= 0 and min_ratio in [0, 1] "
                         f"(got {step}, {warmup}, {min_ratio})")
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * shape


def heads_lr(learner_cfg) -> float:
    """The adapter and mask decoder's base rate: learner.adapter_lr, or 0 at learner.mask_loss_weight 0. Their
    only loss is the mask loss (in SFT and GRPO alike), so they get no gradient then, but AdamW would still move
    them: the Adam moments an `--init` checkpoint restores keep stepping, and weight decay scales with the rate.
    At 0 they stay exactly as they were."""
    return 0.0 if learner_cfg.mask_loss_weight == 0 else learner_cfg.adapter_lr
