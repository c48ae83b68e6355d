"""The adaptive dual-granularity reward (pure numpy). Each function returns its value and, when bad
output forced the value, a reason string ("" otherwise). reward/terms.py wraps them as the registered
`format`, `box` and `mask` terms and sums the configured terms per completion (`score_completion`).

Box convention: [x1, y1, x2, y2] pixel edges (x2/y2 exclusive, as `common.images.mask_to_box`);
area = (x2-x1)*(y2-y1).

Mask reward (README, Reward): Dice < delta -> GIoU of the two masks' bounding boxes (coarse, in [-1, 1]);
otherwise 1 + 2*Dice (fine, in [1.1, 3]). Density-aware variant (`reward.density_aware`): with f the
ground-truth foreground fraction (lesion pixels / image pixels) and f_ref = `density_ref_fraction`,

    delta_eff = min(density_max_threshold, delta * sqrt(f_ref / f))   when 0 < f < f_ref, else delta,

so a lesion 100x smaller than the reference stays on the box branch until Dice reaches 10*delta (capped):
on small lesions a low Dice is mostly boundary noise, and box guidance is the more informative signal.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy.optimize import linear_sum_assignment

from coreseg.common.images import mask_to_box
from coreseg.common.prompts import ParsedCompletion

# Reasons (stable strings: counted in metrics).
R_NO_BOXES = "no_boxes"
R_NO_BOX_MATCH = "no_box_match"
R_BOXES_NOT_FINITE = "boxes_not_finite"
R_EMPTY_MASK = "empty_mask"
R_MASK_WITHOUT_LESION = "mask_without_lesion"
R_MASK_SHAPE = "mask_shape_mismatch"

TIE_BREAK = 1e-9  # weight of the TP IoUs that breaks ties between optimal box assignments (see `box_reward`)


def box_iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU [len(a), len(b)]; a degenerate pair (zero union) has IoU 0."""
    a, b = np.asarray(a, float).reshape(-1, 4), np.asarray(b, float).reshape(-1, 4)
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def giou(a: Sequence[float], b: Sequence[float]) -> float:
    """Generalised IoU of two boxes: IoU - (hull - union) / hull, in [-1, 1]."""
    iou_ab = float(box_iou_matrix(np.asarray(a), np.asarray(b))[0, 0])
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = area_a + area_b - ix * iy
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return float(iou_ab - (hull - union) / hull) if hull > 0 else iou_ab


