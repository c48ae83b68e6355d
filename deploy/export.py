"""`coreseg export RUN [--checkpoint C] --base MODEL --out DIR`: a trained run as a folder that stock transformers,
peft and segment-anything load from anywhere, without coreseg.

    DIR/policy/            PEFT LoRA adapter (adapter_config.json's base_model_name_or_path = MODEL, the base
                           model's local path or hub id) + the tokenizer and processor with `<seg>` +
                           coreseg_prompt.json (the system turn and the user text the policy was trained on,
                           the run's answer length and the token ids it never samples)
    DIR/segmenter/         prompt_adapter.safetensors, mask_decoder.safetensors (when trained), sam.safetensors
                           (only for a SAM without a checkpoint file: tiny or random init), segmenter.json
    DIR/coreseg_segmenter/ the loader (common/models/segmenter_loader.py) and the three modules it needs
    DIR/merged/            with --merged: the base model with the LoRA merged in (a plain transformers model
                           folder, in the base's dtype) + the tokenizer and processor
    DIR/export.json        where it came from: run, checkpoint, steps, base

The run folder is only read.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import torch

from coreseg.common.config import load_config

PROMPT_FILE = "coreseg_prompt.json"
LOADER_SOURCES = {"__init__.py": "segmenter_loader.py", "adapter.py": "adapter.py", "sam.py": "sam.py",
                  "segment.py": "segment.py"}


class ExportError(ValueError):
    """A run, checkpoint or output folder that cannot be exported (the message names it)."""


def checkpoint_folder(run_dir: Path, checkpoint: Optional[str]) -> Path:
    """The checkpoint to export: `checkpoint` (a folder, or a name under RUN/checkpoints), else the run's latest."""
    root = run_dir / "checkpoints"
    if checkpoint:
        path = Path(checkpoint)
        path = path if path.is_dir() else root / checkpoint
    else:
        latest = root / "latest"
        if not latest.is_file():
            raise ExportError(f"{run_dir}: no checkpoints/latest (the run saved no checkpoint; name one with "
                              "--checkpoint)")
        path = root / latest.read_text().strip()
    if not (path / "learner" / "peft" / "adapter_config.json").is_file():
        raise ExportError(f"{path}: not a checkpoint folder (no learner/peft/adapter_config.json)")
    return path


def _write_policy(cfg, learner: Path, policy_dir: Path, base: str, out: Path) -> None:
    from transformers import AutoProcessor

    from coreseg.common.models.segmenter_loader import TOKEN_ROWS_FILE

    shutil.copytree(learner / "peft", out)
    if (learner / "token_rows.safetensors").is_file():  # the trained `<seg>` rows: not part of a LoRA adapter
        shutil.copyfile(learner / "token_rows.safetensors", out / TOKEN_ROWS_FILE)
    config_path = out / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    # the tokenizer (with `<seg>` and its chat template) and the image processor the run trained with
    AutoProcessor.from_pretrained(str(policy_dir)).save_pretrained(str(out))
    # the prompt the policy was trained on (the system turn, the user text around the question, after the image)
    # and how the run generated: its answer length and the vision tokens that are never sampled
    from coreseg.common.models.policy import policy_info
    from coreseg.common.prompts import USER_INSTRUCTION

    prompt = {"system": cfg.model.system_prompt, "user": USER_INSTRUCTION, "max_new_tokens": cfg.rollout.max_new_tokens,
              "suppress_tokens": list(policy_info(policy_dir).vision_token_ids)}
    (out / PROMPT_FILE).write_text(json.dumps(prompt, indent=2))


