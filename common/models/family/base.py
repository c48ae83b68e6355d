"""What a model family must say about itself, and the logic shared by all families built on it.

A family (Qwen2.5-VL, Qwen2-VL, ...) is a subclass that fills in the class attributes, `chat_messages` (rendered
by the processor's chat template) and `render_chat` (the same text without a processor); the
registry in `common/models/family/__init__.py` picks it from the model folder's `config.json` `model_type`.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch

from coreseg.common.prompts import SEG_TOKEN, SYSTEM_PROMPT, build_user_text


class PromptIdsError(ValueError):
    """Prompt token ids (from the rollout engine) that do not fit the sample's image."""


class ModelFamily:
    model_type: str = ""  # config.json `model_type` this family serves
    model_class_name: str = ""  # transformers class of the full (vision + language) model
    # special tokens
    image_pad: str = ""  # one per vision token after the processor expands it
    vision_start: str = ""
    vision_end: str = ""
    end_of_turn: str = ""  # ends the assistant's answer (generation stops there)
    end_of_text: str = ""  # padding
    special_tokens: Tuple[str, ...] = ()  # every special token, in the family's id order (offline tokenizers)
    vision_tokens: Tuple[str, ...] = ()  # never sampled in a completion
    seg_token: str = SEG_TOKEN
    chat_template: str = ""  # jinja, for tokenizers built offline
    # model inputs besides input_ids / attention_mask: aligned with the tokens ([1, P] per prompt; padded with 0,
    # 0 at completion tokens), and the image tensors (concatenated along dim 0 over the batch)
    token_input_keys: Tuple[str, ...] = ()
    image_input_keys: Tuple[str, ...] = ()
    # LoRA: a regex on module names that keeps the adapters in the language model (never the vision tower)
    lora_scope: str = ""
    # the learner can pack a group's prompt once with its completions (learner/packed.py): the family implements
    # `prompt_positions`, `image_features` and `encoder_outputs`; the others keep the padded batch
    shared_prefix: bool = False

    # -- chat ---------------------------------------------------------------------------------------
    def chat_messages(self, question: str, system: str = SYSTEM_PROMPT) -> List[dict]:
        """The task's conversation: a system turn (none when `system` is empty: the chat template's own default
        then applies), and a user turn with one image followed by the instruction."""
        user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": build_user_text(question)}]}
        return ([{"role": "system", "content": system}] if system else []) + [user]

    def render_prompt(self, processor, question: str, system: str = SYSTEM_PROMPT) -> str:
        """The task prompt for one question, rendered by the processor's chat template (the model folder's), up
        to the assistant header: the text RolloutRequest.prompt carries and SFT encodes."""
        try:
            return processor.apply_chat_template(self.chat_messages(question, system), tokenize=False,
                                                 add_generation_prompt=True)
        except ValueError as err:  # no chat template in the folder
            raise ValueError(f"{self.model_type}: the model folder's processor cannot render the prompt ({err})") from None

    def render_chat(self, system: str, user_text: str) -> str:
        """The same text as `render_prompt` written out by hand (what `chat_template` renders), for code that has
        no processor at hand (tests, benchmarks); the family's tests check that the two agree."""
        raise NotImplementedError

    def prompt(self, question: str, system: str = SYSTEM_PROMPT) -> str:
        """`render_chat` for one question (no processor); runs render the prompt with `render_prompt`."""
        return self.render_chat(system, build_user_text(question))

    # -- LoRA and checkpoints -----------------------------------------------------------------------
    def lora_target_regex(self, modules: Sequence[str]) -> str:
        return self.lora_scope + r"\.(" + "|".join(modules) + r")$"

    def checkpoint_keys(self, module: str) -> List[str]:
        """Candidate checkpoint keys of a module's weight (module named as in the transformers model)."""
        return [f"{module}.weight"]

    # -- model and processor ------------------------------------------------------------------------
    def processor_kwargs(self, min_pixels: int = 0, max_pixels: int = 0) -> Dict[str, int]:
        """The image budget as vLLM's mm_processor_kwargs; 0 keeps the folder's setting."""
        if min_pixels or max_pixels:
            raise ValueError(f"{self.model_type}: this family does not take model.min_pixels / model.max_pixels")
        return {}

    def set_image_budget(self, processor, min_pixels: int = 0, max_pixels: int = 0):
        """The same budget set on a loaded transformers processor (returned); 0 keeps the folder's setting."""
        self.processor_kwargs(min_pixels, max_pixels)
        return processor

    def model_class(self):
        import transformers

        return getattr(transformers, self.model_class_name)

    def token_id_of(self, tokenizer, token: str) -> int:
        ids = tokenizer.convert_tokens_to_ids([token])
        if not ids or ids[0] is None or tokenizer.convert_ids_to_tokens(ids)[0] != token:
            raise ValueError(f"{self.model_type}: the tokenizer has no token {token!r}")
        return int(ids[0])

    def encode_prompt(self, processor, question: str, image, system: str = SYSTEM_PROMPT) -> Dict[str, torch.Tensor]:
        """Render the prompt and run the processor (SFT, which has no rollout): input_ids [1, P], the token-aligned
        inputs [1, P] and the image inputs."""
        enc = processor(text=[self.render_prompt(processor, question, system)], images=[image], return_tensors="pt")
        return {k: enc[k] for k in ("input_ids",) + self.token_input_keys + self.image_input_keys}

    def encode_image(self, processor, image) -> Dict[str, torch.Tensor]:
        """The image inputs alone (the prompt ids come from the rollout engine)."""
        enc = processor.image_processor(images=[image], return_tensors="pt")
        return {k: enc[k] for k in self.image_input_keys}

    # -- packed learner batches (shared_prefix) ------------------------------------------------------
    def prompt_positions(self, model, prompt: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The rotary positions [R, P] of a prompt encoding ([1, P] ids, token-aligned and image inputs) in `model`
        (the transformers model, not peft's wrapper); text after it continues from their maximum + 1."""
        raise NotImplementedError(f"{self.model_type}: no packed learner batches")

    def image_features(self, model, image_inputs: Sequence[Dict[str, torch.Tensor]]) -> List[torch.Tensor]:
        """The vision tower's output for each image's inputs: [image tokens, hidden] per image."""
        raise NotImplementedError(f"{self.model_type}: no packed learner batches")

    def encoder_outputs(self, features: Sequence[torch.Tensor]) -> Dict[str, object]:
        """Forward keyword arguments that hand the model precomputed vision features (in prompt order)."""
        raise NotImplementedError(f"{self.model_type}: no packed learner batches")

    def image_token_count(self, processor, image_inputs: Dict[str, torch.Tensor]) -> int:
        """How many `image_pad` tokens the image takes in the prompt."""
        raise NotImplementedError

    def token_inputs(self, processor, prompt_ids: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Token-aligned inputs [1, P] for prompt ids [1, P]."""
        raise NotImplementedError

    def encode_with_prompt_ids(self, processor, prompt_ids: Sequence[int], image_inputs: Dict[str, torch.Tensor],
                               sample_id: str) -> Dict[str, torch.Tensor]:
        """The learner's prompt part from the engine's prompt ids plus the image inputs; the ids must hold exactly
        the image's number of image tokens (a mismatch would misplace the vision embeddings)."""
        ids = torch.as_tensor(list(prompt_ids), dtype=torch.long)[None]
        want = self.image_token_count(processor, image_inputs)
        got = int((ids == self.token_id_of(processor.tokenizer, self.image_pad)).sum())
        if got != want:
            raise PromptIdsError(f"sample {sample_id!r}: the rollout's prompt ids ({ids.shape[1]} tokens) hold {got} "
                                 f"{self.image_pad} tokens, its image needs {want}")
        return {"input_ids": ids, **self.token_inputs(processor, ids), **image_inputs}
