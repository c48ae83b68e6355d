"""An offline-trained byte-level BPE tokenizer with a model family's special tokens and `<seg>`.

The tiny presets use it so nothing is downloaded. Token ids of the special tokens follow the family's order.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, List

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from coreseg.common.models.family import ModelFamily
from coreseg.common.prompts import SYSTEM_PROMPT, build_completion, build_user_text


def training_corpus(samples: Iterable) -> List[str]:
    """Texts the BPE merges are learnt from: prompts, reasoning, answers and plain numbers."""
    texts = [SYSTEM_PROMPT, "<think> </think> <answer> </answer>"]
    for s in samples:
        texts.append(build_user_text(s.question))
        texts.append(build_completion(s.reasoning, s.category, s.boxes))
    texts.extend(" ".join(str(i) for i in range(k, k + 50)) for k in range(0, 1000, 50))
    return texts


def train_tokenizer(texts: List[str], family: ModelFamily, vocab_size: int = 1024) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),  # Qwen tokenizes digits one by one
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(family.special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    # `<seg>` is one atomic, non-special token: it survives skip_special_tokens decoding in vLLM/HF.
    tok.add_tokens([AddedToken(family.seg_token, special=False, normalized=False, single_word=False)])
    return tok


def save_hf_tokenizer(tok: Tokenizer, out_dir: str | Path, family: ModelFamily):
    """Save as a tokenizer folder that transformers and vLLM load."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=family.end_of_turn, pad_token=family.end_of_text,
                                 unk_token=None, bos_token=None, model_max_length=4096)
    hf.chat_template = family.chat_template
    hf.save_pretrained(str(out_dir))
    return hf
