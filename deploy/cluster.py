"""Ray bootstrap: local mode (in-process `ray.init`, no `ray start`) or joining a running cluster; and the
reservation of the run's placement group (deploy/placement.py plans its bundles)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from coreseg.common.actor_pool import RolePlacement
from coreseg.common.config import TrainConfig
from coreseg.deploy.placement import BundlePlan, describe_asked, placement_error, plan_placement

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
    return int(plan_placement(cfg).total()["CPU"])


def placement_summary(cfg: TrainConfig) -> str:
    c = cfg.cluster
    return (f"learner {c.learner_workers}x(gpu {c.learner_gpus}), rollout {c.rollout_workers}x(gpu "
            f"{c.rollout_gpus_per_worker}, tp {cfg.rollout.tensor_parallel_size}), reward {c.reward_workers}x(gpu "
            f"{c.reward_gpus_per_worker}){', colocated' if c.colocate else ''}")


class PlacementTimeout(RuntimeError):
    """The cluster did not give the run's placement group within cluster.placement_timeout_s."""


@dataclass
class Reservation:
    """The run's reserved placement group and its plan; `role(name)` is what that role's pool is built with."""
    group: Any
    plan: BundlePlan

    def role(self, name: str) -> RolePlacement:
        return RolePlacement(self.group, list(self.plan.roles[name]))

    def release(self) -> None:
        from ray.util import remove_placement_group

        remove_placement_group(self.group)


def reserve(cfg: TrainConfig, timeout_s: float | None = None, with_rollout: bool = True) -> Reservation:
    """Creates the placement group of `plan_placement(cfg)` and waits for it (at most `timeout_s`, default
    cluster.placement_timeout_s); a group that does not fit in time is removed and PlacementTimeout names
    what each role asked and what the cluster has."""
    import ray
    from ray.util import placement_group, remove_placement_group

    plan = plan_placement(cfg, with_rollout)
    timeout_s = cfg.cluster.placement_timeout_s if timeout_s is None else timeout_s
    group = placement_group(plan.bundles, strategy=plan.strategy, name="")
    if not group.wait(timeout_seconds=timeout_s):
        remove_placement_group(group)
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        raise PlacementTimeout(placement_error(plan, timeout_s, ray.cluster_resources(), ray.available_resources(),
                                               nodes))
    print(f"[coreseg] placement group ready: {describe_asked(plan)}")
    return Reservation(group, plan)


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
