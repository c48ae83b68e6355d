"""LearnerGroup: N data-parallel LearnerWorkers in one process group, as an ActorPool (or one rank in-process)."""
from __future__ import annotations

from typing import Dict, List

import numpy as np

from common.actor_pool import ActorPool, balanced_shards
from common.config import TrainConfig
from common.data import LesionSample
from common.protocol import ForwardResult, WeightBundle
from learner.worker import LearnerWorker, free_port


class LearnerGroup:
    """N data-parallel LearnerWorkers. The batch is split by prompt group; global normalisers are computed
    here from the whole batch, so the update does not depend on the number of ranks. `local=True`: one rank in
    the caller's process (DeepSpeed, world size 1, gloo)."""

    def __init__(self, cfg: TrainConfig, policy_dir, num_workers: int = 1, num_gpus_per_worker: float = 0.0,
                 num_cpus_per_worker: float = 1, *, local: bool = False):
        if local and num_workers != 1:
            raise ValueError(f"an in-process learner group has one rank, got num_workers={num_workers}")
        self.cfg = cfg
        # max_restarts=0: a restarted rank could not rejoin the DeepSpeed process group; a dead rank is an error
        options = dict(num_cpus=num_cpus_per_worker, num_gpus=num_gpus_per_worker, max_restarts=0)
        self.pool = ActorPool("learner", LearnerWorker, num_workers,
                              lambda rank: ((cfg, str(policy_dir), rank, num_workers), {}),
                              options=options, local=local)
        addr, port = ("127.0.0.1", free_port()) if local else self.pool.call(0, "rendezvous_address")
        self.pool.call_all("setup", addr, port)

    @property
    def workers(self) -> list:
        return self.pool.actors

    def _split(self, n: int) -> List[range]:
        return balanced_shards(n, len(self.pool))

    def forward(self, groups, samples) -> ForwardResult:
        parts = self._split(len(groups))
        futures = [self.pool.submit(i, "forward", [groups[k] for k in p], [samples[k] for k in p])
                   for i, p in enumerate(parts) if len(p)]
        results = self.pool.gather(futures)
        return ForwardResult([x for r in results for x in r.old_logprobs], [x for r in results for x in r.ref_logprobs],
                             np.concatenate([r.seg_states for r in results]), np.concatenate([r.seg_found for r in results]))

    def update(self, groups, samples, advantages: np.ndarray, forward: ForwardResult) -> Dict[str, float]:
        lengths = [len(c.token_ids) for g in groups for c in g.completions]
        units = float(sum(lengths)) if self.cfg.learner.loss_agg == "token_mean" else float(sum(1 for n in lengths if n))
        totals = {"units": max(units, 1.0), "tokens": float(sum(lengths)), "masks": float(forward.seg_found.sum())}
        parts = self._split(len(groups))
        offsets, futures, start = [], [], 0
        sizes = [len(g.completions) for g in groups]
        for rank, p in enumerate(parts):  # every rank steps, an empty share too (the step's collectives need all)
            a = sum(sizes[:p.start]) if len(p) else 0
            b = a + sum(sizes[i] for i in p)
            futures.append(self.pool.submit(rank, "update", [groups[i] for i in p], [samples[i] for i in p],
                                            advantages[a:b], forward.old_logprobs[a:b], forward.ref_logprobs[a:b],
                                            totals))
        results = self.pool.gather(futures)
        keys = [k for k in ("pg_loss", "kl", "dice_ce", "clip_frac", "tokens") if k in results[0]]  # no kl at beta 0
        stats = {k: float(sum(r[k] for r in results)) for k in keys}
        stats["grad_norm"], stats["lr"] = results[0]["grad_norm"], results[0]["lr"]
        stats["loss"] = stats["pg_loss"] + self.cfg.learner.kl_beta * stats.get("kl", 0.0) + \
            self.cfg.learner.mask_loss_weight * stats["dice_ce"]
        return stats

    def sft_step(self, samples: List[LesionSample]) -> Dict[str, float]:
        totals = self.pool.call(0, "sft_counts", samples)
        totals["masks"] = max(totals["masks"], 1.0)
        parts = self._split(len(samples))
        results = self.pool.gather([self.pool.submit(rank, "sft_step", [samples[i] for i in p], totals)
                                    for rank, p in enumerate(parts)])
        stats = {k: float(sum(r[k] for r in results)) for k in ("ce", "dice_ce")}
        stats["loss"] = stats["ce"] + self.cfg.learner.mask_loss_weight * stats["dice_ce"]
        stats["grad_norm"], stats["lr"] = results[0]["grad_norm"], results[0]["lr"]
        return stats

    def export_weights(self) -> WeightBundle:
        return self.pool.call(0, "export_weights")

    def export_refs(self):
        """(sizes dict, ObjectRef of the rollout part, ObjectRef of the reward part); see `export_parts`.
        In-process: the parts themselves."""
        sizes, rollout, reward = self.pool.raw(0, "export_parts")
        return self.pool.fetch(sizes), rollout, reward

    def save_checkpoint(self, path: str) -> None:
        self.pool.call_all("save_checkpoint", path)

    def load_checkpoint(self, path: str) -> None:
        self.pool.call_all("load_checkpoint", path)

    @property
    def version(self) -> int:
        return self.pool.call(0, "get_version")

    def shutdown(self) -> None:
        self.pool.shutdown()
