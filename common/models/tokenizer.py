"""An offline-trained byte-level BPE tokenizer with Qwen2.5-VL's special tokens and `<seg>`.

The tiny presets use it so nothing is downloaded. Token ids of the special tokens follow Qwen's order.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, List

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from common.prompts import SEG_TOKEN, build_completion, build_user_text, SYSTEM_PROMPT

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def training_corpus(samples: Iterable) -> List[str]:
    """Texts the BPE merges are learnt from: prompts, reasoning, answers and plain numbers."""
    texts = [SYSTEM_PROMPT, "<think> </think> <answer> </answer>"]
    for s in samples:
        texts.append(build_user_text(s.question))
        texts.append(build_completion(s.reasoning, s.category, s.boxes))
    texts.extend(" ".join(str(i) for i in range(k, k + 50)) for k in range(0, 1000, 50))
    return texts


def train_tokenizer(texts: List[str], vocab_size: int = 1024) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),  # Qwen tokenizes digits one by one
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=QWEN_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    # `<seg>` is one atomic, non-special token: it survives skip_special_tokens decoding in vLLM/HF.
    tok.add_tokens([AddedToken(SEG_TOKEN, special=False, normalized=False, single_word=False)])
    return tok


def save_hf_tokenizer(tok: Tokenizer, out_dir: str | Path):
    """Save as a Qwen2 tokenizer folder that transformers and vLLM load."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                 unk_token=None, bos_token=None, model_max_length=4096)
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(str(out_dir))
    return hf
