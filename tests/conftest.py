"""Shared fixtures: tiny models and a small synthetic data set, built once per test session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # vLLM engine core in-process (actors, tests)
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / ".cache" / "coreseg"


@pytest.fixture(scope="session")
def tiny_policy_dir() -> Path:
    """The tiny Qwen2.5-VL folder (tokenizer with <seg>, processor, random weights); built once."""
    from common.models.policy import ensure_policy_dir

    return ensure_policy_dir("tiny", ASSETS)


@pytest.fixture(scope="session")
def tiny_sam():
    from common.models.sam import build_tiny_sam

    return build_tiny_sam()


@pytest.fixture(scope="session")
def synth_samples():
    from common.synth import generate

    return generate(48, image_size=112, seed=0, progress=False)


@pytest.fixture(scope="session")
def synth_parquet(tmp_path_factory, synth_samples) -> Path:
    from common.data import write_parquet

    return write_parquet(synth_samples, tmp_path_factory.mktemp("data") / "synth.parquet")
