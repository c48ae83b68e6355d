"""RewardWorker (Ray actor around RewardScorer) and RewardPool, which spreads a batch over N workers
grouped by image, submits all shares, gathers in order, and survives a worker that dies."""
from __future__ import annotations

import time
import zlib
from collections import defaultdict
from typing import Dict, List, Optional

import ray
from ray.exceptions import ActorUnavailableError, RayActorError

ACTOR_GONE = (RayActorError, ActorUnavailableError)

from common.config import TrainConfig
from common.protocol import Score, ScoreItem
from reward.scorer import RewardScorer

MAX_RETRIES = 3


@ray.remote
class RewardWorker(RewardScorer):
    pass


class RewardPool:
    def __init__(self, cfg: TrainConfig, llm_hidden: int, num_workers: int = 1, num_cpus_per_worker: float = 1,
                 num_gpus_per_worker: float = 0.0):
        self.cfg = cfg
        options = dict(num_cpus=num_cpus_per_worker, num_gpus=num_gpus_per_worker, max_restarts=-1,
                       max_task_retries=0)
        self.workers = [RewardWorker.options(**options).remote(cfg, llm_hidden) for _ in range(num_workers)]
        self.version = 0
        self._bundle_ref = None
        self.restarts = 0

    def _assign(self, items: List[ScoreItem]) -> Dict[int, List[int]]:
        """Item indices per worker: all rollouts of one image on one worker (its cache), a stable preferred
        worker per image (hits across steps), spilling to the least loaded one to keep shares balanced."""
        groups: Dict[str, List[int]] = defaultdict(list)
        for k, item in enumerate(items):
            groups[item.sample_id].append(k)
        n = len(self.workers)
        cap = -(-len(groups) // n)
        load = [0] * n
        shares: Dict[int, List[int]] = defaultdict(list)
        for sid, rows in groups.items():
            w = zlib.crc32(sid.encode()) % n
            if load[w] >= cap:
                w = min(range(n), key=lambda i: load[i])
            load[w] += 1
            shares[w].extend(rows)
        return shares

    def _recover(self, w: int) -> None:
        """A restarted worker comes back with fresh weights: give it the current bundle again."""
        self.restarts += 1
        if self._bundle_ref is None:
            return
        for attempt in range(30):  # the actor may still be restarting
            try:
                ray.get(self.workers[w].load_weights.remote(self._bundle_ref))
                return
            except ACTOR_GONE:
                time.sleep(0.5)
        raise RuntimeError(f"reward worker {w} did not come back after a restart")

    def score(self, items: List[ScoreItem]) -> List[Score]:
        shares = self._assign(items)
        futures = {w: self.workers[w].score.remote([items[k] for k in rows]) for w, rows in shares.items()}
        out: List[Optional[Score]] = [None] * len(items)
        for w, rows in shares.items():
            result = None
            for attempt in range(MAX_RETRIES + 1):
                try:
                    version, result = ray.get(futures[w])
                    if version == self.version:
                        break
                    # the actor was restarted behind our back and lost its weights
                except ACTOR_GONE:
                    if attempt == MAX_RETRIES:
                        raise
                self._recover(w)
                futures[w] = self.workers[w].score.remote([items[k] for k in rows])
                result = None
            for k, s in zip(rows, result):
                out[k] = s
        return out  # type: ignore[return-value]

    def load_weights(self, bundle_or_ref) -> None:
        ref = bundle_or_ref if isinstance(bundle_or_ref, ray.ObjectRef) else ray.put(bundle_or_ref)
        versions = ray.get([w.load_weights.remote(ref) for w in self.workers])
        self._bundle_ref = ref
        self.version = versions[0]

    def versions(self) -> List[int]:
        return ray.get([w.get_version.remote() for w in self.workers])

    def masks(self, ids, images, states) -> list:
        return ray.get(self.workers[0].masks_for.remote(ids, images, states))

    def stats(self) -> Dict[str, float]:
        per = ray.get([w.stats.remote() for w in self.workers])
        total = {k: float(sum(p[k] for p in per)) for k in per[0]}
        total["restarts"] = float(self.restarts)
        return total

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
        self.workers = []
