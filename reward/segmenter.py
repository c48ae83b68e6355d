"""SAM through the prompt adapter, with an image-embedding cache.

The image encoder is frozen, so an embedding is a pure function of the image: each is computed once and
kept in an LRU (bounded in bytes) keyed by sample id, shared by the G rollouts of a prompt and by later
epochs. All `<seg>` states of one image are decoded in one mask-decoder call.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from common.models.sam import encode_images, upscale_masks
from common.models.segment import decode_masks


class EmbeddingCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._items: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    def get(self, key: str) -> Optional[torch.Tensor]:
        value = self._items.get(key)
        if value is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: str, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        if key in self._items:
            self.bytes -= self._items.pop(key).numel() * value.element_size()
        while self._items and self.bytes + size > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
            self.evictions += 1
        self._items[key] = value
        self.bytes += size

    def __len__(self) -> int:
        return len(self._items)

    def load_file(self, path: str | Path) -> int:
        """Warm from a safetensors file written by `coreseg data embed` (keys are sample ids)."""
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        for key, value in tensors.items():
            self.put(key, value.float())
        return len(tensors)


class Segmenter:
    def __init__(self, sam, adapter, cache_bytes: int = 256 << 20, mask_threshold: float = 0.0):
        self.sam = sam.eval()
        self.adapter = adapter.eval()
        self.cache = EmbeddingCache(cache_bytes)
        self.mask_threshold = mask_threshold
        self.encoder_calls = 0  # images passed through the image encoder

    def embeddings(self, ids: Sequence[str], images: Sequence[np.ndarray]) -> torch.Tensor:
        out: Dict[str, torch.Tensor] = {}
        missing = []
        for sid, image in zip(ids, images):
            if sid in out:
                continue
            cached = self.cache.get(sid)
            if cached is None:
                missing.append((sid, image))
            else:
                out[sid] = cached
        if missing:
            fresh = encode_images(self.sam, [im for _, im in missing])
            self.encoder_calls += len(missing)
            for (sid, _), emb in zip(missing, fresh):
                out[sid] = emb
                self.cache.put(sid, emb)
        return torch.stack([out[sid] for sid in ids])

    @torch.no_grad()
    def masks(self, ids: Sequence[str], images: Sequence[np.ndarray], seg_states: torch.Tensor,
              image_index: Optional[Sequence[int]] = None) -> List[np.ndarray]:
        """Binary masks at each image's size. ids/images: one per distinct image; seg_states [M, H];
        image_index[m] says which image state m belongs to (default: one state per image)."""
        if image_index is None:
            image_index = list(range(len(ids)))
        emb = self.embeddings(ids, images)
        index = torch.as_tensor(list(image_index), dtype=torch.long)
        low, _ = decode_masks(self.sam, self.adapter, emb, seg_states.float(), index)
        out = []
        for m, img in enumerate(index.tolist()):
            h, w = images[img].shape[:2]
            logits = upscale_masks(self.sam, low[m:m + 1], h, w)[0, 0]
            out.append((logits > self.mask_threshold).cpu().numpy())
        return out

    def stats(self) -> Dict[str, float]:
        return {"cache_hits": self.cache.hits, "cache_misses": self.cache.misses, "cache_items": len(self.cache),
                "cache_bytes": self.cache.bytes, "encoder_calls": self.encoder_calls}
