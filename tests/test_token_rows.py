"""Trainable `<seg>` rows (common/models/token_rows.py): the hooked model equals a plain model whose embedding
weights hold the rows, only the rows train, tied and untied embeddings."""
from __future__ import annotations

import pytest
import torch

from common.models.token_rows import attach_token_rows, rows_disabled, token_rows_of, write_rows_torch


def _tiny_causal_lm(tied: bool, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    return Qwen2ForCausalLM(cfg).eval()


def _peft(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


@pytest.mark.parametrize("tied", [True, False])
def test_hooked_rows_equal_rows_written_into_the_weights(tied):
    ids = [90, 7]
    policy = _peft(_tiny_causal_lm(tied))
    x = torch.tensor([[1, 90, 5, 7, 7, 90, 3]])
    before = policy(input_ids=x).logits
    rows = attach_token_rows(policy, ids)
    assert rows.tied == tied and token_rows_of(policy) is rows
    # delta 0: the base model (the rows' logits come from a 2-column product, not the full GEMM: rounding apart)
    torch.testing.assert_close(policy(input_ids=x).logits, before, rtol=0, atol=1e-6)
    with torch.no_grad():
        rows.input_delta.normal_()
        if not tied:
            rows.output_delta.normal_()
    got = policy(input_ids=x).logits
    exported = rows.export()
    assert ("output" in exported) == (not tied) and exported["ids"].tolist() == ids
    # independent: a fresh model of the same weights with the rows written into its embedding tables
    plain = _peft(_tiny_causal_lm(tied))
    plain.load_state_dict({k: v for k, v in policy.state_dict().items() if "coreseg_token_rows" not in k})
    emb = plain.get_input_embeddings().weight
    want_in = emb[ids].detach() + rows.input_delta.detach()
    torch.testing.assert_close(exported["input"], want_in)
    write_rows_torch(plain.get_base_model(), exported)
    torch.testing.assert_close(plain.get_input_embeddings().weight[ids], want_in, rtol=0, atol=0)
    torch.testing.assert_close(got, plain(input_ids=x).logits, rtol=1e-5, atol=1e-5)
    with rows_disabled(rows):
        torch.testing.assert_close(policy(input_ids=x).logits, before, rtol=0, atol=0)


@pytest.mark.parametrize("tied", [True, False])
def test_only_the_rows_and_the_lora_train(tied):
    policy = _peft(_tiny_causal_lm(tied))
    rows = attach_token_rows(policy, [90])
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert {n for n in trainable if "coreseg_token_rows" in n} == (
        {"base_model.model.coreseg_token_rows.input_delta"} | (
            set() if tied else {"base_model.model.coreseg_token_rows.output_delta"}))
    assert all("lora_" in n or "coreseg_token_rows" in n for n in trainable)
    x = torch.tensor([[1, 90, 5, 90]])
    logits = policy(input_ids=x).logits
    logits[0, :, 90].sum().backward()  # the `<seg>` logits depend on the output row, the inputs at 90 on the input row
    assert rows.input_delta.grad.abs().sum() > 0
    if not tied:
        # d logit_90 / d output row = the final hidden states (summed over positions)
        assert rows.output_delta.grad.abs().sum() > 0
    assert policy.get_input_embeddings().weight.grad is None


def test_bad_rows_are_refused():
    model = _tiny_causal_lm(tied=False)
    with pytest.raises(ValueError, match="outside the embedding table"):
        write_rows_torch(model, {"ids": torch.tensor([96]), "input": torch.zeros(1, 32), "output": torch.zeros(1, 32)})
    with pytest.raises(ValueError, match="embeddings take"):
        write_rows_torch(model, {"ids": torch.tensor([5]), "input": torch.zeros(1, 16), "output": torch.zeros(1, 32)})
    with pytest.raises(ValueError, match="tied embeddings; this one's are untied"):
        write_rows_torch(model, {"ids": torch.tensor([5]), "input": torch.zeros(1, 32)})
