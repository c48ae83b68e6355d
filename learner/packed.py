"""The learner's packed batch: one row, no padding, each prompt once per micro-batch with its completions after it.

Rows of a micro-batch that share their prompt (same image, same prompt ids: a GRPO group's completions, which the
layout keeps in batch order) form a group: [prompt, c_1, .., c_k]. The groups go back to back in one row of
P + sum(C) tokens per group (the padded path runs sum(P + C) tokens per group plus padding to the longest row);
`learner/prefix_attention.py` gives each completion the attention it would have in its own sequence. Positions are
the family's (Qwen2.5-VL: 3-D M-RoPE), the prompt's computed once and each completion's continuing from it, as in
its own sequence. The vision tower (frozen: LoRA stays in the language model) runs outside the forward, once per
image (CoreSegModule.vision_features), and its features go in as precomputed encoder outputs.

Per-completion outputs use a [B, Cmax] score layout: row i holds completion i's tokens from column 0
(`prompt_lens` are 0), so `per_completion`, the GRPO loss and the worker's helpers treat it like the padded
batch's [B, T].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

from coreseg.common.data import LesionSample
from coreseg.common.images import image_keys
from coreseg.learner.batch import PromptEncoder
from coreseg.learner.prefix_attention import PrefixLayout, prefix_layout


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [1, L]: the packed row
    position_ids: torch.Tensor  # [3, 1, L] (the family's rotary positions)
    layout: PrefixLayout
    image_keys: List[str]  # one per group, in row order (the vision features' cache keys)
    image_inputs: List[dict]  # one per group: the processor's image tensors
    logit_index: torch.Tensor  # [N]: row positions whose logits score the N completion tokens
    target_ids: torch.Tensor  # [N]: the scored tokens
    score_rows: torch.Tensor  # [N]: completion of each scored token
    score_cols: torch.Tensor  # [N]: its index inside the completion
    completion_ids: torch.Tensor  # [B, Cmax] (-1 past a completion's end)
    completion_start: torch.Tensor  # [B]: row position of each completion's first token
    completion_mask: torch.Tensor  # [B, Cmax] 1 at completion tokens (0 for a padding row: see zero_padding_rows)
    prompt_lens: List[int]  # all 0: the [B, Cmax] score rows start at the completion
    completion_lens: List[int]
    group_prompt_lens: List[int]

    def layout_on(self, device) -> PrefixLayout:
        """The layout's index and mask tensors on `device` (moved once per batch, not per layer)."""
        if self.layout.groups and self.layout.groups[0].index.device != torch.device(device):
            self.layout = self.layout.to(device)
        return self.layout


def _same_prompt(a: dict, b: dict) -> bool:
    return torch.equal(a["input_ids"], b["input_ids"])


