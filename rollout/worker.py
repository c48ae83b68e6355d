"""RolloutWorker (owns one engine; a Ray actor, or in-process) and RolloutPool (an ActorPool of them: shards
requests, keeps order, broadcasts weight bundles by one object ref, brings a restarted worker back with its cores
and the last weights)."""
from __future__ import annotations

import os
from typing import List, Optional, Sequence

import ray
import torch

from coreseg.common.actor_pool import (ActorPool, ActorStateLost, PoolCall, RolePlacement, StaleWeightsError,
                               current_node_id)
from coreseg.common.config import TrainConfig, cpu_threads
from coreseg.common.devices import role_device, role_runtime_env
from coreseg.common.policy_store import stage_policy
from coreseg.common.protocol import RolloutGroup, RolloutRequest, WeightBundle
from coreseg.common.seeding import derive_seed
from coreseg.rollout.engine import Sampling, make_engine


def core_slices(cores: Sequence[int], workers: int, per_worker: int) -> List[List[int]]:
    """Disjoint core sets for `workers` rollout engines on one node, `per_worker` cores each, taken from the
    end of `cores` (the learner's unpinned threads run anywhere). vLLM-CPU binds its OpenMP threads to the
    cores it is given: two engines bound to the same cores each run at a fraction of their speed, so they
    share cores only when the node has fewer cores than engines."""
    cores = sorted(cores)
    per_worker = max(1, min(per_worker, len(cores) // workers or 1))
    pool = cores[len(cores) - min(len(cores), per_worker * workers):]
    return [[pool[(w * per_worker + j) % len(pool)] for j in range(per_worker)] for w in range(workers)]


class RolloutWorker:
    """Started in two steps on CPU, so that engines sharing a node get disjoint cores: the pool asks each
    worker for its node and cores, then `start`s it with its share (in-process: `start(None)`, no pinning)."""

    def __init__(self, cfg: TrainConfig, policy_dir: str, device: str = "cpu", ray_bundles: Sequence[int] = (),
                 rank_gpus: float = 0.0):
        """device: cluster.rollout_gpus_per_worker's (never a guess); ray_bundles/rank_gpus: where a tensor-parallel
        engine's ranks go (see rollout.engine.make_engine)."""
        self.cfg, self.policy_dir, self.engine = cfg, policy_dir, None
        self.device, self.ray_bundles, self.rank_gpus = device, tuple(ray_bundles), rank_gpus

    def node_id(self) -> str:
        return current_node_id()

    def placement(self):
        return ray.get_runtime_context().get_node_id(), sorted(os.sched_getaffinity(0))

    def start(self, cores: Optional[List[int]]) -> int:
        if cores and self.device == "cpu":
            # Ray gives a num_cpus=1 actor OMP_NUM_THREADS=1, which vLLM's CPU backend and HF generate obey
            os.sched_setaffinity(0, cores)
            os.environ["OMP_NUM_THREADS"] = str(len(cores))
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cores))
            torch.set_num_threads(len(cores))
        # the published policy on this node's disk (vLLM loads local folders)
        self.engine = make_engine(self.cfg, stage_policy(self.policy_dir), self.device, self.ray_bundles,
                                  self.rank_gpus)
        return self.engine.version

    def _engine(self):
        if self.engine is None:  # Ray restarted this actor: only `__init__` ran
            raise ActorStateLost("rollout worker has no engine: not started since it (re)started")
        return self.engine

    def num_threads(self) -> int:
        return torch.get_num_threads()

    def generate(self, requests: List[RolloutRequest], n: int, seed: Optional[int] = None, greedy: bool = False,
                 expected_version: Optional[int] = None) -> List[RolloutGroup]:
        """expected_version: raise StaleWeightsError instead of sampling from other weights (a silent restart)."""
        engine = self._engine()
        if expected_version is not None and engine.version != expected_version:
            raise StaleWeightsError(f"rollout worker serves version {engine.version}, pool expects {expected_version}")
        return engine.generate(requests, n, Sampling.from_config(self.cfg, greedy=greedy, seed=seed))

    def load_weights(self, bundle: WeightBundle) -> int:
        return self._engine().load_weights(bundle)

    def version(self) -> int:
        return self._engine().version

    def engine_name(self) -> str:
        return type(self._engine()).__name__

    def loaded_adapters(self) -> List[int]:
        return self._engine().loaded_adapters()

    def errors(self) -> int:
        return self._engine().errors

    def sleep(self) -> None:
        self._engine().sleep()

    def wake_up(self) -> None:
        self._engine().wake_up()