def clip_boxes(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    boxes = np.asarray(boxes, float).reshape(-1, 4).copy()
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
    return boxes


def format_reward(parsed: ParsedCompletion) -> Tuple[float, str]:
    """1 when the completion follows the template, else 0 with the parser's reason."""
    return (1.0, "") if parsed.ok else (0.0, parsed.reason)


def box_reward(pred_boxes, gt_boxes, iou_threshold: float = 0.5,
               image_size: Optional[Tuple[int, int]] = None) -> Tuple[float, str, Dict[str, float]]:
    """Bipartite matching (Hungarian on 1 - IoU); a matched pair is a TP when IoU >= tau.
    r_bbox = mIoU(TP pairs) x F1, F1 = 2TP / (2TP + FP + FN); empty/empty -> 1.
    image_size = (width, height): predicted boxes are clipped to the image first.

    Ties: when several assignments reach the minimal total 1 - IoU, the one with the highest r_bbox is used.
    As 2TP + FP + FN = n_pred + n_gt, r_bbox = 2 * sum(TP IoUs) / (n_pred + n_gt), so the tie-break is the
    largest sum of TP IoUs (more true positives, in the usual tie). It is solved in one assignment on
    1 - IoU - TIE_BREAK * IoU * [IoU >= tau]: TIE_BREAK (1e-9) is far below any real difference in total IoU
    and far above float rounding, so it only decides between equally good assignments."""
    pred = np.asarray(pred_boxes, float).reshape(-1, 4)
    gt = np.asarray(gt_boxes, float).reshape(-1, 4)
    empty = {"tp": 0, "fp": len(pred), "fn": len(gt), "miou": 0.0, "f1": 0.0}
    if not np.isfinite(pred).all():
        return 0.0, R_BOXES_NOT_FINITE, empty
    if image_size is not None:
        pred = clip_boxes(pred, *image_size)
    if len(gt) == 0 and len(pred) == 0:
        return 1.0, "", {"tp": 0, "fp": 0, "fn": 0, "miou": 1.0, "f1": 1.0}
    if len(pred) == 0:
        return 0.0, R_NO_BOXES, empty
    iou_m = box_iou_matrix(pred, gt)
    tp_ious: List[float] = []
    if len(gt):
        rows, cols = linear_sum_assignment(1.0 - iou_m - TIE_BREAK * iou_m * (iou_m >= iou_threshold))
        tp_ious = [float(iou_m[r, c]) for r, c in zip(rows, cols) if iou_m[r, c] >= iou_threshold]
    tp = len(tp_ious)
    fp, fn = len(pred) - tp, len(gt) - tp
    f1 = 2 * tp / (2 * tp + fp + fn)
    miou = float(np.mean(tp_ious)) if tp else 0.0
    details = {"tp": tp, "fp": fp, "fn": fn, "miou": miou, "f1": f1}
    return miou * f1, ("" if tp else R_NO_BOX_MATCH), details


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """2|A∩B| / (|A| + |B|) on bool masks; 1 when both are empty."""
    pred, gt = np.asarray(pred).astype(bool), np.asarray(gt).astype(bool)
    total = int(pred.sum()) + int(gt.sum())
    return 1.0 if total == 0 else float(2 * np.logical_and(pred, gt).sum() / total)


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """|A∩B| / |A∪B| on bool masks; 1 when both are empty."""
    pred, gt = np.asarray(pred).astype(bool), np.asarray(gt).astype(bool)
    union = int(np.logical_or(pred, gt).sum())
    return 1.0 if union == 0 else float(np.logical_and(pred, gt).sum() / union)


@dataclass
class MaskRewardConfig:
    """The mask-reward constants (same names as `common.config.RewardConfig`, which also works here)."""
    dice_threshold: float = 0.05
    density_aware: bool = False
    density_ref_fraction: float = 0.05
    density_max_threshold: float = 0.3
    empty_mask_reward: float = -1.0


def switch_threshold(gt: np.ndarray, cfg=None) -> float:
    """delta, or for the density-aware variant min(max, delta * sqrt(ref / f)) when 0 < f < ref."""
    cfg = cfg or MaskRewardConfig()
    if not cfg.density_aware:
        return float(cfg.dice_threshold)
    frac = float(np.asarray(gt, bool).mean()) if np.size(gt) else 0.0
    if frac <= 0 or frac >= cfg.density_ref_fraction:
        return float(cfg.dice_threshold)
    return float(min(cfg.density_max_threshold, cfg.dice_threshold * np.sqrt(cfg.density_ref_fraction / frac)))


def mask_reward(pred: np.ndarray, gt: np.ndarray, cfg=None) -> Tuple[float, str, float]:
    """Dual granularity: Dice < delta -> GIoU of the masks' bounding boxes (coarse, in [-1, 1]);
    else 1 + 2*Dice (fine). Empty prediction -> cfg.empty_mask_reward with a reason.
    cfg: MaskRewardConfig or RewardConfig. Returns (reward, reason, dice)."""
    cfg = cfg or MaskRewardConfig()
    pred, gt = np.asarray(pred).astype(bool), np.asarray(gt).astype(bool)
    if pred.shape != gt.shape:
        return 0.0, R_MASK_SHAPE, 0.0
    d = dice(pred, gt)
    pred_box, gt_box = mask_to_box(pred), mask_to_box(gt)
    if pred_box is None:
        if gt_box is None:
            return 3.0, "", 1.0  # nothing to find and nothing drawn: a perfect answer (1 + 2*Dice, Dice=1)
        return float(cfg.empty_mask_reward), R_EMPTY_MASK, 0.0
    if gt_box is None:
        return float(cfg.empty_mask_reward), R_MASK_WITHOUT_LESION, 0.0
    if d < switch_threshold(gt, cfg):
        return giou(pred_box, gt_box), "", d
    return 1.0 + 2.0 * d, "", d