def build_packed(encoder: PromptEncoder, samples: Sequence[LesionSample], completions: Sequence[Sequence[int]],
                 positions: Callable[[dict], torch.Tensor],
                 prompt_ids: Optional[Sequence[Sequence[int]]] = None) -> PackedBatch:
    """The packed row of these (sample, completion) rows. `positions(prompt encoding)` -> the prompt's rotary
    positions [R, P] (R = 3 for M-RoPE); `prompt_ids` as in `build_batch` (None: the rendered prompt, SFT).
    Consecutive rows with the same image and prompt ids share one prompt."""
    if len(completions) != len(samples) or (prompt_ids is not None and len(prompt_ids) != len(samples)):
        raise ValueError(f"{len(samples)} samples, {len(completions)} completions and "
                         f"{'no' if prompt_ids is None else len(prompt_ids)} prompt id lists")
    if not len(samples):
        raise ValueError("cannot pack an empty micro-batch")
    empty = [i for i, c in enumerate(completions) if not len(c)]
    if empty:
        raise ValueError(f"rows {empty} have empty completions: the packed learner batch needs >= 1 token each")
    keys = image_keys([s.id for s in samples], [s.image for s in samples])
    encs = ([encoder.encode(s, k) for s, k in zip(samples, keys)] if prompt_ids is None else
            [encoder.encode_ids(s, p, k) for s, p, k in zip(samples, prompt_ids, keys)])
    groups: List[List[int]] = []
    for i in range(len(samples)):
        if groups and keys[groups[-1][0]] == keys[i] and _same_prompt(encs[groups[-1][0]], encs[i]):
            groups[-1].append(i)
        else:
            groups.append([i])
    tokens, pos_parts, logit_index, targets, rows, cols = [], [], [], [], [], []
    start = torch.zeros(len(samples), dtype=torch.long)
    at = 0
    for members in groups:
        enc = encs[members[0]]
        prompt = enc["input_ids"][0]
        p = prompt.shape[0]
        prompt_pos = positions(enc)
        next_pos = int(prompt_pos.max()) + 1  # text after the prompt continues from its largest position
        tokens.append(prompt)
        pos_parts.append(prompt_pos)
        at += p
        prompt_last = at - 1
        for i in members:
            c = torch.as_tensor(list(completions[i]), dtype=torch.long)
            n = c.shape[0]
            tokens.append(c)
            pos_parts.append((next_pos + torch.arange(n)).expand(prompt_pos.shape[0], n))
            start[i] = at
            # token t of a completion is scored by the logits of the token before it in its own sequence: the
            # prompt's last token for t = 0, then the completion's own tokens
            logit_index += [prompt_last] + list(range(at, at + n - 1))
            targets.append(c)
            rows += [i] * n
            cols += list(range(n))
            at += n
    width = max(len(c) for c in completions)
    comp_ids = torch.full((len(samples), width), -1, dtype=torch.long)
    mask = torch.zeros((len(samples), width))
    for i, c in enumerate(completions):
        comp_ids[i, :len(c)] = torch.as_tensor(list(c), dtype=torch.long)
        mask[i, :len(c)] = 1
    layout = prefix_layout([encs[m[0]]["input_ids"].shape[1] for m in groups],
                           [[len(completions[i]) for i in m] for m in groups])
    return PackedBatch(
        input_ids=torch.cat(tokens)[None], position_ids=torch.cat(pos_parts, dim=1)[:, None],
        layout=layout, image_keys=[keys[m[0]] for m in groups],
        image_inputs=[{k: encs[m[0]][k] for k in encoder.family.image_input_keys} for m in groups],
        logit_index=torch.as_tensor(logit_index, dtype=torch.long), target_ids=torch.cat(targets),
        score_rows=torch.as_tensor(rows, dtype=torch.long), score_cols=torch.as_tensor(cols, dtype=torch.long),
        completion_ids=comp_ids, completion_start=start, completion_mask=mask, prompt_lens=[0] * len(samples),
        completion_lens=[len(c) for c in completions],
        group_prompt_lens=[encs[m[0]]["input_ids"].shape[1] for m in groups])


def packed_logprobs(logits: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """log p(token | its sequence's past) of every completion token, [B, Cmax] (0 past a completion's end), from
    the logits at `batch.logit_index` ([1, N, V] or [N, V]). Same arithmetic as `completion_logprobs`."""
    scores = logits.reshape(-1, logits.shape[-1]).float()
    ids = batch.target_ids.to(logits.device)
    picked = scores.gather(-1, ids[:, None]).squeeze(-1) - torch.logsumexp(scores, dim=-1)
    out = picked.new_zeros(batch.completion_mask.shape)
    return out.index_put((batch.score_rows.to(out.device), batch.score_cols.to(out.device)), picked)


def packed_seg_states(hidden: torch.Tensor, batch: PackedBatch, seg_token_id: int):
    """(states [B, H], found [B]): the hidden state ([1, L, H] over the packed row) at the last `<seg>` of each
    completion where its completion mask is 1 (zeros and False where there is none), as `gather_seg_states`."""
    device = hidden.device
    is_seg = (batch.completion_ids == seg_token_id).to(device) & batch.completion_mask.to(device).bool()
    found = is_seg.any(dim=1)
    cols = torch.arange(is_seg.shape[1], device=device).expand_as(is_seg)
    last = torch.where(is_seg, cols, torch.full_like(cols, -1)).max(dim=1).values.clamp(min=0)
    states = hidden[0, batch.completion_start.to(device) + last]
    return states * found.unsqueeze(1).to(states.dtype), found
