"""RolloutWorker (Ray actor owning one engine) and RolloutPool (shards requests, keeps order, broadcasts
weight bundles by one object ref)."""
from __future__ import annotations

import os
from typing import List, Optional, Sequence

import ray
import torch

from common.config import TrainConfig, cpu_threads
from common.protocol import RolloutGroup, RolloutRequest, WeightBundle
from rollout.engine import Sampling, make_engine


def core_slices(cores: Sequence[int], workers: int, per_worker: int) -> List[List[int]]:
    """Disjoint core sets for `workers` rollout engines on one node, `per_worker` cores each, taken from the
    end of `cores` (the learner's unpinned threads run anywhere). vLLM-CPU binds its OpenMP threads to the
    cores it is given: two engines bound to the same cores each run at a fraction of their speed, so they
    share cores only when the node has fewer cores than engines."""
    cores = sorted(cores)
    per_worker = max(1, min(per_worker, len(cores) // workers or 1))
    pool = cores[len(cores) - min(len(cores), per_worker * workers):]
    return [[pool[(w * per_worker + j) % len(pool)] for j in range(per_worker)] for w in range(workers)]


@ray.remote
class RolloutWorker:
    """Started in two steps on CPU, so that engines sharing a node get disjoint cores: the pool asks each
    worker for its node and cores, then `start`s it with its share."""

    def __init__(self, cfg: TrainConfig, policy_dir: str):
        self.cfg, self.policy_dir, self.engine = cfg, policy_dir, None

    def placement(self):
        return ray.get_runtime_context().get_node_id(), sorted(os.sched_getaffinity(0))

    def start(self, cores: Optional[List[int]]) -> int:
        if cores and not torch.cuda.is_available():
            # Ray gives a num_cpus=1 actor OMP_NUM_THREADS=1, which vLLM's CPU backend and HF generate obey
            os.sched_setaffinity(0, cores)
            os.environ["OMP_NUM_THREADS"] = str(len(cores))
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cores))
            torch.set_num_threads(len(cores))
        self.engine = make_engine(self.cfg, self.policy_dir)
        return self.engine.version

    def num_threads(self) -> int:
        return torch.get_num_threads()

    def generate(self, requests: List[RolloutRequest], n: int, seed: Optional[int], greedy: bool) -> List[RolloutGroup]:
        return self.engine.generate(requests, n, Sampling.from_config(self.cfg, greedy=greedy, seed=seed))

    def load_weights(self, bundle: WeightBundle) -> int:
        return self.engine.load_weights(bundle)

    def version(self) -> int:
        return self.engine.version

    def engine_name(self) -> str:
        return type(self.engine).__name__

    def loaded_adapters(self) -> List[int]:
        return self.engine.loaded_adapters()

    def errors(self) -> int:
        return self.engine.errors

    def sleep(self) -> None:
        self.engine.sleep()

    def wake(self) -> None:
        self.engine.wake()


class RolloutPool:
    def __init__(self, cfg: TrainConfig, policy_dir, num_workers: int = 1, num_gpus_per_worker: float = 0.0,
                 num_cpus_per_worker: float = 1):
        self.cfg, self.on_gpu = cfg, num_gpus_per_worker > 0
        self.workers = [RolloutWorker.options(num_cpus=num_cpus_per_worker, num_gpus=num_gpus_per_worker)
                        .remote(cfg, str(policy_dir)) for _ in range(num_workers)]
        cores = self._cores(ray.get([w.placement.remote() for w in self.workers]))
        ray.get([w.start.remote(c) for w, c in zip(self.workers, cores)])  # surfaces engine start errors here

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

    def submit(self, requests: Sequence[RolloutRequest], n: int, seed: Optional[int] = None,
               greedy: bool = False) -> List[ray.ObjectRef]:
        """Contiguous shards, one per worker, all submitted; returns without waiting (see `gather`)."""
        k = len(self.workers)
        size = -(-len(requests) // k)
        shards = [list(requests[i * size:(i + 1) * size]) for i in range(k)]
        return [w.generate.remote(s, n, None if seed is None else seed * 31 + i, greedy)
                for i, (w, s) in enumerate(zip(self.workers, shards)) if s]

    @staticmethod
    def gather(futures: List[ray.ObjectRef]) -> List[RolloutGroup]:
        """The groups of a `submit`, in request order."""
        return [g for part in ray.get(futures) for g in part]

    def generate(self, requests: Sequence[RolloutRequest], n: int, seed: Optional[int] = None,
                 greedy: bool = False) -> List[RolloutGroup]:
        return self.gather(self.submit(requests, n, seed, greedy))

    def submit_load(self, bundle_or_ref) -> List[ray.ObjectRef]:
        """Every worker loads the same object; returns the futures of the versions they then serve. A worker
        busy generating loads after its current generation (an actor runs one call at a time)."""
        ref = bundle_or_ref if isinstance(bundle_or_ref, ray.ObjectRef) else ray.put(bundle_or_ref)
        return [w.load_weights.remote(ref) for w in self.workers]

    def load_weights(self, bundle_or_ref) -> List[int]:
        """Loads on every worker; returns the versions they then serve."""
        return ray.get(self.submit_load(bundle_or_ref))

    @staticmethod
    def gather_versions(futures: List[ray.ObjectRef]) -> List[int]:
        """The versions a `submit_load` left the workers serving."""
        return ray.get(futures)

    def versions(self) -> List[int]:
        return ray.get([w.version.remote() for w in self.workers])

    def errors(self) -> int:
        """Requests answered with a per-request error (bad image, prompt too long) since start, all workers."""
        return int(sum(ray.get([w.errors.remote() for w in self.workers])))

    def sleep(self) -> None:
        """vLLM sleep mode on every worker (GPU colocation with the learner; no-op unless enabled)."""
        ray.get([w.sleep.remote() for w in self.workers])

    def wake(self) -> None:
        ray.get([w.wake.remote() for w in self.workers])

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
        self.workers = []
