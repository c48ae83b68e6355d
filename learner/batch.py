"""Turn (sample, completion token ids) pairs into padded Qwen2.5-VL inputs.

A sequence = processor(prompt + image) ids followed by the completion ids; `mm_token_type_ids` is carried
along (transformers places the image's M-RoPE positions with it), pixel rows are concatenated in order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch
from PIL import Image

from common.data import LesionSample
from common.prompts import build_prompt


@dataclass
class PolicyBatch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor
    mm_token_type_ids: torch.Tensor
    pixel_values: torch.Tensor  # [sum of patches, D]
    image_grid_thw: torch.Tensor  # [B, 3]
    completion_mask: torch.Tensor  # [B, T] 1 at completion tokens
    prompt_lens: List[int]
    completion_lens: List[int]

    def model_inputs(self, device) -> Dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids.to(device), "attention_mask": self.attention_mask.to(device),
                "mm_token_type_ids": self.mm_token_type_ids.to(device), "pixel_values": self.pixel_values.to(device),
                "image_grid_thw": self.image_grid_thw.to(device)}


class PromptEncoder:
    """Processor outputs per sample id (the prompt + image part is identical for the G rollouts)."""

    def __init__(self, processor):
        self.processor = processor
        self._cache: Dict[str, dict] = {}

    def encode(self, sample: LesionSample) -> dict:
        if sample.id not in self._cache:
            enc = self.processor(text=[build_prompt(sample.question)], images=[Image.fromarray(sample.image)],
                                 return_tensors="pt")
            self._cache[sample.id] = {k: v for k, v in enc.items()}
            if len(self._cache) > 4096:
                self._cache.pop(next(iter(self._cache)))
        return self._cache[sample.id]


def build_batch(encoder: PromptEncoder, samples: Sequence[LesionSample], completions: Sequence[Sequence[int]],
                pad_id: int) -> PolicyBatch:
    encs = [encoder.encode(s) for s in samples]
    seqs = [torch.cat([e["input_ids"][0], torch.as_tensor(list(c), dtype=torch.long)]) for e, c in zip(encs, completions)]
    length = max(len(s) for s in seqs)
    B = len(seqs)
    input_ids = torch.full((B, length), pad_id, dtype=torch.long)
    attention = torch.zeros((B, length), dtype=torch.long)
    mm_types = torch.zeros((B, length), dtype=torch.long)
    comp_mask = torch.zeros((B, length))
    for i, (seq, e, c) in enumerate(zip(seqs, encs, completions)):
        p = e["input_ids"].shape[1]
        input_ids[i, :len(seq)] = seq
        attention[i, :len(seq)] = 1
        mm_types[i, :p] = e["mm_token_type_ids"][0]
        comp_mask[i, p:len(seq)] = 1
    return PolicyBatch(input_ids, attention, mm_types, torch.cat([e["pixel_values"] for e in encs]),
                       torch.cat([e["image_grid_thw"] for e in encs]), comp_mask,
                       [e["input_ids"].shape[1] for e in encs], [len(c) for c in completions])


def logits_window(batch: PolicyBatch) -> int:
    """How many trailing positions need logits: from the token before the earliest completion to the end.
    Passed as `logits_to_keep`, it skips the lm_head (the vocabulary-wide matmul) over the prompts."""
    return batch.input_ids.shape[1] - max(min(batch.prompt_lens) - 1, 0)


def completion_logprobs(logits: torch.Tensor, batch: PolicyBatch) -> torch.Tensor:
    """log p(token_t | < t) at every position, aligned so entry t scores input_ids[t] ([B, T]; 0 where no
    logits were kept). `logits` cover the last `logits.shape[1]` positions (all of them, or `logits_window`).
    logit - logsumexp avoids a second vocabulary-wide float32 tensor next to log_softmax's."""
    B, T = batch.input_ids.shape
    first = T - logits.shape[1]  # position of logits[:, 0]
    scores = logits[:, :-1].float()
    ids = batch.input_ids[:, first + 1:].to(logits.device)
    picked = scores.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(scores, dim=-1)
    return torch.cat([picked.new_zeros((B, first + 1)), picked], dim=1)


def per_completion(values: torch.Tensor, batch: PolicyBatch) -> List[torch.Tensor]:
    """Split [B, T] values into each completion's tokens."""
    return [values[i, p:p + n] for i, (p, n) in enumerate(zip(batch.prompt_lens, batch.completion_lens))]
