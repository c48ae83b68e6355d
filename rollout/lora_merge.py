"""LoRA merged into the served weights: vLLM on CPU (rollout.lora_mode) and the transformers engine.

vLLM-CPU serves LoRA through a torch fallback of the punica kernels that gathers each token's adapter matrices,
which made generation ~2.5x slower than the base model (small preset, 32 sequences). Merging
W = W0 + scale * B @ A into the engine's linear layers costs one GEMM per layer per version and nothing per
token. W0 is always re-read from the checkpoint, so successive versions never accumulate rounding. The LoRA
factors arrive in the learner's dtype (bf16 from a GPU learner); each delta is formed in float32, one layer at a
time, and the merged weight is cast to the engine's dtype.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Dict, Iterator, List, Mapping as MappingType, Optional, Tuple

import torch

PEFT_PREFIX = "base_model.model."


class LoraDeltas(Mapping):
    """{module path (as in the base model): scale * B @ A}, each delta computed in float32 when it is read and not
    kept: merging a version holds one layer's delta at a time, never a second copy of every LoRA-touched weight
    (at the 3B shape with all seven projections, the deltas of all layers would be ~10 GiB in float32)."""

    def __init__(self, pairs: Dict[str, Dict[str, torch.Tensor]], scale: float):
        self._pairs, self.scale = pairs, scale

    def __getitem__(self, module: str) -> torch.Tensor:
        ab = self._pairs[module]
        return self.scale * (ab["B"].float() @ ab["A"].float())

    def __iter__(self) -> Iterator[str]:
        return iter(self._pairs)

    def __len__(self) -> int:
        return len(self._pairs)


def lora_deltas(lora: Dict[str, torch.Tensor], peft_config: dict) -> LoraDeltas:
    """PEFT LoRA tensors (any dtype) -> their deltas by module (float32, computed on read; see LoraDeltas)."""
    if peft_config.get("use_dora"):
        raise ValueError("merged LoRA serving does not support DoRA adapters; use rollout.lora_mode=adapter")
    if peft_config.get("rank_pattern") or peft_config.get("alpha_pattern"):
        raise ValueError("merged LoRA serving needs one rank and alpha for every module (no rank/alpha_pattern)")
    r, alpha = int(peft_config["r"]), float(peft_config["lora_alpha"])
    scale = alpha / (math.sqrt(r) if peft_config.get("use_rslora") else r)
    pairs: Dict[str, Dict[str, torch.Tensor]] = {}
    for name, tensor in lora.items():
        match = re.fullmatch(r"(.+)\.lora_([AB])(?:\.default)?\.weight", name)
        if match is None:
            raise ValueError(f"not a LoRA weight name: {name!r}")
        module = match.group(1).removeprefix(PEFT_PREFIX)
        pairs.setdefault(module, {})[match.group(2)] = tensor
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"LoRA module {module!r} lacks lora_{'B' if 'A' in ab else 'A'}")
    return LoraDeltas(pairs, scale)


class CheckpointReader:
    """Reads single tensors of a safetensors checkpoint folder (memory-mapped, nothing kept); the folder's model
    family says how module names map to checkpoint keys."""

    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        from coreseg.common.models.family import model_family

        self.family = model_family(folder)
        self._files = {}
        for file in sorted(Path(folder).glob("*.safetensors")):
            with safe_open(str(file), "pt") as f:
                self._files.update({k: str(file) for k in f.keys()})
        if not self._files:
            raise FileNotFoundError(f"no *.safetensors in {folder}")

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self._files[key], "pt") as f:
            return f.get_tensor(key)

    def merged(self, key: str, delta: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The checkpoint's weight `key` in float32, plus `delta` when given (shapes must agree)."""
        base = self.get(key).float()
        if delta is None:
            return base
        if delta.shape != base.shape:
            raise ValueError(f"LoRA delta for {key} is {tuple(delta.shape)}, weight is {tuple(base.shape)}")
        return base + delta

    def weight_key(self, module: str) -> str:
        """The checkpoint key of a module's weight (the family lists the names it may have on disk)."""
        for key in self.family.checkpoint_keys(module):
            if key in self._files:
                return key
        raise KeyError(f"LoRA module {module!r} has no weight in the checkpoint")


def merged_weights(model, reader: CheckpointReader, deltas: MappingType[str, torch.Tensor]
                   ) -> Iterator[Tuple[str, torch.Tensor]]:
    """(vLLM module name, full merged weight) for every vLLM linear layer a LoRA module touches, one layer at a
    time (the caller installs each before the next is built).

    vLLM stacks some projections (q/k/v -> qkv_proj, gate/up -> gate_up_proj; `packed_modules_mapping`): such a
    layer's weight is rebuilt whole from its parts' base weights, with the deltas added to the parts that have one.
    """
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    packed = getattr(model, "packed_modules_mapping", {}) or {}
    part_of = {part: (stack, parts) for stack, parts in packed.items() for part in parts}
    layers: Dict[str, List[str]] = {}  # vLLM module -> checkpoint keys of its parts, in stacking order
    module_of: Dict[str, str] = {}  # checkpoint key -> LoRA module (its delta is read when its layer is built)
    for module in deltas:
        key = reader.weight_key(module)
        vllm_name = mapper._map_name(key) if mapper is not None else key
        if vllm_name is None:
            raise KeyError(f"vLLM drops checkpoint weight {key!r}; it cannot carry a LoRA delta")
        prefix, leaf = vllm_name.removesuffix(".weight").rsplit(".", 1)
        key_prefix = key.removesuffix(".weight").rsplit(".", 1)[0]
        stack, parts = part_of.get(leaf, (leaf, [leaf]))
        layers[f"{prefix}.{stack}"] = [f"{key_prefix}.{p}.weight" for p in parts]
        module_of[key] = module
    for name, keys in layers.items():
        yield name, torch.cat([reader.merged(key, deltas[module_of[key]] if key in module_of else None)
                               for key in keys], 0)
