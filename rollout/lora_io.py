"""Weight bundles <-> PEFT adapter folders and peft models."""
from __future__ import annotations

import json
from pathlib import Path

from common.protocol import WeightBundle


def write_peft_folder(bundle: WeightBundle, folder: str | Path) -> Path:
    """adapter_model.safetensors + adapter_config.json, loadable by PeftModel.from_pretrained and vLLM."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in bundle.lora.items()}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(bundle.peft_config, indent=1))
    return folder


def lora_config_from_dict(config: dict):
    from peft import LoraConfig

    allowed = set(LoraConfig.__dataclass_fields__)
    return LoraConfig(**{k: v for k, v in config.items() if k in allowed})
