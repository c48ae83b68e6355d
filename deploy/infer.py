"""In-process prediction: one image (or a folder of images) + a question -> the policy's answer and a mask, from a
run folder's checkpoint or from a `coreseg export` folder. transformers + peft generate greedily; the `<seg>` state
comes from one forward over the prompt and the answer; the segmenter is the exported one
(`common/models/segmenter_loader.py`). No Ray, DeepSpeed or vLLM, and nothing in the run folder is written.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from coreseg.common.models.segmenter_loader import ExportedSegmenter
from coreseg.common.prompts import SEG_TOKEN


@dataclass
class Prediction:
    text: str  # the answer, special tokens removed
    mask: np.ndarray  # HxW bool (all False without `<seg>`)
    seg_found: bool


class Predictor:
    def __init__(self, model, processor, segmenter: ExportedSegmenter, system: str, user: str,
                 max_new_tokens: int = 512, suppress_tokens: Optional[List[int]] = None):
        self.model, self.processor, self.segmenter = model.eval(), processor, segmenter
        self.system, self.user, self.max_new_tokens = system, user, max_new_tokens
        tok = processor.tokenizer
        self.seg_id = tok.convert_tokens_to_ids(SEG_TOKEN)
        self.suppress = list(suppress_tokens or [])

    # -- loading ------------------------------------------------------------------------------------
    @classmethod
    def from_export(cls, export_dir: str | Path, sam_checkpoint: str = "", base: str = "") -> "Predictor":
        """An export folder; `base` overrides the adapter's base_model_name_or_path (e.g. another local copy)."""
        from peft import PeftModel
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from coreseg.common.models.segmenter_loader import apply_token_rows, load_segmenter

        policy = Path(export_dir) / "policy"
        base = base or json.loads((policy / "adapter_config.json").read_text())["base_model_name_or_path"]
        processor = AutoProcessor.from_pretrained(str(policy))
        model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32),
                                          str(policy))
        apply_token_rows(model, policy)
        prompt = json.loads((policy / "coreseg_prompt.json").read_text())
        segmenter = load_segmenter(Path(export_dir) / "segmenter", sam_checkpoint)
        return cls(model, processor, segmenter, prompt["system"], prompt["user"], prompt["max_new_tokens"],
                   prompt["suppress_tokens"])

    @classmethod
    def from_run(cls, cfg, run_dir: str | Path, checkpoint: Optional[str] = None) -> "Predictor":
        """A run folder's checkpoint (default: its latest), with the run's config `cfg`; only read."""
        from peft import PeftModel
        from safetensors.torch import load_file

        from coreseg.common.models.adapter import PromptAdapter
        from coreseg.common.models.policy import ensure_policy_dir, load_policy, policy_info
        from coreseg.common.models.sam import build_sam
        from coreseg.common.prompts import USER_INSTRUCTION
        from coreseg.deploy.export import checkpoint_folder

        learner = checkpoint_folder(Path(run_dir), checkpoint) / "learner"
        policy_dir = ensure_policy_dir(cfg.model.policy, cfg.model.assets_dir, cfg.run.seed)
        base, processor = load_policy(policy_dir, torch.float32)
        model = PeftModel.from_pretrained(base, str(learner / "peft"))
        if (learner / "token_rows.safetensors").is_file():  # the trained `<seg>` rows (not in the adapter)
            from coreseg.common.models.token_rows import write_rows_torch

            with torch.no_grad():
                write_rows_torch(model, load_file(str(learner / "token_rows.safetensors")))
        adapter_state = load_file(str(learner / "adapter.safetensors"))
        prompt_dim, llm_hidden = adapter_state["proj_in.weight"].shape
        adapter = PromptAdapter(llm_hidden, prompt_dim, cfg.model.adapter_queries, cfg.model.adapter_mlp_blocks)
        adapter.load_state_dict(adapter_state)
        sam = build_sam(cfg.model.sam_type, cfg.model.sam_checkpoint, seed=cfg.run.seed)
        decoder = learner / "mask_decoder.safetensors"
        if decoder.exists():
            sam.mask_decoder.load_state_dict(load_file(str(decoder)))
        segmenter = ExportedSegmenter(sam, adapter, cfg.reward.mask_threshold)
        return cls(model, processor, segmenter, cfg.model.system_prompt, USER_INSTRUCTION, cfg.rollout.max_new_tokens,
                   list(policy_info(policy_dir).vision_token_ids))

    # -- prediction ---------------------------------------------------------------------------------
    def prompt(self, question: str) -> str:
        # as the run rendered it (ModelFamily.chat_messages): no system turn when model.system_prompt is empty
        system = [{"role": "system", "content": [{"type": "text", "text": self.system}]}] if self.system else []
        messages = system + [{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": self.user.format(question=question.strip())}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    @torch.no_grad()
    def predict(self, image: np.ndarray, question: str) -> Prediction:
        from PIL import Image

        tok = self.processor.tokenizer
        enc = self.processor(text=[self.prompt(question)], images=[Image.fromarray(image)], return_tensors="pt")
        out = self.model.generate(**enc, do_sample=False, max_new_tokens=self.max_new_tokens,
                                  pad_token_id=tok.pad_token_id, suppress_tokens=self.suppress or None)
        text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        mask = self.seg_mask(image, enc, out)
        return Prediction(text, np.zeros(image.shape[:2], bool) if mask is None else mask, mask is not None)

    @torch.no_grad()
    def seg_mask(self, image: np.ndarray, enc: dict, ids: torch.Tensor) -> Optional[np.ndarray]:
        """The mask of the last `<seg>` in the answer `ids[:, P:]` (P: the prompt's length in `enc`), from the
        last-layer hidden state there: one forward over prompt + answer with the token-aligned inputs padded with
        0 over the answer, as the learner does. None without `<seg>`."""
        prompt_len = enc["input_ids"].shape[1]
        where = (ids[0, prompt_len:] == self.seg_id).nonzero()
        if not len(where):
            return None
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        for key, value in enc.items():
            if key in inputs:
                continue
            if value.dim() == 2 and value.shape == enc["input_ids"].shape:
                value = torch.cat([value, value.new_zeros((1, ids.shape[1] - prompt_len))], dim=1)
            inputs[key] = value
        hidden = self.model(**inputs, output_hidden_states=True, use_cache=False).hidden_states[-1][0]
        state = hidden[prompt_len + int(where[-1])].float()
        return self.segmenter.masks([image], state[None])[0]
