"""LearnerGroup: N data-parallel LearnerWorkers in one process group."""
from __future__ import annotations

from typing import Dict, List

import numpy as np
import ray

from common.data import LesionSample
from common.protocol import ForwardResult, WeightBundle
from learner.worker import LearnerWorker


class LearnerGroup:
    """N data-parallel LearnerWorkers. The batch is split by prompt group; global normalisers are computed
    here from the whole batch, so the update does not depend on the number of ranks."""

    def __init__(self, cfg: TrainConfig, policy_dir, num_workers: int = 1, num_gpus_per_worker: float = 0.0,
                 num_cpus_per_worker: float = 1):
        self.cfg = cfg
        self.workers = [LearnerWorker.options(num_cpus=num_cpus_per_worker, num_gpus=num_gpus_per_worker)
                        .remote(cfg, str(policy_dir), rank, num_workers) for rank in range(num_workers)]
        addr, port = ray.get(self.workers[0].rendezvous_address.remote())
        ray.get([w.setup.remote(addr, port) for w in self.workers])

    def _split(self, n: int) -> List[range]:
        k = len(self.workers)
        size = -(-n // k)
        return [range(i * size, min(n, (i + 1) * size)) for i in range(k)]

    def forward(self, groups, samples) -> ForwardResult:
        parts = self._split(len(groups))
        futures = [w.forward.remote([groups[i] for i in p], [samples[i] for i in p])
                   for w, p in zip(self.workers, parts) if len(p)]
        results = ray.get(futures)
        return ForwardResult([x for r in results for x in r.old_logprobs], [x for r in results for x in r.ref_logprobs],
                             np.concatenate([r.seg_states for r in results]), np.concatenate([r.seg_found for r in results]))

    def update(self, groups, samples, advantages: np.ndarray, forward: ForwardResult) -> Dict[str, float]:
        lengths = [len(c.token_ids) for g in groups for c in g.completions]
        units = float(sum(lengths)) if self.cfg.learner.loss_agg == "token_mean" else float(sum(1 for n in lengths if n))
        totals = {"units": max(units, 1.0), "tokens": float(sum(lengths)), "masks": float(forward.seg_found.sum())}
        parts = self._split(len(groups))
        offsets, futures, start = [], [], 0
        sizes = [len(g.completions) for g in groups]
        for w, p in zip(self.workers, parts):
            a = sum(sizes[:p.start]) if len(p) else 0
            b = a + sum(sizes[i] for i in p)
            futures.append(w.update.remote([groups[i] for i in p], [samples[i] for i in p], advantages[a:b],
                                           forward.old_logprobs[a:b], forward.ref_logprobs[a:b], totals))
        results = ray.get(futures)
        keys = [k for k in ("pg_loss", "kl", "dice_ce", "clip_frac", "tokens") if k in results[0]]  # no kl at beta 0
        stats = {k: float(sum(r[k] for r in results)) for k in keys}
        stats["grad_norm"], stats["lr"] = results[0]["grad_norm"], results[0]["lr"]
        stats["loss"] = stats["pg_loss"] + self.cfg.learner.kl_beta * stats.get("kl", 0.0) + \
            self.cfg.learner.mask_loss_weight * stats["dice_ce"]
        return stats

    def sft_step(self, samples: List[LesionSample]) -> Dict[str, float]:
        totals = ray.get(self.workers[0].sft_counts.remote(samples))
        totals["masks"] = max(totals["masks"], 1.0)
        parts = self._split(len(samples))
        results = ray.get([w.sft_step.remote([samples[i] for i in p], totals) for w, p in zip(self.workers, parts)])
        stats = {k: float(sum(r[k] for r in results)) for k in ("ce", "dice_ce")}
        stats["loss"] = stats["ce"] + self.cfg.learner.mask_loss_weight * stats["dice_ce"]
        stats["grad_norm"], stats["lr"] = results[0]["grad_norm"], results[0]["lr"]
        return stats

    def export_weights(self) -> WeightBundle:
        return ray.get(self.workers[0].export_weights.remote())

    def export_refs(self):
        """(sizes dict, ObjectRef of the rollout part, ObjectRef of the reward part); see `export_parts`."""
        sizes, rollout, reward = self.workers[0].export_parts.remote()
        return ray.get(sizes), rollout, reward

    def save_checkpoint(self, path: str) -> None:
        ray.get([w.save_checkpoint.remote(path) for w in self.workers])

    def load_checkpoint(self, path: str) -> None:
        ray.get([w.load_checkpoint.remote(path) for w in self.workers])

    @property
    def version(self) -> int:
        return ray.get(self.workers[0].get_version.remote())

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
        self.workers = []
