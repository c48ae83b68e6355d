"""The bundle plan: which Ray placement-group bundles the run reserves and which actor goes in which (pure; no Ray).

One placement group holds every role, so the run is gang-scheduled: it starts when all of it fits, or fails
after `cluster.placement_timeout_s` naming what was asked (deploy/cluster.py). Bundles, in order:
- learner rank r: one bundle {CPU 1, GPU learner_gpus};
- rollout worker w: `rollout.tensor_parallel_size` (TP) bundles of rollout_gpus_per_worker / TP GPUs each (one
  per TP rank); the worker actor sits in the first (CPU 1). With TP = 1 the actor holds the GPU share itself;
  with TP > 1 vLLM's Ray executor starts one worker per bundle, each asking rank_gpus of it;
- reward worker k: one bundle {CPU 1, GPU reward_gpus_per_worker} (fractions allowed).
Colocated (`cluster.colocate`): rollout workers get no bundles of their own: engine w's TP ranks use learner
bundles w*TP .. w*TP+TP-1, so each GPU holds one learner rank and one vLLM rank, each asking COLOCATED_SHARE of
it (Ray's bookkeeping; the memory split is vLLM's gpu_memory_utilization and its sleep mode)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

from coreseg.common.actor_pool import ActorSlot
from coreseg.common.config import TrainConfig

ROLES = ("learner", "rollout", "reward")
COLOCATED_SHARE = 0.5  # of a shared GPU, asked by the learner rank and by the vLLM rank on it


@dataclass(frozen=True)
class BundlePlan:
    bundles: List[Dict[str, float]]  # resources per bundle, e.g. {"CPU": 1.0, "GPU": 1.0}
    roles: Dict[str, List[ActorSlot]]  # per role, one slot per actor
    strategy: str  # PACK | SPREAD | STRICT_PACK | STRICT_SPREAD

    def asked(self, role: str) -> Dict[str, float]:
        """What a role's actors ask: bundles they use, CPUs, GPUs (actors and their TP ranks together)."""
        slots = self.roles.get(role, [])
        used = {b for s in slots for b in (s.bundles or (s.bundle,))}
        gpus = sum(s.gpus + s.rank_gpus * len(s.bundles) for s in slots)
        return {"bundles": float(len(used)), "CPU": float(sum(s.cpus for s in slots)), "GPU": float(gpus)}

    def total(self) -> Dict[str, float]:
        return {key: float(sum(b.get(key, 0.0) for b in self.bundles)) for key in ("CPU", "GPU")}


def plan_placement(cfg: TrainConfig, with_rollout: bool = True) -> BundlePlan:
    """with_rollout=False (an SFT-only driver): no rollout workers, no bundles for them."""
    c, tp = cfg.cluster, cfg.rollout.tensor_parallel_size
    bundles: List[Dict[str, float]] = []

    def add(cpus: float, gpus: float) -> int:
        bundles.append({k: float(v) for k, v in (("CPU", cpus), ("GPU", gpus)) if v})
        return len(bundles) - 1

    learner = []
    for _ in range(c.learner_workers):
        b = add(1, c.learner_gpus)
        learner.append(ActorSlot(b, 1.0, COLOCATED_SHARE if c.colocate else float(c.learner_gpus), (b,)))
    rollout = []
    for w in range(c.rollout_workers if with_rollout else 0):
        if c.colocate:  # the learner's bundles (config validation: rollout_workers * TP == learner_workers)
            ranks = tuple(learner[w * tp + j].bundle for j in range(tp))
            bundles[ranks[0]]["CPU"] += 1
            share = COLOCATED_SHARE
        else:
            share = c.rollout_gpus_per_worker / tp
            ranks = (add(1, share),) + tuple(add(0, share) for _ in range(tp - 1))
        # TP = 1: the actor holds its GPU share; TP > 1: its engine's Ray workers hold one share per bundle
        rollout.append(ActorSlot(ranks[0], 1.0, share if tp == 1 else 0.0, ranks, share if tp > 1 else 0.0))
    reward = []
    for _ in range(c.reward_workers):
        b = add(1, c.reward_gpus_per_worker)
        reward.append(ActorSlot(b, 1.0, float(c.reward_gpus_per_worker), (b,)))
    return BundlePlan(bundles, {"learner": learner, "rollout": rollout, "reward": reward}, c.placement_strategy)


def _fmt(x: float) -> str:
    return f"{x:g}"


def describe_asked(plan: BundlePlan) -> str:
    """e.g. "learner 2 bundles (2 CPU, 2 GPU); rollout ...; in all 5 bundles, 5 CPU, 2 GPU (PACK)"."""
    parts = []
    for role in ROLES:
        a = plan.asked(role)
        parts.append(f"{role} {_fmt(a['bundles'])} bundle{'s' if a['bundles'] != 1 else ''} "
                     f"({_fmt(a['CPU'])} CPU, {_fmt(a['GPU'])} GPU)")
    t = plan.total()
    return (f"{'; '.join(parts)}; in all {len(plan.bundles)} bundles, {_fmt(t['CPU'])} CPU, {_fmt(t['GPU'])} GPU "
            f"({plan.strategy})")


def placement_error(plan: BundlePlan, waited_s: float, cluster: Dict[str, float], available: Dict[str, float],
                    nodes: List[Dict[str, float]]) -> str:
    """The message of a placement that did not fit in time: what was asked, per role, and what the cluster has
    (in all, free now, per node)."""
    def res(d: Dict[str, float]) -> str:
        return f"{_fmt(d.get('CPU', 0.0))} CPU, {_fmt(d.get('GPU', 0.0))} GPU"
    per_node = "; ".join(f"node {i}: {res(n)}" for i, n in enumerate(nodes)) or "no nodes"
    return (f"placement did not fit within cluster.placement_timeout_s={_fmt(waited_s)} s. Asked: "
            f"{describe_asked(plan)}. The cluster has {res(cluster)} (free now: {res(available)}); {per_node}. "
            f"Lower cluster.*_workers / *_gpus, add nodes, or change cluster.placement_strategy.")
