"""LearnerGroup: N data-parallel LearnerWorkers in one process group, as an ActorPool (or one rank in-process)."""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from coreseg.common.actor_pool import ActorPool, RolePlacement
from coreseg.common.config import TrainConfig
from coreseg.common.data import LesionSample
from coreseg.common.devices import role_runtime_env
from coreseg.common.protocol import Advantages, ForwardResult, WeightBundle
from coreseg.learner.balance import (RankLayout, completion_costs, flatten_rows, merge_forward, prompt_groups,
                             rank_layouts)
from coreseg.learner.grpo import combine_stats, group_advantages, loss_norm
from coreseg.learner.worker import LearnerWorker, free_port


class LearnerGroup:
    """N data-parallel LearnerWorkers. The batch's rows are balanced over the ranks by tokens, every rank running
    the same number of micro-batches (learner/balance.py); global normalisers are computed here from the whole
    batch, so the update does not depend on the number of ranks. `local=True`: one rank in
    the caller's process (DeepSpeed, world size 1, gloo). `placement`: rank r in bundle slot r (Ray mode)."""

    def __init__(self, cfg: TrainConfig, policy_dir, num_workers: int = 1, num_gpus_per_worker: float = 0.0,
                 num_cpus_per_worker: float = 1, *, local: bool = False, placement: Optional[RolePlacement] = None):
        if local and num_workers != 1:
            raise ValueError(f"an in-process learner group has one rank, got num_workers={num_workers}")
        self.cfg = cfg
        # max_restarts=0: a restarted rank could not rejoin the DeepSpeed process group; a dead rank is an error
        # (the rank's device follows cluster.learner_gpus; a CPU rank sees no GPU)
        options = dict(num_cpus=num_cpus_per_worker, num_gpus=num_gpus_per_worker, max_restarts=0,
                       **role_runtime_env(num_gpus_per_worker))
        self.pool = ActorPool("learner", LearnerWorker, num_workers,
                              lambda rank: ((cfg, str(policy_dir), rank, num_workers), {}),
                              options=options, local=local, placement=placement)
        try:
            addr, port = ("127.0.0.1", free_port()) if local else self.pool.call(0, "rendezvous_address")
            self.pool.call_all("setup", addr, port)
            self.packed = bool(self.pool.call(0, "packs"))  # packed batches keep a prompt's rows on one rank
        except BaseException:  # a rank lost while the group forms: no rank of it is left behind
            self.pool.shutdown()
            raise

    @property
    def workers(self) -> list:
        return self.pool.actors

    def _layouts(self, costs, labels=None) -> List[RankLayout]:
        return rank_layouts(costs, len(self.pool), self.cfg.learner.micro_batch_size, labels)

    def _grpo_layouts(self, rows, comps) -> List[RankLayout]:
        """Packed ranks: a prompt's completions stay on one rank, at the cost of one prompt + their tokens."""
        labels = prompt_groups(rows, comps) if self.packed else None
        return self._layouts(completion_costs(comps, self.packed, labels), labels)

    def forward(self, groups, samples) -> ForwardResult:
        """Every completion's log-probs and `<seg>` state, rows balanced over the ranks (see `update`)."""
        rows, comps = flatten_rows(groups, samples)
        layouts = self._grpo_layouts(rows, comps)
        futures = [self.pool.submit(rank, "forward_rows", [rows[i] for i in lay.rows], [comps[i] for i in lay.rows],
                                    lay) for rank, lay in enumerate(layouts)]
        return merge_forward(layouts, self.pool.gather(futures))

    def advantages(self, rewards: np.ndarray) -> Advantages:
        """Group advantages of rewards [P, G] by the configured estimator; groups with no reward variance are
        marked for removal when `learner.drop_zero_variance` is on (the caller drops them before `update`)."""
        L = self.cfg.learner
        adv, keep, _ = group_advantages(rewards, mode=L.advantage, eps=L.adv_eps,
                                        drop_zero_variance=L.drop_zero_variance)
        return Advantages(adv.numpy(), keep.numpy())

    def update(self, groups, samples, advantages: np.ndarray, forward: ForwardResult,
               step: int = 0) -> Dict[str, float]:
        """One step on the batch. Its completions are balanced over the ranks by tokens, every rank running as many
        micro-batches (`rank_layouts`; padding rows have loss weight 0); the normalisers come from the whole batch,
        so N ranks make the same step as one. `step`: the 0-based GRPO step (the lr schedule's)."""
        rows, comps = flatten_rows(groups, samples)
        if len(advantages) != len(comps):
            raise ValueError(f"{len(advantages)} advantages for {len(comps)} completions")
        norm = loss_norm([len(c.token_ids) for c in comps], int(np.asarray(forward.seg_found).sum()),
                         self.cfg.learner.loss_agg)
        layouts = self._grpo_layouts(rows, comps)
        advantages, ref = np.asarray(advantages, dtype=np.float64), forward.ref_logprobs
        futures = []
        for rank, lay in enumerate(layouts):
            pick = list(lay.rows)
            futures.append(self.pool.submit(rank, "update_rows", [rows[i] for i in pick], [comps[i] for i in pick],
                                            np.where(lay.real, advantages[pick], 0.0),
                                            [ref[i] for i in pick] if len(ref) else [], lay, norm, step))
        return _combine_ranks(self.pool.gather(futures))

    def sft_step(self, samples: List[LesionSample], step: int = 0) -> Dict[str, float]:
        """One SFT step at 0-based SFT `step` (the lr schedule's), balanced over the ranks like `update`."""
        lengths = self.pool.call(0, "sft_lengths", samples)
        norm = loss_norm([target for _, target in lengths], len(samples), "token_mean")
        layouts = self._layouts([prompt + target for prompt, target in lengths])
        return _combine_ranks(self.pool.gather([self.pool.submit(rank, "sft_rows", [samples[i] for i in lay.rows],
                                                                 lay, norm, step)
                                                for rank, lay in enumerate(layouts)]))

    def healthy(self, timeout_s: float = 30.0) -> bool:
        """Whether every rank answers within `timeout_s` (a rank blocked in a collective whose peer died does not)."""
        if self.pool.local:
            return True
        refs = [actor.get_version.remote() for actor in self.pool.actors]
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        if pending:
            return False
        try:
            ray.get(ready)
        except (RayActorError, ActorUnavailableError):
            return False
        return True

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


class RankDesyncError(RuntimeError):
    """Learner ranks hold different weights after a step (they must be replicas)."""


def _combine_ranks(results: List[Dict[str, float]]) -> Dict[str, float]:
    """Per-rank stats (each the rank's share, see `grpo_loss`) -> the batch's; grad norm and lr are global. Ranks
    that sent a weights digest must agree on it (`learner.sync_check_every`)."""
    digests = [r["weights_digest"] for r in results if "weights_digest" in r]
    if len(set(digests)) > 1:
        raise RankDesyncError(f"learner ranks hold different weights after this step (CRC32 per rank: "
                              f"{[int(d) for d in digests]}); their data-parallel steps diverged")
    global_keys = ("grad_norm", "lr", "weights_digest")
    out = {**combine_stats([{k: v for k, v in r.items() if k not in global_keys} for r in results]),
           "grad_norm": results[0]["grad_norm"], "lr": results[0]["lr"]}
    if digests:
        out["ranks_in_sync"] = 1.0
    return out