def _write_segmenter(cfg, learner: Path, out: Path) -> None:
    from safetensors.torch import load_file, save_file

    from coreseg.common.models import segmenter_loader as loader
    from coreseg.common.models.sam import build_sam

    out.mkdir(parents=True)
    adapter = load_file(str(learner / "adapter.safetensors"))
    save_file(adapter, str(out / loader.ADAPTER_FILE))
    decoder = learner / "mask_decoder.safetensors"
    if decoder.exists():
        shutil.copyfile(decoder, out / loader.MASK_DECODER_FILE)
    if not cfg.model.sam_checkpoint:  # tiny or random init: the weights exist only as this seed's build
        sam = build_sam(cfg.model.sam_type, "", seed=cfg.run.seed)
        if decoder.exists():
            sam.mask_decoder.load_state_dict(load_file(str(decoder)))
        save_file({k: v.contiguous() for k, v in sam.state_dict().items()}, str(out / loader.SAM_FILE))
    prompt_dim, llm_hidden = adapter["proj_in.weight"].shape
    blocks = len({k.split(".")[1] for k in adapter if k.startswith("res_mlp.")})
    config = {"llm_hidden": int(llm_hidden), "prompt_dim": int(prompt_dim),
              "num_queries": int(adapter["queries"].shape[0]), "num_blocks": blocks,
              "sam_type": cfg.model.sam_type, "sam_checkpoint_name": Path(cfg.model.sam_checkpoint).name,
              "mask_threshold": float(cfg.reward.mask_threshold)}
    (out / loader.CONFIG_FILE).write_text(json.dumps(config, indent=2))


def _write_merged(learner: Path, policy_dir: Path, out: Path) -> None:
    """Base + LoRA merged into one transformers model folder (loaded and saved in the base's own dtype)."""
    from peft import PeftModel
    from transformers import AutoProcessor

    from coreseg.common.models.policy import load_policy

    base, _ = load_policy(policy_dir, "auto")
    merged = PeftModel.from_pretrained(base, str(learner / "peft")).merge_and_unload()
    if (learner / "token_rows.safetensors").is_file():
        from safetensors.torch import load_file

        from coreseg.common.models.token_rows import write_rows_torch

        with torch.no_grad():
            write_rows_torch(merged, load_file(str(learner / "token_rows.safetensors")))
    merged.save_pretrained(str(out), safe_serialization=True)
    AutoProcessor.from_pretrained(str(policy_dir)).save_pretrained(str(out))


def _write_loader(out: Path) -> None:
    models = Path(__file__).resolve().parent.parent / "common" / "models"
    out.mkdir()
    for target, source in LOADER_SOURCES.items():
        shutil.copyfile(models / source, out / target)


def export_run(run_dir: str | Path, out_dir: str | Path, base: str, checkpoint: Optional[str] = None,
               merged: bool = False) -> Path:
    """Writes the export of `run_dir`'s checkpoint into `out_dir` (a new folder; built as OUT.tmp and renamed);
    `merged`: also the merged policy."""
    run_dir, out_dir = Path(run_dir).resolve(), Path(out_dir).resolve()
    if not (run_dir / "config.yaml").is_file():
        raise ExportError(f"{run_dir}: not a run folder (no config.yaml)")
    if out_dir.exists():
        raise ExportError(f"{out_dir} already exists; export into a new folder")
    if not base:
        raise ExportError("--base is required: the base model's local folder or hub id, written into the "
                          "adapter's base_model_name_or_path")
    base_path = Path(base).expanduser()
    if base_path.exists():
        if not (base_path / "config.json").is_file():
            raise ExportError(f"--base {base}: no config.json there (a base model folder or a hub id)")
        base = str(base_path.resolve())
    cfg = load_config(str(run_dir / "config.yaml"))
    ckpt = checkpoint_folder(run_dir, checkpoint)
    learner = ckpt / "learner"
    from coreseg.common.models.policy import ensure_policy_dir

    # the folder the run trained on (config.yaml holds absolute paths): its tokenizer and processor carry `<seg>`
    trained_on = ensure_policy_dir(cfg.model.policy, cfg.model.assets_dir, cfg.run.seed)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_policy(cfg, learner, trained_on, base, tmp / "policy")
        _write_segmenter(cfg, learner, tmp / "segmenter")
        _write_loader(tmp / "coreseg_segmenter")
        if merged:
            _write_merged(learner, trained_on, tmp / "merged")
        driver = ckpt / "driver.json"
        steps = json.loads(driver.read_text()).get("step", {}) if driver.is_file() else {}
        (tmp / "export.json").write_text(json.dumps({"run": str(run_dir), "checkpoint": ckpt.name, "steps": steps,
                                                     "base": base, "trained_on": str(trained_on)}, indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.rename(out_dir)
    return out_dir
