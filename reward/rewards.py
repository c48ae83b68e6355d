"""The adaptive dual-granularity reward (pure numpy). Each function returns its value and, when bad
output forced the value, a reason string ("" otherwise).

Box convention: [x1, y1, x2, y2] pixel edges (x2/y2 exclusive); area = (x2-x1)*(y2-y1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy.optimize import linear_sum_assignment

from common.images import mask_to_box
from common.prompts import ParsedCompletion


def box_iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, float).reshape(-1, 4), np.asarray(b, float).reshape(-1, 4)
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def giou(a: Sequence[float], b: Sequence[float]) -> float:
    """Generalised IoU of two boxes, in [-1, 1]."""
    iou = float(box_iou_matrix(np.asarray(a), np.asarray(b))[0, 0])
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = area_a + area_b - ix * iy
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return iou - (hull - union) / hull if hull > 0 else iou


def clip_boxes(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    boxes = np.asarray(boxes, float).reshape(-1, 4).copy()
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
    return boxes


def format_reward(parsed: ParsedCompletion) -> Tuple[float, str]:
    return (1.0, "") if parsed.ok else (0.0, parsed.reason)


def box_reward(pred_boxes, gt_boxes, iou_threshold: float = 0.5,
               image_size: Optional[Tuple[int, int]] = None) -> Tuple[float, str, Dict[str, float]]:
    """Bipartite (Hungarian on 1-IoU) matching; r_bbox = mIoU(TP pairs) x F1, F1 = 2TP/(2TP+FP+FN)."""
    pred = np.asarray(pred_boxes, float).reshape(-1, 4)
    gt = np.asarray(gt_boxes, float).reshape(-1, 4)
    if image_size is not None:
        pred = clip_boxes(pred, *image_size)
    if len(gt) == 0 and len(pred) == 0:
        return 1.0, "", {"tp": 0, "fp": 0, "fn": 0, "miou": 1.0, "f1": 1.0}
    if len(pred) == 0:
        return 0.0, "no_boxes", {"tp": 0, "fp": 0, "fn": len(gt), "miou": 0.0, "f1": 0.0}
    iou = box_iou_matrix(pred, gt)
    tp_ious: List[float] = []
    if len(gt):
        rows, cols = linear_sum_assignment(1.0 - iou)
        tp_ious = [float(iou[r, c]) for r, c in zip(rows, cols) if iou[r, c] >= iou_threshold]
    tp = len(tp_ious)
    fp, fn = len(pred) - tp, len(gt) - tp
    f1 = 2 * tp / (2 * tp + fp + fn)
    miou = float(np.mean(tp_ious)) if tp else 0.0
    details = {"tp": tp, "fp": fp, "fn": fn, "miou": miou, "f1": f1}
    return miou * f1, ("" if tp else "no_box_match"), details


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    pred, gt = pred.astype(bool), gt.astype(bool)
    total = pred.sum() + gt.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(pred, gt).sum() / total)


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    pred, gt = pred.astype(bool), gt.astype(bool)
    union = np.logical_or(pred, gt).sum()
    return 1.0 if union == 0 else float(np.logical_and(pred, gt).sum() / union)


@dataclass
class MaskRewardConfig:
    dice_threshold: float = 0.05
    density_aware: bool = False
    density_ref_fraction: float = 0.05
    density_max_threshold: float = 0.3
    empty_mask_reward: float = -1.0


def switch_threshold(gt: np.ndarray, cfg: MaskRewardConfig) -> float:
    """delta; density-aware: for a foreground fraction f below ref, delta_eff = min(max, delta * sqrt(ref / f)),
    so small lesions stay on the coarse (box) branch longer."""
    if not cfg.density_aware:
        return cfg.dice_threshold
    frac = float(gt.mean()) if gt.size else 0.0
    if frac <= 0 or frac >= cfg.density_ref_fraction:
        return cfg.dice_threshold
    return float(min(cfg.density_max_threshold, cfg.dice_threshold * np.sqrt(cfg.density_ref_fraction / frac)))


def mask_reward(pred: np.ndarray, gt: np.ndarray, cfg: MaskRewardConfig = MaskRewardConfig()) -> Tuple[float, str, float]:
    """Dual granularity: Dice < delta -> GIoU of the masks' bounding boxes (coarse, in [-1, 1]);
    else 1 + 2*Dice (fine). Returns (reward, reason, dice)."""
    pred, gt = pred.astype(bool), gt.astype(bool)
    d = dice(pred, gt)
    pred_box, gt_box = mask_to_box(pred), mask_to_box(gt)
    if pred_box is None:
        if gt_box is None:
            return 3.0, "", 1.0  # nothing to find and nothing drawn: a perfect answer
        return cfg.empty_mask_reward, "empty_mask", 0.0
    if gt_box is None:
        return cfg.empty_mask_reward, "mask_without_lesion", 0.0
    if d < switch_threshold(gt, cfg):
        return giou(pred_box, gt_box), "", d
    return 1.0 + 2.0 * d, "", d


def total_reward(format_value: float, box_value: float, mask_value: float, w_format: float = 1.0,
                 w_box: float = 1.0, w_mask: float = 1.0) -> Tuple[float, Dict[str, float]]:
    comps = {"format": format_value, "box": box_value, "mask": mask_value}
    return w_format * format_value + w_box * box_value + w_mask * mask_value, comps
