"""Trainable embedding rows of the tokens the project adds (`<seg>`), and their installation in every engine.

A real model puts `<seg>` in a spare row that pretraining never trained (Qwen2.5-VL-3B: id 151665, input and
output embeddings tied). LoRA only adapts the linear layers, so it can move the hidden states but never that
row: a spare output row gives `<seg>` a logit that no hidden state lifts above the trained tokens' (with a zero
row the logit is 0 while about half of the trained rows score above 0 for any hidden state), so the policy
could never learn to emit it. `TokenRows` trains exactly those rows, input and output (one set when tied).

Learner: a forward hook on the input embedding swaps in the trained rows at the added tokens, and one on the
output embedding replaces their logits with `hidden @ rows^T`; the full embedding matrix is never copied
(peft's `trainable_token_indices` rebuilds the whole matrix on every forward, and its gradient, ~0.6 GB each
at the 3B shape). The rows are parametrised as base + delta (delta starts at 0), so weight decay pulls them
back to the base rows, as LoRA's decay pulls its product to 0, and switching them off restores the base model.

Engines: the bundle carries the full row values (`WeightBundle.token_rows`: ids, input, output when untied);
each engine writes them into its own embedding weights in place (`write_rows_torch`, `write_rows_vllm`).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Optional, Sequence

import torch
from torch import nn

ATTR = "coreseg_token_rows"  # the submodule's name on the policy's base model


class TokenRows(nn.Module):
    def __init__(self, ids: Sequence[int], input_rows: torch.Tensor, output_rows: Optional[torch.Tensor]):
        super().__init__()
        self.register_buffer("ids", torch.as_tensor(list(ids), dtype=torch.long, device=input_rows.device))
        self.register_buffer("input_base", input_rows.detach().clone())
        self.input_delta = nn.Parameter(torch.zeros_like(input_rows))
        self.tied = output_rows is None
        if not self.tied:
            self.register_buffer("output_base", output_rows.detach().clone())
            self.output_delta = nn.Parameter(torch.zeros_like(output_rows))
        self.enabled = True

    def rows(self, kind: str) -> torch.Tensor:
        if kind == "output" and not self.tied:
            return self.output_base + self.output_delta
        return self.input_base + self.input_delta

    def forward(self, kind: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """kind "input": x token ids, out their embeddings; "output": x hidden states, out their logits.
        Called from the embeddings' hooks as a module call, so ZeRO-3 gathers the deltas like any module's."""
        if not self.enabled:
            return out
        rows = self.rows(kind).to(out.dtype)
        if kind == "input":
            match = x.unsqueeze(-1) == self.ids  # [..., k]
            hit = match.any(-1, keepdim=True)
            return torch.where(hit, rows[match.long().argmax(-1)], out)
        return out.index_copy(out.dim() - 1, self.ids, x.to(rows.dtype) @ rows.t())

    @torch.no_grad()
    def export(self) -> Dict[str, torch.Tensor]:
        """The rows' full values in the learner's dtype (what engines write into their weights), new CPU tensors."""
        out = {"ids": self.ids.to("cpu", copy=True), "input": self.rows("input").detach().cpu()}
        if not self.tied:
            out["output"] = self.rows("output").detach().cpu()
        return out


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape


def attach_token_rows(model: nn.Module, ids: Sequence[int]) -> TokenRows:
    """Make rows `ids` of `model`'s input and output embeddings trainable (after get_peft_model, which freezes
    everything but the LoRA). The TokenRows module becomes a submodule of the base model, so it is among the
    policy's parameters (optimizer, KL snapshot, DeepSpeed checkpoint)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    emb, head = base.get_input_embeddings(), base.get_output_embeddings()
    rows_of = lambda w: w.detach()[torch.as_tensor(list(ids), dtype=torch.long, device=w.device)]  # noqa: E731
    tied = _shares_storage(emb.weight, head.weight)
    rows = TokenRows(ids, rows_of(emb.weight), None if tied else rows_of(head.weight))
    base.add_module(ATTR, rows)
    emb.register_forward_hook(lambda _m, args, out: rows("input", args[0], out))
    head.register_forward_hook(lambda _m, args, out: rows("output", args[0], out))
    return rows


