"""Weight bundles <-> PEFT adapter folders and peft models, and where those folders live.

vLLM takes a LoRA adapter only as a folder (LoRARequest.lora_path), so GPU adapter mode writes one per version;
it is the only weight push that touches files. Each folder is named `coreseg-lora-<pid>-*` after the process that
wrote it: the engine removes its own (the previous version on each swap, the rest when it is deleted), and every
new engine removes the folders of processes that no longer exist (an actor killed by `ray.kill` runs no cleanup).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import List, Sequence

FOLDER_PREFIX = "coreseg-lora-"
SHM = Path("/dev/shm")

from coreseg.common.protocol import WeightBundle


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


def adapter_parents() -> List[Path]:
    """Where adapter folders may go: memory-backed /dev/shm when the machine has it, then the temp folder."""
    return ([SHM] if SHM.is_dir() else []) + [Path(tempfile.gettempdir())]


def adapter_parent(num_bytes: int, parents: Sequence[Path] = ()) -> Path:
    """The first parent with room for two versions (the old one is removed only after the new one is served):
    /dev/shm normally; the temp folder where /dev/shm is small (Docker's default is 64 MB, a 3B LoRA r=64 is
    228 MiB in bf16)."""
    parents = list(parents) or adapter_parents()
    for parent in parents:
        if shutil.disk_usage(parent).free >= 2 * num_bytes:
            return parent
    raise OSError(f"no room for a {num_bytes / 2**20:.0f} MiB LoRA adapter folder in {[str(p) for p in parents]}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def sweep_stale_adapter_folders(parents: Sequence[Path] = ()) -> List[Path]:
    """Remove the `coreseg-lora-<pid>-*` folders whose process is gone; returns what was removed."""
    removed = []
    for parent in list(parents) or adapter_parents():
        for folder in parent.glob(f"{FOLDER_PREFIX}*"):
            match = re.fullmatch(rf"{FOLDER_PREFIX}(\d+)-.+", folder.name)
            if match and folder.is_dir() and not _alive(int(match.group(1))):
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
    return removed


def new_adapter_folder(parent: Path, version: int) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-v{version}-", dir=parent))
