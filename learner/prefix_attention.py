"""Shared-prefix attention over one packed row [prompt_1, c_11, .., c_1k, prompt_2, c_21, ...] (pure torch).

A GRPO group's completions share their prompt (same image, same prompt ids), so the learner packs the prompt once
and its completions after it, without padding. Attention inside the row: each prompt attends causally to itself;
each completion attends to its group's whole prompt and causally to itself, never to another completion or group.
That is exactly the attention each completion gets in its own [prompt, completion] sequence, so log-probs, hidden
states and gradients are those of the one-sequence-per-completion path, at the cost of P + sum(C) tokens per
group instead of sum(P + C).

The function is registered in transformers' attention interface (`ATTENTION_NAME`) and installed as the policy's
text attention (`install`). It computes the shared-prefix pattern when the forward carries a `shared_prefix`
keyword (a `PrefixLayout`), and is plain SDPA otherwise (the padded path, generation), so one model serves both;
the keyword travels with the layer's arguments, so gradient checkpointing recomputes the same pattern.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

ATTENTION_NAME = "coreseg_shared_prefix"


@dataclass(frozen=True)
class PrefixGroup:
    """One prompt and its completions inside the packed row: the prompt at [start, start + prompt_len), then the
    completions back to back. `index` [k, Cmax]: each completion's token positions in the row (right-padded
    with the first completion position); `keys_mask` [k, 1, Cmax, P + Cmax]: which keys each query sees."""
    start: int
    prompt_len: int
    index: torch.Tensor
    valid: torch.Tensor  # [k, Cmax] bool: real tokens of `index`
    keys_mask: torch.Tensor


@dataclass(frozen=True)
class PrefixLayout:
    groups: Tuple[PrefixGroup, ...]
    length: int  # tokens in the packed row

    def to(self, device) -> "PrefixLayout":
        return PrefixLayout(tuple(PrefixGroup(g.start, g.prompt_len, g.index.to(device), g.valid.to(device),
                                              g.keys_mask.to(device)) for g in self.groups), self.length)


def prefix_layout(prompt_lens: Sequence[int], completion_lens: Sequence[Sequence[int]], device=None) -> PrefixLayout:
    """The layout of a packed row holding, in order, group g's prompt (prompt_lens[g] tokens) followed by its
    completions (completion_lens[g], each >= 1 token)."""
    if len(prompt_lens) != len(completion_lens):
        raise ValueError(f"{len(prompt_lens)} prompts for {len(completion_lens)} completion groups")
    groups: List[PrefixGroup] = []
    pos = 0
    for p, lens in zip(prompt_lens, completion_lens):
        if p < 1 or not len(lens) or min(lens) < 1:
            raise ValueError(f"a packed group needs a prompt and non-empty completions, got prompt {p}, "
                             f"completions {list(lens)}")
        width = max(lens)
        offsets = torch.arange(width)
        valid = offsets[None, :] < torch.as_tensor(list(lens))[:, None]
        starts = pos + p + torch.cumsum(torch.as_tensor([0] + list(lens[:-1])), 0)
        index = torch.where(valid, starts[:, None] + offsets[None, :], torch.full_like(valid, pos + p, dtype=torch.long))
        causal = offsets[None, :] <= offsets[:, None]  # [Cmax(query), Cmax(key)]
        own = causal[None] & valid[:, None, :]  # a query never sees a padded key
        keys_mask = torch.cat([torch.ones(len(lens), width, p, dtype=torch.bool), own], dim=2)[:, None]
        groups.append(PrefixGroup(pos, p, index.to(device), valid.to(device), keys_mask.to(device)))
        pos += p + sum(lens)
    return PrefixLayout(tuple(groups), pos)


def _heads_first(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[b, kv_heads, ..., d] -> [b, kv_heads * n_rep, ..., d] (grouped-query attention: each kv head serves n_rep
    query heads, as transformers' repeat_kv)."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def shared_prefix_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: PrefixLayout,
                            scaling: float, dropout: float = 0.0) -> torch.Tensor:
    """query [1, H, L, d], key/value [1, Hkv, L, d] of the packed row -> output [1, L, H, d]."""
    if query.shape[0] != 1 or query.shape[2] != layout.length:
        raise ValueError(f"shared-prefix attention takes one packed row of {layout.length} tokens, got query "
                         f"{tuple(query.shape)}")
    n_rep = query.shape[1] // key.shape[1]
    key, value = _heads_first(key, n_rep), _heads_first(value, n_rep)
    pieces = []
    for g in layout.groups:
        a, b = g.start, g.start + g.prompt_len
        prompt_out = F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b],
                                                    dropout_p=dropout, is_causal=True, scale=scaling)
        k = g.index.shape[0]
        # [H, k, Cmax, d] -> [k, H, Cmax, d]: one batch row per completion
        q_c, k_c, v_c = (x[0][:, g.index].transpose(0, 1) for x in (query, key, value))
        keys = torch.cat([key[:, :, a:b].expand(k, -1, -1, -1), k_c], dim=2)
        values = torch.cat([value[:, :, a:b].expand(k, -1, -1, -1), v_c], dim=2)
        comp_out = F.scaled_dot_product_attention(q_c, keys, values, attn_mask=g.keys_mask, dropout_p=dropout,
                                                  scale=scaling)
        pieces += [prompt_out[0].transpose(0, 1), comp_out.transpose(1, 2)[g.valid]]  # [tokens, H, d] in row order
    return torch.cat(pieces)[None]


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention-interface signature: the shared-prefix pattern when the forward carries
    `shared_prefix`, SDPA with the model's own mask otherwise."""
    layout = kwargs.pop("shared_prefix", None)
    if layout is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    return shared_prefix_attention(query, key, value, layout, scaling, dropout), None


def install(model) -> None:
    """Make `model`'s text attention this function (the vision tower keeps its own). Registers it, and its mask
    builder (SDPA's, for calls without a layout), once per process."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)
    model.config.get_text_config()._attn_implementation = ATTENTION_NAME
