"""LearnerGroup: N data-parallel LearnerWorkers in one process group."""
from __future__ import annotations

from typing import Dict, List

import numpy as np
import ray

from common.data import LesionSample
from common.protocol import Advantages, ForwardResult, WeightBundle
from learner.grpo import combine_stats, group_advantages, loss_norm
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
        return ForwardResult([x for r in results for x in r.logprobs], [x for r in results for x in r.ref_logprobs],
                             np.concatenate([r.seg_states for r in results]), np.concatenate([r.seg_found for r in results]))

    def advantages(self, rewards: np.ndarray) -> Advantages:
        """Group advantages of rewards [P, G] by the configured estimator; groups with no reward variance are
        marked for removal when `learner.drop_zero_variance` is on (the caller drops them before `update`)."""
        L = self.cfg.learner
        adv, keep, _ = group_advantages(rewards, mode=L.advantage, eps=L.adv_eps,
                                        drop_zero_variance=L.drop_zero_variance)
        return Advantages(adv.numpy(), keep.numpy())

    def update(self, groups, samples, advantages: np.ndarray, forward: ForwardResult) -> Dict[str, float]:
        """One step on the batch, split by prompt group over the ranks; the normalisers come from the whole batch."""
        lengths = [len(c.token_ids) for g in groups for c in g.completions]
        norm = loss_norm(lengths, int(np.asarray(forward.seg_found).sum()), self.cfg.learner.loss_agg)
        parts = self._split(len(groups))
        futures = []
        sizes = [len(g.completions) for g in groups]
        for w, p in zip(self.workers, parts):
            a = sum(sizes[:p.start]) if len(p) else 0
            b = a + sum(sizes[i] for i in p)
            futures.append(w.update.remote([groups[i] for i in p], [samples[i] for i in p], advantages[a:b],
                                           forward.ref_logprobs[a:b], norm))
        return _combine_ranks(ray.get(futures))

    def sft_step(self, samples: List[LesionSample]) -> Dict[str, float]:
        norm = ray.get(self.workers[0].sft_norm.remote(samples))
        parts = self._split(len(samples))
        return _combine_ranks(ray.get([w.sft_step.remote([samples[i] for i in p], norm)
                                       for w, p in zip(self.workers, parts)]))

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


def _combine_ranks(results: List[Dict[str, float]]) -> Dict[str, float]:
    """Per-rank stats (each the rank's share, see `grpo_loss`) -> the batch's; grad norm and lr are global."""
    return {**combine_stats([{k: v for k, v in r.items() if k not in ("grad_norm", "lr")} for r in results]),
            "grad_norm": results[0]["grad_norm"], "lr": results[0]["lr"]}