class RolloutPool:
    """`local=True`: the workers' engines run in the caller's process (no Ray, no core pinning). The workers'
    device follows `num_gpus_per_worker` (cluster.rollout_gpus_per_worker); `placement`: worker w in bundle
    slot w, its tensor-parallel ranks in the slot's bundles (Ray mode)."""

    def __init__(self, cfg: TrainConfig, policy_dir, num_workers: int = 1, num_gpus_per_worker: float = 0.0,
                 num_cpus_per_worker: float = 1, *, local: bool = False, placement: Optional[RolePlacement] = None):
        self.cfg, self.on_gpu = cfg, num_gpus_per_worker > 0
        self.asleep = False  # colocated mode: the engines gave their GPU memory to the learner
        self._placements: Optional[list] = None
        self._worker_cores: List[Optional[List[int]]] = [None] * num_workers
        device = role_device(num_gpus_per_worker)

        def args(i: int):
            slot = placement.slots[i] if placement is not None and not local else None
            if slot is None or len(slot.bundles) < 2:
                return (cfg, str(policy_dir), device), {}
            return (cfg, str(policy_dir), device, slot.bundles, slot.rank_gpus), {}

        # max_restarts=-1: Ray restarts a dead worker; the pool starts it on its cores and reloads the last weights
        options = dict(num_cpus=num_cpus_per_worker, num_gpus=num_gpus_per_worker, max_restarts=-1,
                       **role_runtime_env(num_gpus_per_worker))
        self.pool = ActorPool("rollout", RolloutWorker, num_workers, args, options=options, local=local,
                              reinit=self._restart, placement=placement,
                              recover_wait_s=cfg.cluster.recover_wait_s)
        if not local:
            self._placements = self.pool.call_all("placement")
            self._worker_cores = self._cores(self._placements)
        # surfaces engine start errors here
        self.pool.gather([self.pool.submit(i, "start", c) for i, c in enumerate(self._worker_cores)])

    @property
    def workers(self) -> list:
        return self.pool.actors

    def _cores(self, placements) -> List[Optional[List[int]]]:
        """Each worker's cores (None on GPU): the node's rollout share (`cpu_threads`: every core in sync mode,
        half in async mode, or rollout.cpu_threads each) split among the workers placed on that node."""
        if self.on_gpu:
            return [None] * len(placements)
        by_node: dict = {}
        for k, (node, _) in enumerate(placements):
            by_node.setdefault(node, []).append(k)
        out: List[Optional[List[int]]] = [None] * len(placements)
        for ranks in by_node.values():
            cores = placements[ranks[0]][1]
            share = cpu_threads(self.cfg, "rollout", len(cores))
            per_worker = self.cfg.rollout.cpu_threads or max(1, share // len(ranks))
            for k, slice_ in zip(ranks, core_slices(cores, len(ranks), per_worker)):
                out[k] = slice_
        return out

    def _restart(self, i: int) -> None:
        """The pool's re-initialise hook: a restarted worker has no engine; start it on its cores (the pool then
        reloads the last weights). Placed on another node, it gets that node's slice as computed from the known
        placements (the other workers there keep theirs)."""
        actor = self.pool.actors[i]
        if self._placements is None:  # still placing: the pool's `start` follows
            return
        where = ray.get(actor.placement.remote())
        if where[0] != self._placements[i][0]:
            self._placements[i] = where
            self._worker_cores[i] = self._cores(self._placements)[i]
        ray.get(actor.start.remote(self._worker_cores[i]))

    def submit(self, requests: Sequence[RolloutRequest], n: int, seed: Optional[int] = None,
               greedy: bool = False) -> List[PoolCall]:
        """Contiguous balanced shards, one per worker, all submitted; returns without waiting (see `gather`).
        Shard i samples with seed derive_seed(seed, i)."""
        return self.pool.scatter("generate", list(requests), n, greedy=greedy, expected_version=self.pool.version,
                                 per_shard=lambda i: {"seed": None if seed is None else derive_seed(seed, i)})

    def gather(self, futures: List[PoolCall]) -> List[RolloutGroup]:
        """The groups of a `submit`, in request order."""
        return self.pool.gather_rows(futures)

    def generate(self, requests: Sequence[RolloutRequest], n: int, seed: Optional[int] = None,
                 greedy: bool = False) -> List[RolloutGroup]:
        return self.gather(self.submit(requests, n, seed, greedy))

    def submit_load(self, bundle_or_ref) -> List[PoolCall]:
        """Every worker loads the same object; returns the futures of the versions they then serve. A worker
        busy generating loads after its current generation (an actor runs one call at a time)."""
        return self.pool.broadcast(bundle_or_ref)

    def load_weights(self, bundle_or_ref) -> List[int]:
        """Loads on every worker; returns the versions they then serve."""
        return self.gather_versions(self.submit_load(bundle_or_ref))

    def gather_versions(self, futures: List[PoolCall]) -> List[int]:
        """The versions a `submit_load` left the workers serving."""
        return self.pool.gather(futures)

    def versions(self) -> List[int]:
        return self.pool.call_all("version")

    def sleep(self) -> None:
        """Colocated mode: every engine frees its GPU memory (weights to host memory, KV cache dropped)."""
        if not self.asleep:
            self.pool.call_all("sleep")
            self.asleep = True

    def wake_up(self) -> None:
        """Weights and KV cache back, each engine serving the LoRA version it served before `sleep`."""
        if self.asleep:
            self.pool.call_all("wake_up")
            self.asleep = False

    def errors(self) -> int:
        """Requests answered with a per-request error (bad image, prompt too long) since each worker started."""
        return int(sum(self.pool.call_all("errors")))

    def shutdown(self) -> None:
        self.pool.shutdown()
