"""Seeds derived from one root seed and a path of integers (step, worker, request) with numpy's SeedSequence,
so streams never collide the way products with ad-hoc constants can."""
from __future__ import annotations

import os

import numpy as np


def derive_seed(root: int, *path: int) -> int:
    """A 31-bit seed for the stream named by (root, *path); equal inputs give equal seeds."""
    if root < 0 or any(p < 0 for p in path):
        raise ValueError(f"seeds and seed path entries must be >= 0, got {root} and {path}")
    seq = np.random.SeedSequence(int(root), spawn_key=tuple(int(p) for p in path))
    return int(seq.generate_state(1, np.uint32)[0] >> 1)


def use_deterministic_kernels(on_gpu: bool) -> None:
    """Make a training process's kernels bit-reproducible for one seed (`learner.deterministic`). Why: by default
    torch's CPU backward of advanced indexing accumulates in parallel, and the order depends on where the allocator
    put the tensors, so two runs of one seed part in the last digits from the second step and then drift apart.
    cuBLAS needs a fixed workspace for it, set before its first call. An op with no deterministic kernel warns
    (torch's warn_only) instead of stopping the run."""
    import torch

    if on_gpu:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    # Its NaN-filling of every new uninitialised tensor is a bug trap, not needed for equal results, and it made CPU
    # SFT steps several times slower (bench/determinism.py times the steps without it)
    torch.utils.deterministic.fill_uninitialized_memory = False
