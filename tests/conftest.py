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
    from coreseg.common.models.policy import ensure_policy_dir

    return ensure_policy_dir("tiny", ASSETS)


@pytest.fixture(scope="session")
def tiny_sam():
    from coreseg.common.models.sam import build_tiny_sam

    return build_tiny_sam()


@pytest.fixture(scope="session")
def synth_samples():
    from coreseg.common.synth import generate

    return generate(48, image_size=112, seed=0, progress=False)


@pytest.fixture(scope="session")
def synth_parquet(tmp_path_factory, synth_samples) -> Path:
    from coreseg.common.data import write_parquet

    return write_parquet(synth_samples, tmp_path_factory.mktemp("data") / "synth.parquet")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole pytest run, started on first use: 8 logical CPU slots (the largest test
    reserves 4: the driver's learner, rollout and two reward workers), actors get the env vars of
    deploy.cluster.ACTOR_ENV. A Ray already started in this process (a Driver's `init_ray`) is used as it is."""
    import ray

    from coreseg.deploy.cluster import ACTOR_ENV

    if ray.is_initialized():
        yield ray
        return
    ray.init(num_cpus=8, include_dashboard=False, runtime_env={"env_vars": dict(ACTOR_ENV)})
    yield ray
    ray.shutdown()


def in_process_tiny_config(tmp_path_factory, name: str, overrides):
    """The tiny preset on 24 fresh synthetic samples, run NAME in its own runs folder, the transformers engine and
    2 prompts of 24 new tokens per step (what the in-process driver tests run), plus `overrides`; returns
    (cfg, run folder)."""
    from coreseg.common.config import load_config
    from coreseg.common.synth import write_synth

    data = tmp_path_factory.mktemp("data")
    write_synth(data, 24, 112, 0)
    runs = tmp_path_factory.mktemp("runs")
    cfg = load_config("tiny_cpu", [f"data.path={data}", f"run.output_dir={runs}", f"run.name={name}",
                                   "data.batch_size=2", "rollout.max_new_tokens=24", "rollout.engine=hf",
                                   *overrides])
    return cfg, runs / name
