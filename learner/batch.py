"""Turn (sample, prompt ids, completion token ids) rows into padded model inputs.

A sequence = the prompt ids followed by the completion ids. In GRPO the prompt ids are the ones the rollout engine
returned (`Completion.prompt_token_ids`), so the learner scores exactly the tokens that were sampled from; SFT has
no rollout and renders the prompt through the model family. The image inputs always come from the processor; the
family names the other model inputs (token-aligned ones, e.g. Qwen's `mm_token_type_ids`, are padded with 0 and
0 at completion tokens; image tensors are concatenated in order).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Hashable, List, Optional, Sequence

import torch
from PIL import Image

from coreseg.common.data import LesionSample
from coreseg.common.images import image_key, image_keys
from coreseg.common.models.family import ModelFamily
from coreseg.common.prompts import SYSTEM_PROMPT
from coreseg.common.byte_cache import EmbeddingCache

# Bytes of processor outputs kept (the G rollouts of a prompt and a step's passes share them): a 1024^2 image's
# pixel patches are ~26 MB in fp32, so a count bound (4096 entries) could hold ~100 GiB of host memory
PROMPT_CACHE_BYTES = 1 << 30


@dataclass
class PolicyBatch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor  # [B, T] 1 at completion tokens
    prompt_lens: List[int]
    completion_lens: List[int]
    extra_inputs: Dict[str, torch.Tensor]  # the family's other model inputs (token-aligned [B, T], image tensors)

    def model_inputs(self, device) -> Dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids.to(device), "attention_mask": self.attention_mask.to(device),
                **{k: v.to(device) for k, v in self.extra_inputs.items()}}


class PromptEncoder:
    """The prompt part of each row: input_ids [1, P], the family's token-aligned inputs [1, P] and image inputs.
    Processor outputs are cached per image (`image_key`: sample id + pixel digest, so a duplicate id never
    gets another image's inputs) and, for rendered prompts, question."""

    def __init__(self, processor, family: ModelFamily, system_prompt: str = SYSTEM_PROMPT):
        self.processor, self.family, self.system_prompt = processor, family, system_prompt
        self._rendered = EmbeddingCache(PROMPT_CACHE_BYTES)
        self._images = EmbeddingCache(PROMPT_CACHE_BYTES)

    @staticmethod
    def _cached(cache: EmbeddingCache, key: Hashable, make) -> dict:
        value = cache.get(key)
        if value is None:
            value = make()
            cache.put(key, value)
        return value

    def encode(self, sample: LesionSample, key: Optional[str] = None) -> dict:
        """The prompt rendered by the family (SFT: there is no rollout to take ids from). key: the sample's
        `image_key` when the caller has it."""
        key = key or image_key(sample.id, sample.image)
        return self._cached(self._rendered, (key, sample.question), lambda: self.family.encode_prompt(
            self.processor, sample.question, Image.fromarray(sample.image), self.system_prompt))

    def encode_ids(self, sample: LesionSample, prompt_ids: Sequence[int], key: Optional[str] = None) -> dict:
        """The rollout engine's prompt ids with the sample's image inputs (checked against each other)."""
        key = key or image_key(sample.id, sample.image)
        images = self._cached(self._images, key, lambda: self.family.encode_image(
            self.processor, Image.fromarray(sample.image)))
        return self.family.encode_with_prompt_ids(self.processor, prompt_ids, images, sample.id)


def build_batch(encoder: PromptEncoder, samples: Sequence[LesionSample], completions: Sequence[Sequence[int]],
                pad_id: int, prompt_ids: Optional[Sequence[Sequence[int]]] = None) -> PolicyBatch:
    """One row per (sample, completion). `prompt_ids` (one list per row): the rollout engine's prompt tokens;
    None renders each sample's prompt (SFT)."""
    keys = image_keys([s.id for s in samples], [s.image for s in samples])  # one digest per image object
    if prompt_ids is None:
        encs = [encoder.encode(s, k) for s, k in zip(samples, keys)]
    else:
        if len(prompt_ids) != len(samples):
            raise ValueError(f"{len(prompt_ids)} prompt id lists for {len(samples)} samples")
        encs = [encoder.encode_ids(s, p, k) for s, p, k in zip(samples, prompt_ids, keys)]
    family = encoder.family
    seqs = [torch.cat([e["input_ids"][0], torch.as_tensor(list(c), dtype=torch.long)]) for e, c in zip(encs, completions)]
    length = max(len(s) for s in seqs)
    B = len(seqs)
    input_ids = torch.full((B, length), pad_id, dtype=torch.long)
    attention = torch.zeros((B, length), dtype=torch.long)
    aligned = {k: torch.zeros((B, length), dtype=encs[0][k].dtype) for k in family.token_input_keys}
    comp_mask = torch.zeros((B, length))
    for i, (seq, e, c) in enumerate(zip(seqs, encs, completions)):
        p = e["input_ids"].shape[1]
        input_ids[i, :len(seq)] = seq
        attention[i, :len(seq)] = 1
        for k, values in aligned.items():
            values[i, :p] = e[k][0]
        comp_mask[i, p:len(seq)] = 1
    images = {k: torch.cat([e[k] for e in encs]) for k in family.image_input_keys}
    return PolicyBatch(input_ids, attention, comp_mask, [e["input_ids"].shape[1] for e in encs],
                       [len(c) for c in completions], {**aligned, **images})


def zero_padding_rows(batch: PolicyBatch, real: Optional[Sequence[bool]]) -> PolicyBatch:
    """The batch with the completion mask of each padding row (`real[i]` False) zeroed: such a row runs through
    the model like the others but has loss weight 0 and no `<seg>` (see learner/balance.py). None: all real."""
    if real is not None and not all(real):
        keep = torch.as_tensor(list(real), dtype=batch.completion_mask.dtype)
        batch.completion_mask = batch.completion_mask * keep[:, None]
    return batch


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
