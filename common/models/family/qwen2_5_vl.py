"""Qwen2.5-VL: ChatML prompt with one image, Qwen's special tokens, the processor's inputs, LoRA on the
language model, checkpoint key names, and the tiny presets' config and processor."""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from coreseg.common.models.family.base import ModelFamily


class Qwen25VL(ModelFamily):
    model_type = "qwen2_5_vl"
    model_class_name = "Qwen2_5_VLForConditionalGeneration"
    image_pad = "<|image_pad|>"
    vision_start = "<|vision_start|>"
    vision_end = "<|vision_end|>"
    end_of_turn = "<|im_end|>"
    end_of_text = "<|endoftext|>"
    special_tokens = (
        "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
        "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
        "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
    vision_tokens = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
    chat_template = (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for item in message['content'] %}{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
        "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    # transformers places the image's M-RoPE positions with mm_token_type_ids (1 at image tokens)
    token_input_keys = ("mm_token_type_ids",)
    image_input_keys = ("pixel_values", "image_grid_thw")
    lora_scope = r".*language_model.*"
    shared_prefix = True
    # the tiny presets' image processor: small images give few vision tokens
    tiny_min_pixels = 56 * 56
    tiny_max_pixels = 112 * 112 * 4

    def processor_kwargs(self, min_pixels: int = 0, max_pixels: int = 0) -> Dict[str, int]:
        return {k: int(v) for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v}

    def set_image_budget(self, processor, min_pixels: int = 0, max_pixels: int = 0):
        # the image processor's size edges are its pixel bounds (min/max_pixels as call arguments are deprecated)
        image_processor = processor.image_processor
        size = image_processor.size
        image_processor.size = type(size)(shortest_edge=int(min_pixels or size["shortest_edge"]),
                                          longest_edge=int(max_pixels or size["longest_edge"]))
        return processor

    def render_chat(self, system: str, user_text: str) -> str:
        image = f"{self.vision_start}{self.image_pad}{self.vision_end}"  # vLLM and the processor expand the pad
        return (f"<|im_start|>system\n{system}{self.end_of_turn}\n"
                f"<|im_start|>user\n{image}{user_text}{self.end_of_turn}\n"
                f"<|im_start|>assistant\n")

    def checkpoint_keys(self, module: str) -> List[str]:
        # transformers names the language model `model.language_model.*`; checkpoints on disk often say `model.*`
        return [f"{module}.weight", f"{module.replace('model.language_model.', 'model.', 1)}.weight"]

    def image_token_count(self, processor, image_inputs: Dict[str, torch.Tensor]) -> int:
        # one token per merge_size x merge_size block of patches
        merge = processor.image_processor.merge_size
        return int(image_inputs["image_grid_thw"].prod(-1).sum()) // (merge * merge)

    def token_inputs(self, processor, prompt_ids: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {"mm_token_type_ids": torch.as_tensor(processor.create_mm_token_type_ids(prompt_ids.tolist()),
                                                     dtype=torch.long)}

    def prompt_positions(self, model, prompt: Dict[str, torch.Tensor]) -> torch.Tensor:
        # transformers' own M-RoPE index of the prompt alone (text after it continues from max + 1)
        positions, _ = model.model.get_rope_index(prompt["input_ids"], prompt["mm_token_type_ids"],
                                                  image_grid_thw=prompt["image_grid_thw"])
        return positions[:, 0]

    def image_features(self, model, image_inputs: Sequence[Dict[str, torch.Tensor]]) -> List[torch.Tensor]:
        device = model.device
        pixels = torch.cat([x["pixel_values"] for x in image_inputs]).to(device)
        grids = torch.cat([x["image_grid_thw"] for x in image_inputs]).to(device)
        return list(model.model.get_image_features(pixels, grids, return_dict=True).pooler_output)

    def encoder_outputs(self, features: Sequence[torch.Tensor]) -> Dict[str, object]:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=tuple(features))}}

    # -- the tiny presets (built in-process, common/models/policy.py) -------------------------------
    def tiny_config(self, p: dict, vocab_size: int, tokenizer):
        from transformers import Qwen2_5_VLConfig

        names = (self.image_pad, "<|video_pad|>", self.vision_start, self.vision_end, self.end_of_turn, self.end_of_text)
        ids = {t: self.token_id_of(tokenizer, t) for t in names}
        text = dict(vocab_size=vocab_size, hidden_size=p["hidden"], intermediate_size=p["inter"],
                    num_hidden_layers=p["layers"], num_attention_heads=p["heads"],
                    num_key_value_heads=p["kv_heads"], max_position_embeddings=4096, rms_norm_eps=1e-5,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": p["mrope"]},
                    bos_token_id=ids[self.end_of_text], eos_token_id=ids[self.end_of_turn],
                    pad_token_id=ids[self.end_of_text], tie_word_embeddings=False, use_sliding_window=False)
        vision = dict(depth=p["v_depth"], hidden_size=p["v_hidden"], intermediate_size=2 * p["v_hidden"],
                      num_heads=p["v_heads"], out_hidden_size=p["hidden"], patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, window_size=112, fullatt_block_indexes=[p["v_depth"] - 1])
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids[self.image_pad],
                                video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids[self.vision_start],
                                vision_end_token_id=ids[self.vision_end], tie_word_embeddings=False,
                                architectures=[self.model_class_name])

    def tiny_processor(self, tokenizer, min_pixels: int = 0, max_pixels: int = 0):
        from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

        image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels or self.tiny_min_pixels,
                                                max_pixels=max_pixels or self.tiny_max_pixels, patch_size=14,
                                                merge_size=2, temporal_patch_size=2)
        return Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                   video_processor=Qwen2VLVideoProcessor(), chat_template=self.chat_template)
