"""The trainable module: peft LoRA policy (a multimodal LLM of a registered family) + prompt adapter + SAM mask
decoder.

The SAM image encoder and prompt encoder are frozen; image embeddings are computed once per image
(`common.images.image_key`: sample id + pixel digest).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from coreseg.common.config import TrainConfig
from coreseg.common.data import LesionSample
from coreseg.common.images import image_keys
from coreseg.common.models.adapter import build_adapter
from coreseg.common.models.lora import cpu_copies, lora_state, make_lora_config, peft_config_dict
from coreseg.common.models.policy import default_dtype, gather_seg_states, load_policy, policy_info
from coreseg.common.models.sam import build_sam, encode_images, preprocessing_of, upscale_masks
from coreseg.common.models.segment import decode_masks
from coreseg.common.models.token_rows import attach_token_rows, rows_disabled
from coreseg.common.protocol import WeightBundle
from coreseg.learner.batch import PolicyBatch, completion_logprobs, logits_window
from coreseg.learner.packed import PackedBatch, packed_logprobs, packed_seg_states
from coreseg.learner.losses import low_res_target
from coreseg.common.byte_cache import EmbeddingCache


class CoreSegModule(nn.Module):
    def __init__(self, cfg: TrainConfig, policy_dir: str, device: str = "cpu"):
        super().__init__()
        from peft import get_peft_model

        self.cfg = cfg
        dtype = default_dtype(cfg.model.dtype, device)
        base, self.processor = load_policy(policy_dir, dtype, device, cfg.model.min_pixels, cfg.model.max_pixels)
        self.info = policy_info(policy_dir)
        torch.manual_seed(cfg.learner.seed)
        self.policy = get_peft_model(base, make_lora_config(cfg.model, self.info.family))
        # packed batches (learner/packed.py) where the family supports them and learner.packed is on
        self.packed = bool(cfg.learner.packed and self.info.family.shared_prefix)
        if self.packed:
            from coreseg.learner import prefix_attention
            prefix_attention.install(base)
        # the frozen vision tower's output per image (image_key), shared by every pass of a step and later steps
        self._vision = EmbeddingCache(cfg.learner.embed_cache_bytes)
        # `<seg>`'s input and output rows (the only token the project adds); None: LoRA alone
        self.token_rows = (attach_token_rows(self.policy, [self.info.seg_token_id])
                           if cfg.model.train_token_rows else None)
        if cfg.learner.gradient_checkpointing:
            # non-reentrant checkpointing needs no input grads (the embeddings are frozen)
            self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        hidden = base.config.get_text_config().hidden_size
        self.adapter = build_adapter(hidden, cfg.model.adapter_queries, cfg.model.adapter_mlp_blocks, seed=cfg.run.seed)
        self.sam = build_sam(cfg.model.sam_type, cfg.model.sam_checkpoint, seed=cfg.run.seed)
        for p in self.sam.parameters():
            p.requires_grad_(False)
        if cfg.model.train_mask_decoder:
            for p in self.sam.mask_decoder.parameters():
                p.requires_grad_(True)
        self.adapter.to(device)
        self.sam.to(device)
        self.device = device
        self._embeddings = EmbeddingCache(cfg.learner.embed_cache_bytes)
        self.reference_lora: Optional[Dict[str, torch.Tensor]] = None  # see snapshot_reference

    # -- policy -------------------------------------------------------------------------------------
    def policy_pass(self, batch, with_hidden: bool = True):
        """(log-probs [B, T], `<seg>` states [B, H] or None, found [B] or None) of a PolicyBatch or PackedBatch;
        the log-probs are laid out as the batch's completion mask."""
        if isinstance(batch, PackedBatch):
            return self._packed_pass(batch, with_hidden)
        out = self.policy(**batch.model_inputs(self.device), output_hidden_states=with_hidden, use_cache=False,
                          logits_to_keep=logits_window(batch))
        logp = completion_logprobs(out.logits, batch)
        states = found = None
        if with_hidden:
            states, found = gather_seg_states(out.hidden_states[-1], batch.input_ids.to(self.device),
                                              self.info.seg_token_id, batch.completion_mask.to(self.device))
        return logp, states, found

    def _packed_pass(self, batch: PackedBatch, with_hidden: bool):
        family = self.info.family
        out = self.policy(input_ids=batch.input_ids.to(self.device), position_ids=batch.position_ids.to(self.device),
                          attention_mask={"full_attention": None},  # the shared-prefix attention builds its own
                          shared_prefix=batch.layout_on(self.device), output_hidden_states=with_hidden,
                          use_cache=False, logits_to_keep=batch.logit_index.to(self.device),
                          **family.encoder_outputs(self.vision_features(batch.image_keys, batch.image_inputs)))
        logp = packed_logprobs(out.logits, batch)
        states = found = None
        if with_hidden:
            states, found = packed_seg_states(out.hidden_states[-1], batch, self.info.seg_token_id)
        return logp, states, found

    def prompt_positions(self, prompt: dict) -> torch.Tensor:
        """The prompt's rotary positions (the family's; the packed batch builder's `positions`)."""
        return self.info.family.prompt_positions(self.policy.get_base_model(), prompt)

    @torch.no_grad()
    def vision_features(self, keys: Sequence[str], image_inputs: Sequence[dict]) -> List[torch.Tensor]:
        """The frozen vision tower's output for each image (`image_key`), computed once and cached (LRU bound
        learner.embed_cache_bytes), so a step's passes and the prompts' G completions share one vision pass."""
        return self._vision.get_or_compute(keys, image_inputs, lambda inputs: [
            f.detach() for f in self.info.family.image_features(self.policy.get_base_model(), inputs)])

    def snapshot_reference(self) -> None:
        """Freeze the current LoRA values as the KL reference (GRPO after SFT: the reference is the SFT policy,
        not the base model the SFT moved away from). Costs one LoRA-sized copy, never a model copy."""
        self.reference_lora = {n: p.detach().clone() for n, p in self.policy.named_parameters() if p.requires_grad}

    @contextmanager
    def reference_policy(self):
        """Inside, the policy is the KL reference: the snapshot's LoRA values (grpo_start) or the LoRA switched
        off (base; the token rows too). Entered once per forward, so the LoRA is swapped twice per step, not per
        micro-batch."""
        if self.reference_lora is None:
            with self.policy.disable_adapter(), rows_disabled(self.token_rows):
                yield
            return
        params = dict(self.policy.named_parameters())
        current = {n: params[n].detach().clone() for n in self.reference_lora}
        try:
            with torch.no_grad():
                for n, value in self.reference_lora.items():
                    params[n].copy_(value)
            yield
        finally:
            with torch.no_grad():
                for n, value in current.items():
                    params[n].copy_(value)

    # -- masks --------------------------------------------------------------------------------------
    def image_embeddings(self, samples: Sequence[LesionSample], keys: Optional[Sequence[str]] = None) -> torch.Tensor:
        """[N, C, g, g], cached by `image_key` (id + pixel digest: a duplicate id never gets another image's
        embedding); keys: the samples' image keys when the caller has them."""
        keys = list(keys) if keys is not None else image_keys([s.id for s in samples], [s.image for s in samples])
        # bounded by learner.embed_cache_bytes (least recently used go)
        return torch.stack(self._embeddings.get_or_compute(keys, samples, lambda missing: encode_images(
            self.sam, [s.image for s in missing]))).to(self.device)

    def mask_logits(self, seg_states: torch.Tensor, samples: Sequence[LesionSample]) -> torch.Tensor:
        """Low-res mask logits [M, 1, l, l]; one sample (image) per state."""
        keys = image_keys([s.id for s in samples], [s.image for s in samples])
        unique: List[LesionSample] = []
        unique_keys: List[str] = []
        index = []
        for s, key in zip(samples, keys):
            if not unique_keys or unique_keys[-1] != key:
                unique.append(s)
                unique_keys.append(key)
            index.append(len(unique) - 1)
        emb = self.image_embeddings(unique, unique_keys)
        low, _ = decode_masks(self.sam, self.adapter, emb, seg_states, torch.tensor(index, device=self.device))
        return low

    def mask_loss_pair(self, seg_states: torch.Tensor, samples: Sequence[LesionSample]):
        """(mask logits, targets) for the DiceCE, at SAM's low-res grid or, with
        learner.mask_loss_resolution=full, upscaled to each image's size (one pair per image size)."""
        low = self.mask_logits(seg_states, samples)
        if self.cfg.learner.mask_loss_resolution == "low":
            return [(low, self.mask_targets(samples, low.shape[-1]))]
        pairs, by_size = [], {}
        for i, s in enumerate(samples):
            by_size.setdefault(s.image.shape[:2], []).append(i)
        for (h, w), rows in by_size.items():
            logits = upscale_masks(self.sam, low[rows], h, w)
            target = torch.stack([torch.from_numpy(samples[i].union_mask().astype("float32"))[None] for i in rows])
            pairs.append((logits, target.to(self.device)))
        return pairs

    def mask_targets(self, samples: Sequence[LesionSample], low_res: int) -> torch.Tensor:
        size = self.sam.image_encoder.img_size
        keep_aspect = preprocessing_of(self.sam) != "medsam"  # MedSAM stretches the image to S x S
        return torch.stack([low_res_target(s.union_mask(), size, low_res, keep_aspect=keep_aspect)[None]
                            for s in samples]).to(self.device)

    # -- weights ------------------------------------------------------------------------------------
    def bundle(self, version: int) -> WeightBundle:
        """The weights every engine serves, in the learner's dtype (bf16 on GPU): one CPU copy of each tensor."""
        return WeightBundle(version=version, lora=lora_state(self.policy),
                            peft_config=peft_config_dict(self.policy.peft_config["default"]),
                            adapter=cpu_copies(self.adapter.state_dict()),
                            mask_decoder=(cpu_copies(self.sam.mask_decoder.state_dict())
                                          if self.cfg.model.train_mask_decoder else None),
                            token_rows=self.token_rows.export() if self.token_rows is not None else None)

    def param_groups(self):
        lora = [p for n, p in self.policy.named_parameters() if p.requires_grad]
        heads = list(self.adapter.parameters()) + [p for p in self.sam.mask_decoder.parameters() if p.requires_grad]
        return lora, heads
