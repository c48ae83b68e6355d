"""The SFT stage's targets and loss: CE on the reasoning+answer tokens (prompt masked) + lambda * DiceCE."""
from __future__ import annotations

from typing import List

import torch

from common.data import LesionSample
from common.prompts import END_OF_TURN, build_completion


def sft_target_ids(tokenizer, sample: LesionSample) -> List[int]:
    text = build_completion(sample.reasoning, sample.category, sample.boxes) + END_OF_TURN
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def ce_sum(token_logprobs: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Summed negative log-likelihood over completion tokens (normalised by the global token count outside)."""
    return -(token_logprobs * completion_mask.to(token_logprobs.device)).sum()
