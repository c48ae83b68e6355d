"""Dataclasses passed between the driver and the actors (plain numpy/torch payloads, Ray-serialisable)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch


@dataclass
class RolloutRequest:
    """One prompt: G completions are sampled for it."""
    sample_id: str
    prompt: str  # full prompt text with one image placeholder (ModelFamily.prompt, common/models/family)
    image: np.ndarray  # HxWx3 uint8 (or raw bytes that failed to decode upstream -> per-request error)


@dataclass
class Completion:
    text: str
    prompt_token_ids: List[int]  # the prompt as the engine tokenized it (image pads expanded); the learner uses these
    token_ids: List[int]
    logprobs: List[float]  # sampling log-prob of each completion token
    finish_reason: str
    version: int  # policy (LoRA) version that produced it


@dataclass
class RolloutGroup:
    sample_id: str
    completions: List[Completion] = field(default_factory=list)
    error: Optional[str] = None  # per-request failure (undecodable image, prompt too long, ...)


@dataclass
class WeightBundle:
    """Everything a worker needs to serve policy version `version`: LoRA deltas + adapter (+ mask decoder).
    Never the base model."""
    version: int
    lora: Dict[str, torch.Tensor]  # PEFT names (as in adapter_model.safetensors)
    peft_config: dict  # LoraConfig.to_dict() (JSON-able)
    adapter: Dict[str, torch.Tensor]  # PromptAdapter state dict
    mask_decoder: Optional[Dict[str, torch.Tensor]] = None  # SAM mask decoder state dict when trained
    # the added tokens' embedding rows when trained (common/models/token_rows.py): ids, input, output if untied
    token_rows: Optional[Dict[str, torch.Tensor]] = None

    def num_bytes(self) -> int:
        tensors = (list(self.lora.values()) + list(self.adapter.values()) + list((self.mask_decoder or {}).values())
                   + list((self.token_rows or {}).values()))
        return int(sum(t.numel() * t.element_size() for t in tensors))

    def rollout_part(self) -> "WeightBundle":
        """What a rollout worker serves: the LoRA and token rows (the adapter and mask decoder live in reward
        workers)."""
        return WeightBundle(self.version, self.lora, self.peft_config, {}, None, self.token_rows)

    def reward_part(self) -> "WeightBundle":
        """What a reward worker needs: the adapter and the mask decoder, no LoRA."""
        return WeightBundle(self.version, {}, self.peft_config, self.adapter, self.mask_decoder)

    def __reduce__(self):
        # Tensors travel as numpy arrays: Ray hands numpy buffers out of its object store without pickling
        # them (a 14 MB bundle reaches an actor in ~5 ms, copy included, instead of ~21 ms as torch tensors).
        return _unpack_bundle, (self.version, _pack(self.lora), self.peft_config, _pack(self.adapter),
                                None if self.mask_decoder is None else _pack(self.mask_decoder),
                                None if self.token_rows is None else _pack(self.token_rows))


_VIEW_AS = {torch.bfloat16: torch.int16}  # dtypes numpy lacks travel as same-width integers


def _pack(tensors: Dict[str, torch.Tensor]) -> Dict[str, tuple]:
    out = {}
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        out[name] = (t.view(_VIEW_AS[t.dtype]) if t.dtype in _VIEW_AS else t).numpy(), str(t.dtype)
    return out


def _unpack(packed: Dict[str, tuple]) -> Dict[str, torch.Tensor]:
    out = {}
    for name, (array, dtype) in packed.items():
        # a copy: arrays from Ray's object store are read-only shared memory, and a tensor written in place
        # later must not point there (the copy costs ~1/10 of unpickling tensors)
        t = torch.from_numpy(np.array(array, copy=True))
        want = getattr(torch, dtype.removeprefix("torch."))
        out[name] = t.view(want) if t.dtype != want else t
    return out


def _unpack_bundle(version, lora, peft_config, adapter, mask_decoder, token_rows=None) -> WeightBundle:
    return WeightBundle(version, _unpack(lora), peft_config, _unpack(adapter),
                        None if mask_decoder is None else _unpack(mask_decoder),
                        None if token_rows is None else _unpack(token_rows))


@dataclass
class ForwardResult:
    """The learner's pass over the rollouts (flattened: prompt-major, G per prompt)."""
    logprobs: List[np.ndarray]  # per completion, the policy before the update (eval mode; diagnostics)
    ref_logprobs: List[np.ndarray]  # per completion, KL reference (learner.reference); [] when kl_beta = 0
    seg_states: np.ndarray  # [N, H] float32 hidden state at `<seg>` (zeros where absent)
    seg_found: np.ndarray  # [N] bool

    def select(self, rows) -> "ForwardResult":
        """The completions at `rows` (indices into the flattened batch), in that order."""
        rows = [int(r) for r in rows]
        return ForwardResult([self.logprobs[r] for r in rows], [self.ref_logprobs[r] for r in rows] if self.ref_logprobs else [],
                             self.seg_states[rows], self.seg_found[rows])


@dataclass
class Advantages:
    """Per-completion advantages [P, G] of a batch of P prompt groups, and which groups to train on."""
    values: np.ndarray  # [P, G] float64
    keep: np.ndarray  # [P] bool: False = no reward variance and learner.drop_zero_variance is on


@dataclass
class ScoreItem:
    """One completion to score: its text, its `<seg>` state and the ground truth of its image."""
    sample_id: str
    text: str
    seg_state: Optional[np.ndarray]  # [H] or None when no `<seg>` was found
    image: np.ndarray
    gt_masks: List[np.ndarray]
    gt_boxes: np.ndarray


@dataclass
class Score:
    total: float
    components: Dict[str, float]  # one unweighted value per reward term (`reward.terms`); `total` is weighted
    reasons: List[str]  # why a component was 0/min because of bad output
    dice: float
    iou: float
    format_ok: bool
