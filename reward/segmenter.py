"""SAM through the prompt adapter, with an image-embedding cache.

The image encoder is frozen, so an embedding is a pure function of the image: each is computed once and
kept in an LRU (bounded in bytes) keyed by `common.images.image_key` (sample id + a digest of the pixels:
two images that share an id never share an entry), shared by the G rollouts of a prompt and by later
epochs, optionally warm-started from a file written by `reward.embed`. All `<seg>` states of one image
are decoded in one mask-decoder call.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from coreseg.common.byte_cache import EmbeddingCache
from coreseg.common.images import IMAGE_KEY_SCHEME, image_keys
from coreseg.common.models.sam import encode_images, upscale_masks
from coreseg.common.models.segment import decode_masks


class Segmenter:
    """Frozen SAM image encoder + cache; the adapter and mask decoder turn `<seg>` states into masks."""

    def __init__(self, sam, adapter, cache_bytes: int = 256 << 20, mask_threshold: float = 0.0,
                 device: str = "cpu"):
        self.device = torch.device(device)  # the caller's configured device, never a guess
        self.sam = sam.eval().to(self.device)
        self.adapter = adapter.eval().to(self.device)
        for p in self.sam.image_encoder.parameters():
            p.requires_grad_(False)
        self.cache = EmbeddingCache(cache_bytes)
        self.mask_threshold = float(mask_threshold)
        self.encoder_calls = 0  # images passed through the image encoder

    def embedding_shape(self) -> tuple:
        grid = self.sam.prompt_encoder.image_embedding_size
        return (self.sam.prompt_encoder.embed_dim, *grid)

    def warm_start(self, path: str | Path, expect_meta: Optional[Dict[str, str]] = None) -> int:
        """Fill the cache from a safetensors file written by `reward.embed` (keys are `image_key`s).
        expect_meta: metadata that must match (e.g. the SAM it was computed with). Returns the number of
        embeddings loaded (the LRU bound still applies)."""
        from safetensors import safe_open

        want = self.embedding_shape()
        loaded = 0
        if not Path(path).exists():
            raise FileNotFoundError(f"reward.embed_cache_path={str(path)!r} does not exist (run `coreseg data embed`)")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("keys") != IMAGE_KEY_SCHEME:
                raise ValueError(f"{path}: embeddings keyed by {meta.get('keys', 'sample id')!r}, this worker keys "
                                 f"them by {IMAGE_KEY_SCHEME!r} (an id alone can stand for another image): "
                                 "re-run `coreseg data embed`")
            for key, value in (expect_meta or {}).items():
                if key in meta and meta[key] != str(value):
                    raise ValueError(f"{path}: embeddings were computed with {key}={meta[key]!r}, "
                                     f"this worker has {key}={value!r}")
            for key in f.keys():
                value = f.get_tensor(key)
                if tuple(value.shape) != want:
                    raise ValueError(f"{path}: embedding {key!r} has shape {tuple(value.shape)} but this SAM "
                                     f"gives {want} (precomputed with another model.sam_type?)")
                self.cache.put(key, value.float().to(self.device))
                loaded += 1
        return loaded

    def embeddings(self, ids: Sequence[str], images: Sequence[np.ndarray]) -> torch.Tensor:
        """[N, C, g, g] for N images (ids: their sample ids); only images missing from the cache go through
        the encoder."""
        return self._embeddings(image_keys(ids, images), images)

    def _embeddings(self, keys: Sequence[str], images: Sequence[np.ndarray]) -> torch.Tensor:
        def encode(missing: List[np.ndarray]) -> torch.Tensor:
            self.encoder_calls += len(missing)
            return encode_images(self.sam, missing)

        return torch.stack(self.cache.get_or_compute(keys, images, encode))

    @torch.no_grad()
    def masks(self, items: Sequence) -> List[np.ndarray]:
        """One HxW bool mask per item (anything with .sample_id, .image, .seg_state [H], finite).
        Items of one image share one embedding and one decoder call."""
        if not items:
            return []
        keys = image_keys([item.sample_id for item in items], [item.image for item in items])
        order: Dict[str, int] = {}  # by image key, not sample id: two images with one id stay apart
        images = []
        for key, item in zip(keys, items):
            if key not in order:
                order[key] = len(order)
                images.append(item.image)
        states = np.stack([np.asarray(item.seg_state, np.float32) for item in items])
        return self._masks(list(order), images, torch.from_numpy(states), [order[key] for key in keys])

    @torch.no_grad()
    def masks_for(self, ids: Sequence[str], images: Sequence[np.ndarray], seg_states: torch.Tensor,
                  image_index: Optional[Sequence[int]] = None) -> List[np.ndarray]:
        """ids/images: one per distinct image; seg_states [M, H]; image_index[m]: the image of state m
        (default: one state per image). Masks at each image's size, thresholded at `mask_threshold`."""
        if image_index is None:
            image_index = list(range(len(ids)))
        return self._masks(image_keys(ids, images), images, seg_states, image_index)

    def _masks(self, keys: Sequence[str], images: Sequence[np.ndarray], seg_states: torch.Tensor,
               image_index: Sequence[int]) -> List[np.ndarray]:
        emb = self._embeddings(keys, images)
        index = torch.as_tensor(list(image_index), dtype=torch.long, device=self.device)
        low, _ = decode_masks(self.sam, self.adapter, emb, seg_states.float().to(self.device), index)
        out: List[Optional[np.ndarray]] = [None] * len(index)
        for img in torch.unique(index).tolist():
            rows = (index == img).nonzero(as_tuple=True)[0]
            h, w = images[img].shape[:2]
            binary = (upscale_masks(self.sam, low[rows], h, w)[:, 0] > self.mask_threshold).cpu().numpy()
            for j, r in enumerate(rows.tolist()):
                out[r] = binary[j]
        return out  # type: ignore[return-value]

    def stats(self) -> Dict[str, float]:
        return {"cache_hits": self.cache.hits, "cache_misses": self.cache.misses, "cache_items": len(self.cache),
                "cache_bytes": self.cache.bytes, "cache_evictions": self.cache.evictions,
                "encoder_calls": self.encoder_calls}
