"""Scoring a batch of completions: parse -> format / box / mask rewards (mask drawn by SAM from the
completion's `<seg>` state). Bad output gives zero (or the coarse minimum) with a counted reason."""
from __future__ import annotations

from collections import defaultdict
from typing import List

import numpy as np
import torch

from common.config import TrainConfig
from common.models.adapter import build_adapter
from common.models.sam import build_sam
from common.prompts import parse_completion
from common.protocol import Score, ScoreItem, WeightBundle
from reward.rewards import MaskRewardConfig, box_reward, dice, format_reward, iou, mask_reward, total_reward
from reward.segmenter import Segmenter


class RewardScorer:
    def __init__(self, cfg: TrainConfig, llm_hidden: int):
        torch.set_num_threads(1)
        self.cfg = cfg
        sam = build_sam(cfg.model.sam_type, cfg.model.sam_checkpoint, seed=cfg.run.seed)
        adapter = build_adapter(llm_hidden, cfg.model.adapter_queries, cfg.model.adapter_mlp_blocks, seed=cfg.run.seed)
        r = cfg.reward
        self.segmenter = Segmenter(sam, adapter, r.cache_bytes, r.mask_threshold)
        if r.embed_cache_path:
            self.segmenter.cache.load_file(r.embed_cache_path)
        self.mask_cfg = MaskRewardConfig(r.dice_threshold, r.density_aware, r.density_ref_fraction,
                                         r.density_max_threshold, r.empty_mask_reward)
        self.version = 0

    def load_weights(self, bundle: WeightBundle) -> int:
        if bundle.version < self.version:
            raise ValueError(f"refusing weights version {bundle.version}: already at {self.version}")
        self.segmenter.adapter.load_state_dict(bundle.adapter)
        if bundle.mask_decoder is not None:
            self.segmenter.sam.mask_decoder.load_state_dict(bundle.mask_decoder)
        self.version = bundle.version
        return self.version

    def get_version(self) -> int:
        return self.version

    def pred_masks(self, items: List[ScoreItem]) -> List[object]:
        """The predicted mask per item, or a reason string when none can be drawn."""
        out: List[object] = ["no_seg_token"] * len(items)
        by_image = defaultdict(list)
        for k, item in enumerate(items):
            if item.seg_state is None:
                continue
            state = np.asarray(item.seg_state, dtype=np.float32)
            if state.ndim != 1 or not np.isfinite(state).all():
                out[k] = "seg_state_not_finite" if state.ndim == 1 else "seg_state_bad_shape"
                continue
            by_image[item.sample_id].append(k)
        if by_image:
            ids = list(by_image)
            images = [items[by_image[i][0]].image for i in ids]
            rows = [k for i in ids for k in by_image[i]]
            index = [j for j, i in enumerate(ids) for _ in by_image[i]]
            states = torch.as_tensor(np.stack([np.asarray(items[k].seg_state, np.float32) for k in rows]))
            for k, mask in zip(rows, self.segmenter.masks(ids, images, states, index)):
                out[k] = mask
        return out

    def score(self, items: List[ScoreItem]) -> tuple:
        r = self.cfg.reward
        scores = []
        for item, pred in zip(items, self.pred_masks(items)):
            parsed = parse_completion(item.text)
            reasons = []
            f_val, f_reason = format_reward(parsed)
            if f_reason:
                reasons.append(f"format:{f_reason}")
            h, w = item.image.shape[:2]
            if parsed.boxes_ok:
                b_val, b_reason, _ = box_reward(parsed.boxes, item.gt_boxes, r.iou_threshold, (w, h))
            else:
                b_val, b_reason = 0.0, parsed.reason
            if b_reason:
                reasons.append(f"box:{b_reason}")
            gt = np.zeros((h, w), bool)
            for m in item.gt_masks:
                gt |= m
            if isinstance(pred, str):
                m_val, d, j = 0.0, 0.0, 0.0
                reasons.append(f"mask:{pred}")
            else:
                m_val, m_reason, d = mask_reward(pred, gt, self.mask_cfg)
                j = iou(pred, gt) if gt.any() or pred.any() else 1.0
                d = dice(pred, gt)
                if m_reason:
                    reasons.append(f"mask:{m_reason}")
            total, comps = total_reward(f_val, b_val, m_val, r.w_format, r.w_box, r.w_mask)
            scores.append(Score(total=float(total), components={k: float(v) for k, v in comps.items()},
                                reasons=reasons, dice=float(d), iou=float(j), format_ok=bool(parsed.ok)))
        return self.version, scores

    def masks_for(self, ids, images, states) -> List[np.ndarray]:
        return self.segmenter.masks(ids, images, torch.as_tensor(states))

    def stats(self) -> dict:
        return self.segmenter.stats()
