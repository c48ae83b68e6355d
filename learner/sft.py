"""The SFT stage's targets and loss: CE on the reasoning+answer tokens (prompt masked) + lambda * DiceCE."""
from __future__ import annotations

from typing import List

import torch

from coreseg.learner.grpo import LossNorm

from coreseg.common.data import LesionSample
from coreseg.common.models.family import ModelFamily
from coreseg.common.prompts import build_completion


def sft_target_ids(tokenizer, sample: LesionSample, family: ModelFamily) -> List[int]:
    """The completion the policy should write, ended by the family's end-of-turn token."""
    text = build_completion(sample.reasoning, sample.category, sample.boxes) + family.end_of_turn
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def ce_sum(token_logprobs: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Summed negative log-likelihood over completion tokens (normalised by the global token count outside)."""
    return -(token_logprobs * completion_mask.to(token_logprobs.device)).sum()


def sft_loss(token_logprobs: torch.Tensor, completion_mask: torch.Tensor, dice_sum: torch.Tensor, norm: LossNorm,
             mask_loss_weight: float):
    """The SFT loss of one shard and its stats (each the shard's share; shards add up to the full batch):
    CE summed over the shard's completion tokens / the batch's tokens + mask_loss_weight * DiceCE sum / the
    batch's masks (every SFT sample has a mask target)."""
    ce = ce_sum(token_logprobs, completion_mask) / max(norm.tokens, 1.0)
    dice = dice_sum / max(norm.masks, 1.0)
    loss = ce + mask_loss_weight * dice
    return loss, {"ce": float(ce.detach()), "dice_ce": float(dice.detach()), "loss": float(loss.detach())}
