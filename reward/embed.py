"""Precompute SAM image embeddings for one split of a Parquet data set (`coreseg data embed`).

The file is safetensors, one [256, g, g] float32 tensor per image, keyed like the reward's cache
(`common.images.image_key`: sample id + a digest of the pixels, so an entry can never stand for another
image, e.g. after the data changed), with the SAM it came from and the key scheme in the metadata; reward
workers warm their cache from it (`reward.embed_cache_path`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch

from coreseg.common.data import LesionDataset
from coreseg.common.images import IMAGE_KEY_SCHEME, image_key
from coreseg.common.models.sam import build_sam, encode_images


def _model_cfg(sam_cfg):
    """Accept a TrainConfig or its ModelConfig (anything with sam_type / sam_checkpoint)."""
    return getattr(sam_cfg, "model", sam_cfg)


def precompute_embeddings(parquet_path: str | Path, split: str, out_path: str | Path, sam_cfg,
                          batch_size: int = 8, seed: int = 0) -> Path:
    """Encode every image of `split` once; write {sample id: embedding} to `out_path` (safetensors)."""
    from safetensors.torch import save_file

    model = _model_cfg(sam_cfg)
    run = getattr(sam_cfg, "run", None)
    seed = run.seed if run is not None else seed  # random-init SAMs must match the workers' seed
    from coreseg.common.storage import local_file

    sam = build_sam(model.sam_type, local_file(model.sam_checkpoint), seed=seed)
    if torch.cuda.is_available():
        sam = sam.cuda()
    data = getattr(sam_cfg, "data", None)
    dataset = LesionDataset(str(parquet_path), split, batch_size=batch_size, shuffle=False,
                            **({"max_image_pixels": data.max_image_pixels} if data is not None else {}))
    tensors: Dict[str, torch.Tensor] = {}
    for samples in dataset.iter_all():
        embs = encode_images(sam, [s.image for s in samples], batch_size=batch_size)
        for s, emb in zip(samples, embs):
            tensors[image_key(s.id, s.image)] = emb.float().cpu().contiguous()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"sam_type": model.sam_type, "sam_checkpoint": str(model.sam_checkpoint), "split": split,
            "seed": str(seed), "count": str(len(tensors)), "keys": IMAGE_KEY_SCHEME}
    save_file(tensors, str(out), metadata=meta)
    return out
