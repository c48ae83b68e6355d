"""Seeds derived from one root seed and a path of integers (step, worker, request) with numpy's SeedSequence,
so streams never collide the way products with ad-hoc constants can."""
from __future__ import annotations

import numpy as np


def derive_seed(root: int, *path: int) -> int:
    """A 31-bit seed for the stream named by (root, *path); equal inputs give equal seeds."""
    if root < 0 or any(p < 0 for p in path):
        raise ValueError(f"seeds and seed path entries must be >= 0, got {root} and {path}")
    seq = np.random.SeedSequence(int(root), spawn_key=tuple(int(p) for p in path))
    return int(seq.generate_state(1, np.uint32)[0] >> 1)
