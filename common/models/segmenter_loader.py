"""An exported segmenter: the prompt adapter and SAM (with its trained mask decoder), loaded from the files
`coreseg export` writes, turning `<seg>` hidden states into masks.

`coreseg export` copies this module into each export as `coreseg_segmenter/__init__.py`, with the three modules it
imports (adapter.py, sam.py, segment.py) beside it, so an export needs only torch, numpy, safetensors and
segment-anything (no coreseg install):

    import sys; sys.path.insert(0, "EXPORT_DIR")
    from coreseg_segmenter import load_segmenter
    segmenter = load_segmenter("EXPORT_DIR/segmenter")          # sam_checkpoint=... for a vit_* SAM
    mask = segmenter.masks([image], seg_states)[0]             # HxW bool
    apply_token_rows(model, "EXPORT_DIR/policy")                 # the trained `<seg>` rows into a loaded policy
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Sequence

import numpy as np
import torch

from .adapter import PromptAdapter
from .sam import build_sam, encode_images, upscale_masks
from .segment import decode_masks

CONFIG_FILE = "segmenter.json"
ADAPTER_FILE = "prompt_adapter.safetensors"
MASK_DECODER_FILE = "mask_decoder.safetensors"
SAM_FILE = "sam.safetensors"  # the whole SAM, written when the run's SAM has no checkpoint file (tiny, random init)
TOKEN_ROWS_FILE = "coreseg_token_rows.safetensors"  # in policy/: the trained embedding rows of `<seg>`


@torch.no_grad()
def apply_token_rows(model, policy_dir) -> bool:
    """Writes the run's trained `<seg>` embedding rows (input, and output when untied) into a loaded policy (a
    transformers or peft model): LoRA adapts only linear layers, so these rows are not in the PEFT adapter.
    False when the export has none (a run with model.train_token_rows=false)."""
    from safetensors.torch import load_file

    path = Path(policy_dir) / TOKEN_ROWS_FILE
    if not path.is_file():
        return False
    rows = load_file(str(path))
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    emb[rows["ids"]] = rows["input"].to(emb)
    if "output" in rows and head.data_ptr() != emb.data_ptr():
        head[rows["ids"]] = rows["output"].to(head)
    return True


class ExportedSegmenter:
    def __init__(self, sam, adapter: PromptAdapter, mask_threshold: float = 0.0):
        self.sam, self.adapter, self.mask_threshold = sam.eval(), adapter.eval(), float(mask_threshold)

    @torch.no_grad()
    def masks(self, images: Sequence[np.ndarray], seg_states: torch.Tensor) -> List[np.ndarray]:
        """One HxW bool mask per image (HxWx3 uint8) from its `<seg>` hidden state (seg_states [N, H]): SAM's
        image embedding, the adapter's prompt tokens, SAM's mask decoder, upsampled to the image and thresholded
        at the run's reward.mask_threshold (logits)."""
        param = next(self.adapter.parameters())
        embeddings = encode_images(self.sam, list(images)).to(param.device)
        index = torch.arange(len(images), device=param.device)
        low, _ = decode_masks(self.sam, self.adapter, embeddings, torch.as_tensor(seg_states).float().to(param.device),
                              index)
        out = []
        for k, image in enumerate(images):
            h, w = image.shape[:2]
            out.append((upscale_masks(self.sam, low[k:k + 1], h, w)[0, 0] > self.mask_threshold).cpu().numpy())
        return out


def load_segmenter(folder: str | Path, sam_checkpoint: str = "", device: str = "cpu") -> ExportedSegmenter:
    """The segmenter in `folder` (segmenter.json + safetensors). A SAM that was trained from a checkpoint file
    (vit_b/l/h, MedSAM) is rebuilt from `sam_checkpoint`, then its mask decoder replaced by the trained one."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    if (folder / SAM_FILE).exists():
        sam = build_sam(config["sam_type"], "", seed=0)
        sam.load_state_dict(load_file(str(folder / SAM_FILE)))
    else:
        if not sam_checkpoint:
            raise ValueError(f"{folder}: this segmenter was trained on the SAM checkpoint "
                             f"{config.get('sam_checkpoint_name')!r} ({config['sam_type']}); pass its path as "
                             f"sam_checkpoint=")
        sam = build_sam(config["sam_type"], sam_checkpoint)
    if (folder / MASK_DECODER_FILE).exists():
        sam.mask_decoder.load_state_dict(load_file(str(folder / MASK_DECODER_FILE)))
    adapter = PromptAdapter(config["llm_hidden"], config["prompt_dim"], config["num_queries"], config["num_blocks"])
    adapter.load_state_dict(load_file(str(folder / ADAPTER_FILE)))
    return ExportedSegmenter(sam.to(device), adapter.to(device), config["mask_threshold"])
