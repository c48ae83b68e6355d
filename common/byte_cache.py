"""A least-recently-used cache bounded by the bytes of the tensors it holds: SAM image embeddings (reward workers
and the learner) and the processor outputs the learner's prompt encoder keeps."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Callable, List, Optional, Sequence

import torch


def _nbytes(value) -> int:
    """Bytes of a tensor, or of the tensors in a dict (a processor's outputs); anything else counts 0."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, Mapping):  # a dict, or transformers' BatchFeature (a UserDict)
        return sum(_nbytes(v) for v in value.values())
    return 0


class EmbeddingCache:
    """LRU of image embeddings (or a processor's tensor dicts) keyed by `image_key`, bounded by the bytes it
    holds."""

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
        size = _nbytes(value)
        if size > self.max_bytes:
            return
        if key in self._items:
            self.bytes -= _nbytes(self._items.pop(key))
        while self._items and self.bytes + size > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= _nbytes(old)
            self.evictions += 1
        self._items[key] = value
        self.bytes += size

    def get_or_compute(self, keys: Sequence[str], inputs: Sequence, compute: Callable[[list], Sequence]) -> List:
        """The value of each key, in order. The keys not held are computed in one batched call, `compute(the
        input of each missing key, once per key)`, and kept."""
        found = {k: self.get(k) for k in dict.fromkeys(keys)}
        missing = {}
        for k, x in zip(keys, inputs):
            if found[k] is None:
                missing.setdefault(k, x)
        if missing:
            for k, value in zip(missing, compute(list(missing.values()))):
                found[k] = value
                self.put(k, value)
        return [found[k] for k in keys]

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)
