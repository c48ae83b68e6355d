"""Learner checkpoints: PEFT adapter folder (PeftModel.from_pretrained / vLLM LoRARequest), adapter,
mask-decoder and trained token-row safetensors (for inspection and export; resuming reads DeepSpeed's state), DeepSpeed optimizer state (trainable parameters only), version and RNG states."""
from __future__ import annotations

import json
import pickle
import random
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def save_learner(core, path: str) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    core.engine.save_checkpoint(str(path / "deepspeed"), tag="state", exclude_frozen_parameters=True)
    if core.rank == 0:
        module = core.module
        module.policy.save_pretrained(str(path / "peft"))
        bundle = module.bundle(core.version)
        save_file(bundle.adapter, str(path / "adapter.safetensors"))
        if bundle.mask_decoder is not None:
            save_file(bundle.mask_decoder, str(path / "mask_decoder.safetensors"))
        if bundle.token_rows is not None:
            save_file(bundle.token_rows, str(path / "token_rows.safetensors"))
        if module.reference_lora is not None:
            save_file({n: t.cpu().contiguous() for n, t in module.reference_lora.items()},
                      str(path / "reference_lora.safetensors"))
    save_file({"torch": torch.get_rng_state()}, str(path / f"rng_rank{core.rank}.safetensors"))
    np_state = np.random.get_state()
    meta = {"version": core.version, "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]]}
    (path / f"state_rank{core.rank}.json").write_text(json.dumps(meta))


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file would need unpickling of arbitrary objects (code could run): refused."""


def _deepspeed_safe_globals() -> list:
    """The classes DeepSpeed's own checkpoint files hold besides tensors and plain containers (found by loading
    its files with weights_only=True); rebuilt from their state, never by calling arbitrary code."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


@contextmanager
def weights_only_loads(where: Path):
    """Inside, every `torch.load` (DeepSpeed asks for weights_only=False) runs with weights_only=True and only
    DeepSpeed's known classes allowed; anything else is an UnsafeCheckpointError naming the folder."""
    real_load = torch.load

    def safe_load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                return real_load(f, *args, **kwargs)
        except pickle.UnpicklingError as err:
            reason = str(err).strip().splitlines()
            detail = next((line.strip() for line in reason if "GLOBAL" in line), reason[0] if reason else "")
            raise UnsafeCheckpointError(f"refusing to load {f} (under {where}): it needs unpickling of objects other "
                                        f"than tensors and DeepSpeed's own state ({detail})") from None

    torch.load = safe_load
    try:
        yield
    finally:
        torch.load = real_load


def load_learner(core, path: str) -> None:
    path = Path(path)
    with weights_only_loads(path):
        core.engine.load_checkpoint(str(path / "deepspeed"), tag="state", load_module_strict=False)
    meta = json.loads((path / f"state_rank{core.rank}.json").read_text())
    core.version = int(meta["version"])
    ref = path / "reference_lora.safetensors"  # written once GRPO has started; identical on every rank
    core.module.reference_lora = ({n: t.to(core.device) for n, t in load_file(str(ref)).items()}
                                  if ref.exists() else None)
    torch.set_rng_state(load_file(str(path / f"rng_rank{core.rank}.safetensors"))["torch"])
    n = meta["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), *n[2:]))
    p = meta["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