def token_rows_of(model: nn.Module) -> Optional[TokenRows]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, ATTR, None)


@contextmanager
def rows_disabled(rows: Optional[TokenRows]):
    """Inside, the embeddings are the base model's (the KL reference `base`)."""
    if rows is None:
        yield
        return
    rows.enabled = False
    try:
        yield
    finally:
        rows.enabled = True


def check_rows(token_rows: Dict[str, torch.Tensor], vocab_rows: int, hidden: int, tied: bool) -> None:
    """A bundle's rows must fit the engine's embeddings (same hidden size, ids inside the table, output rows
    exactly when the model's output embedding is its own)."""
    ids = token_rows["ids"]
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_rows:
        raise ValueError(f"token rows {ids.tolist()} outside the embedding table of {vocab_rows} rows")
    for kind in ("input", "output"):
        if kind in token_rows and tuple(token_rows[kind].shape) != (len(ids), hidden):
            raise ValueError(f"token rows {kind!r} are {tuple(token_rows[kind].shape)}, the embeddings take "
                             f"({len(ids)}, {hidden})")
    if tied == ("output" in token_rows):
        raise ValueError("the bundle's token rows were trained for a model with "
                         f"{'untied' if tied else 'tied'} embeddings; this one's are {'tied' if tied else 'untied'}")


@torch.no_grad()
def write_rows_torch(model: nn.Module, token_rows: Dict[str, torch.Tensor]) -> None:
    """A transformers model: the rows go into its embedding weights in place."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = _shares_storage(emb.weight, head.weight)
    check_rows(token_rows, emb.weight.shape[0], emb.weight.shape[1], tied)
    ids = token_rows["ids"].to(emb.weight.device)
    emb.weight[ids] = token_rows["input"].to(emb.weight)
    if not tied:
        head.weight[ids] = token_rows["output"].to(head.weight)


@torch.no_grad()
def write_rows_vllm(model: nn.Module, token_rows: Dict[str, torch.Tensor]) -> int:
    """Runs inside vLLM (LLM.apply_model, on every tensor-parallel rank): the rows go into the vocab-parallel
    embedding and LM head in place (each rank writes the ids of its vocabulary shard), then the layers are
    prepared again (on CPU the LM head is repacked for oneDNN, as at load time). In place, so the storage that
    CUDA graphs and the sleep allocator know stays the same. Works under LoRA adapters too (their wrappers keep
    the original layer as `base_layer`, which `named_modules` reaches). Returns the rows written on this rank."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    layers = {id(m): m for m in model.modules() if isinstance(m, VocabParallelEmbedding)}.values()
    inputs = [m for m in layers if not isinstance(m, ParallelLMHead)]
    heads = [m for m in layers if isinstance(m, ParallelLMHead)]
    if len(inputs) != 1 or len(heads) > 1:
        raise ValueError(f"expected one input embedding and at most one LM head, found {len(inputs)} and {len(heads)}")
    emb = inputs[0]
    tied = not heads or _shares_storage(heads[0].weight, emb.weight)
    check_rows(token_rows, emb.org_vocab_size, emb.embedding_dim, tied)
    targets = [(emb, token_rows["input"])] + ([] if tied else [(heads[0], token_rows["output"])])
    written = 0
    for layer, rows in targets:
        shard = layer.shard_indices
        ids = token_rows["ids"]
        mine = (ids >= shard.org_vocab_start_index) & (ids < shard.org_vocab_end_index)
        local = (ids[mine] - shard.org_vocab_start_index).to(layer.weight.device)
        layer.weight.data[local] = rows[mine].to(layer.weight.device, layer.weight.dtype)
        written += int(mine.sum())
    for layer in layers:  # every layer on a touched storage (a tied head shares the embedding's)
        layer.quant_method.process_weights_after_loading(layer)
    return written
