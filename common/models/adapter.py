"""The Semantic-Guided Prompt Adapter: `<seg>` hidden state -> K sparse prompt tokens for SAM.

ResMLP from the LLM hidden size to SAM's prompt width, then AttnPool: K learnable queries (conditioned on
the projected `<seg>` state) cross-attend to [projected `<seg>` state; image embedding + positional
encoding] and give K tokens that go to SAM's mask decoder as sparse prompt embeddings.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class ResBlock(nn.Module):
    def __init__(self, dim: int, expansion: int = 2):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, expansion * dim)
        self.fc2 = nn.Linear(expansion * dim, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class PromptAdapter(nn.Module):
    def __init__(self, llm_hidden: int, prompt_dim: int = 256, num_queries: int = 4, num_blocks: int = 2,
                 num_heads: int = 8):
        super().__init__()
        self.llm_hidden, self.prompt_dim, self.num_queries = llm_hidden, prompt_dim, num_queries
        self.proj_in = nn.Linear(llm_hidden, prompt_dim)
        self.res_mlp = nn.Sequential(*[ResBlock(prompt_dim) for _ in range(num_blocks)])
        self.seg_norm = nn.LayerNorm(prompt_dim)
        self.queries = nn.Parameter(torch.randn(num_queries, prompt_dim) * 0.02)
        self.attn = nn.MultiheadAttention(prompt_dim, num_heads, batch_first=True)
        self.attn_norm = nn.LayerNorm(prompt_dim)
        self.ffn = ResBlock(prompt_dim)

    def forward(self, seg_states: torch.Tensor, image_embeddings: torch.Tensor,
                image_pe: Optional[torch.Tensor] = None) -> torch.Tensor:
        """seg_states [M, H]; image_embeddings [M, C, h, w]; image_pe [1, C, h, w] -> [M, K, C]."""
        seg = self.seg_norm(self.res_mlp(self.proj_in(seg_states.to(self.proj_in.weight.dtype))))
        img = image_embeddings.to(seg.dtype)
        if image_pe is not None:
            img = img + image_pe.to(seg.dtype)
        tokens = torch.cat([seg[:, None], img.flatten(2).transpose(1, 2)], dim=1)
        queries = self.queries[None] + seg[:, None]
        pooled, _ = self.attn(queries, tokens, tokens, need_weights=False)
        return self.ffn(self.attn_norm(queries + pooled))


def build_adapter(llm_hidden: int, num_queries: int = 4, num_blocks: int = 2, seed: int = 0,
                  prompt_dim: int = 256) -> PromptAdapter:
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    adapter = PromptAdapter(llm_hidden, prompt_dim, num_queries, num_blocks)
    torch.random.set_rng_state(gen_state)
    return adapter
