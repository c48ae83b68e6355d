"""Reward workers: `LocalRewardWorker` (SAM + adapter + embedding cache around the pure reward functions; a Ray
actor or in-process) and `RewardPool`, an ActorPool of them, which spreads a batch over N workers grouped by
image, submits every share, gathers in input order, and survives a worker that dies (Ray restarts it; the pool
reloads the last weight bundle into it and re-sends its share)."""
from __future__ import annotations

import zlib
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from coreseg.common.actor_pool import ActorPool, RolePlacement, StaleWeightsError, current_node_id
from coreseg.common.config import TrainConfig
from coreseg.common.devices import check_device, role_device, role_runtime_env
from coreseg.common.models.adapter import build_adapter
from coreseg.common.models.sam import build_sam
from coreseg.common.prompts import R_NO_SEG
from coreseg.common.protocol import Score, ScoreItem, WeightBundle
from coreseg.common.storage import local_file
from coreseg.reward.segmenter import Segmenter
from coreseg.reward.terms import score_completion

R_SEG_NOT_FINITE = "seg_state_not_finite"
R_SEG_BAD_SHAPE = "seg_state_bad_shape"
R_BAD_IMAGE = "bad_image"


class LocalRewardWorker:
    """The worker's state and logic, usable without Ray (tests, predict); `RewardPool` runs it as a Ray actor."""

    def __init__(self, cfg: TrainConfig, llm_hidden: int, num_threads: int = 1, device: str = "cpu"):
        torch.set_num_threads(max(1, int(num_threads)))
        device = check_device("reward worker", device, "cluster.reward_gpus_per_worker")
        self.cfg = cfg
        self.llm_hidden = int(llm_hidden)
        # same seed in every worker: all agree before the first bundle arrives
        sam = build_sam(cfg.model.sam_type, local_file(cfg.model.sam_checkpoint), seed=cfg.run.seed)
        adapter = build_adapter(llm_hidden, cfg.model.adapter_queries, cfg.model.adapter_mlp_blocks,
                                seed=cfg.run.seed)
        self.segmenter = Segmenter(sam, adapter, cfg.reward.cache_bytes, cfg.reward.mask_threshold, device)
        self.warm_loaded = 0
        if cfg.reward.embed_cache_path:
            expect = {"sam_type": cfg.model.sam_type, "sam_checkpoint": cfg.model.sam_checkpoint}
            if not cfg.model.sam_checkpoint:  # random init: the embeddings depend on the seed
                expect["seed"] = str(cfg.run.seed)
            self.warm_loaded = self.segmenter.warm_start(local_file(cfg.reward.embed_cache_path), expect)
        self._version = 0
        self.scored = 0
        self.reasons: Dict[str, int] = defaultdict(int)

    def load_weights(self, bundle: WeightBundle) -> int:
        """Adapter (+ mask decoder when present); refuses a version older than the current one."""
        if bundle.version < self._version:
            raise ValueError(f"refusing weights version {bundle.version}: already at {self._version}")
        self.segmenter.adapter.load_state_dict(bundle.adapter)
        if bundle.mask_decoder is not None:
            self.segmenter.sam.mask_decoder.load_state_dict(bundle.mask_decoder)
        self._version = int(bundle.version)
        return self._version

    def node_id(self) -> str:
        return current_node_id()

    def version(self) -> int:
        return self._version

    def _bad_state(self, item: ScoreItem) -> str:
        """Why no mask can be drawn for this item ("" when it can)."""
        if item.seg_state is None:
            return R_NO_SEG
        try:
            state = np.asarray(item.seg_state, dtype=np.float32)
        except (TypeError, ValueError):
            return R_SEG_BAD_SHAPE
        if state.shape != (self.llm_hidden,):
            return R_SEG_BAD_SHAPE
        if not np.isfinite(state).all():
            return R_SEG_NOT_FINITE
        image = np.asarray(item.image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or 0 in image.shape:
            return R_BAD_IMAGE
        return ""

    def pred_masks(self, items: Sequence[ScoreItem]) -> List[Union[np.ndarray, str]]:
        """The predicted mask per item, or the reason string when none can be drawn."""
        out: List[Union[np.ndarray, str]] = [self._bad_state(item) for item in items]
        good = [k for k, why in enumerate(out) if not why]
        for k, mask in zip(good, self.segmenter.masks([items[k] for k in good])):
            out[k] = mask
        return out

    def score(self, items: Sequence[ScoreItem], expected_version: Optional[int] = None) -> List[Score]:
        """Scores in input order. expected_version: raise StaleWeightsError instead of scoring with other
        weights (a silently restarted actor)."""
        if expected_version is not None and expected_version != self._version:
            raise StaleWeightsError(f"worker serves version {self._version}, pool expects {expected_version}")
        scores = []
        for item, pred in zip(items, self.pred_masks(items)):
            score = score_completion(item.text, pred, item.gt_masks, item.gt_boxes,
                                     tuple(np.asarray(item.image).shape[:2]), self.cfg.reward)
            for reason in score.reasons:
                self.reasons[reason] += 1
            scores.append(score)
        self.scored += len(items)
        return scores

    def masks_for(self, ids, images, states) -> List[np.ndarray]:
        # a copy: Ray hands arrays over read-only (zero-copy), which torch warns about and must not write into
        return self.segmenter.masks_for(ids, images, torch.from_numpy(np.array(states, np.float32)))

    def stats(self) -> Dict[str, float]:
        return {**self.segmenter.stats(), "scored": self.scored, "warm_loaded": self.warm_loaded,
                **{f"reason/{k}": v for k, v in self.reasons.items()}}


class RewardPool:
    """`local=True`: the workers run in the caller's process (no Ray), with the caller's thread count.
    The workers' device follows `num_gpus_per_worker` (cluster.reward_gpus_per_worker); `placement`: worker k in
    bundle slot k (Ray mode)."""

    def __init__(self, cfg: TrainConfig, llm_hidden: int, num_workers: int = 1, num_cpus_per_worker: float = 1,
                 num_gpus_per_worker: float = 0.0, *, local: bool = False, placement: Optional[RolePlacement] = None):
        self.cfg = cfg
        threads = torch.get_num_threads() if local else max(1, int(num_cpus_per_worker))
        device = role_device(num_gpus_per_worker)
        # max_restarts=-1: Ray restarts a dead worker; the pool reloads the last bundle into it and re-sends
        options = dict(num_cpus=num_cpus_per_worker, num_gpus=num_gpus_per_worker, max_restarts=-1,
                       **role_runtime_env(num_gpus_per_worker))
        self.pool = ActorPool("reward", LocalRewardWorker, num_workers,
                              lambda i: ((cfg, llm_hidden, threads, device), {}), options=options, local=local,
                              placement=placement, recover_wait_s=cfg.cluster.recover_wait_s)

    @property
    def workers(self) -> list:
        return self.pool.actors

    @property
    def version(self) -> int:
        """The version the last `load_weights` left the workers serving (0 before any)."""
        return self.pool.version

    def _assign(self, items: Sequence[ScoreItem]) -> Dict[int, List[int]]:
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
        return dict(shares)

    def score(self, items: Sequence[ScoreItem]) -> List[Score]:
        """Scores in input order; every share is submitted before any is awaited. A worker that restarted
        answers StaleWeightsError (it checks the version the pool expects) and is recovered like a dead one."""
        shares = self._assign(items)
        per_worker = [shares.get(w, []) for w in range(len(self.workers))]
        return self.pool.gather_rows(self.pool.scatter("score", list(items), self.version, shards=per_worker))

    def load_weights(self, bundle_or_ref) -> List[int]:
        """Every worker loads the same object (pass an ObjectRef to share one `ray.put`); returns the versions
        they then serve."""
        return self.pool.gather(self.pool.broadcast(bundle_or_ref))

    def versions(self) -> List[int]:
        return self.pool.call_all("version")

    def masks(self, ids, images, states) -> List[np.ndarray]:
        """Masks for one state per image (predict/eval), drawn by the first worker."""
        return self.pool.call(0, "masks_for", list(ids), list(images), np.asarray(states, np.float32))

    def stats(self) -> Dict[str, float]:
        per = self.pool.call_all("stats")  # a dead or restarting worker is waited for: reading stats never fails
        keys = sorted({k for p in per for k in p})
        total = {k: float(sum(p.get(k, 0) for p in per)) for k in keys}
        total["restarts"] = float(self.pool.restarts)
        total.update({f"restarts/{k}": float(v) for k, v in self.pool.restart_causes.items()})
        total["workers"] = float(len(self.workers))
        return total

    def shutdown(self) -> None:
        self.pool.shutdown()
