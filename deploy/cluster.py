"""Ray bootstrap: local mode (in-process `ray.init`, no `ray start`) or joining a running cluster."""
from __future__ import annotations

import os

from common.config import TrainConfig

# Actors inherit these: vLLM's engine core runs in the actor's process; tokenizers stay single-threaded.
ACTOR_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}


def init_ray(cfg: TrainConfig):
    import ray

    for key, value in ACTOR_ENV.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return ray
    runtime_env = {"env_vars": dict(ACTOR_ENV)}
    if cfg.cluster.mode == "cluster" or os.environ.get("RAY_ADDRESS"):
        # Under `ray job submit` RAY_ADDRESS is set and the job's runtime env (deploy/runtime_env.yaml, which
        # carries the same env vars) applies; `address="auto"` joins a node started with `ray start`.
        ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), log_to_driver=True)
    else:
        ray.init(num_cpus=cfg.cluster.num_cpus or max(4, needed_cpus(cfg)), num_gpus=cfg.cluster.num_gpus,
                 include_dashboard=False, runtime_env=runtime_env, log_to_driver=True)
    return ray


def needed_cpus(cfg: TrainConfig) -> int:
    """Logical CPUs the actors reserve (one each); Ray CPUs are scheduling slots, not cores."""
    c = cfg.cluster
    return c.learner_workers + c.rollout_workers + c.reward_workers


def placement_summary(cfg: TrainConfig) -> str:
    c = cfg.cluster
    return (f"learner {c.learner_workers}x(gpu {c.learner_gpus}), rollout {c.rollout_workers}x(gpu "
            f"{c.rollout_gpus_per_worker}), reward {c.reward_workers}x(gpu {c.reward_gpus_per_worker})")


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
