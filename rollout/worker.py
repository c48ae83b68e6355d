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


@ray.remote
class RolloutWorker:
    def __init__(self, cfg: TrainConfig, policy_dir: str):
        self.cfg = cfg
        if not torch.cuda.is_available():
            # Ray gives a num_cpus=1 actor OMP_NUM_THREADS=1, which vLLM's CPU backend and HF generate obey; in
            # sync mode the phases run one after another, so generation may use every core while it runs.
            threads = cpu_threads(cfg, "rollout", len(os.sched_getaffinity(0)))
            os.environ["OMP_NUM_THREADS"] = str(threads)
            torch.set_num_threads(threads)
        self.engine = make_engine(cfg, policy_dir)

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
        self.cfg = cfg
        self.workers = [RolloutWorker.options(num_cpus=num_cpus_per_worker, num_gpus=num_gpus_per_worker)
                        .remote(cfg, str(policy_dir)) for _ in range(num_workers)]
        ray.get([w.version.remote() for w in self.workers])  # surface engine start errors here

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
