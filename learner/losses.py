"""DiceCE on mask logits (soft Dice + BCE with logits) and mask targets aligned with SAM's geometry."""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 1.0, bce_weight: float = 1.0,
                 smooth: float = 1.0, valid: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, float]]:
    """logits/target [M, 1, h, w] (target in {0, 1}); dice_weight * soft-Dice loss + bce_weight * BCE.

    Soft Dice per sample on sigmoid(logits): 1 - (2 sum(p t) + smooth) / (sum(p) + sum(t) + smooth), then the
    mean over valid samples; BCE with logits is the mean over pixels and valid samples. Computed in float32
    (or wider). With no valid sample the loss is a graph-connected zero and the parts are 0.
    """
    if logits.shape != target.shape or logits.dim() != 4 or logits.shape[1] != 1:
        raise ValueError(f"logits and target must both be [M, 1, h, w], got {tuple(logits.shape)} "
                         f"and {tuple(target.shape)}")
    if valid is None:
        valid = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    valid = torch.as_tensor(valid, dtype=torch.bool).to(logits.device)
    if valid.shape != (logits.shape[0],):
        raise ValueError(f"valid must be [M] = [{logits.shape[0]}], got {tuple(valid.shape)}")
    if not bool(valid.any()):
        return logits.sum() * 0.0, {"dice": 0.0, "bce": 0.0}
    dtype = torch.promote_types(logits.dtype, torch.float32)
    x = logits[valid].flatten(1).to(dtype)
    t = target[valid].flatten(1).to(device=x.device, dtype=dtype)
    p = torch.sigmoid(x)
    dice = 1.0 - (2.0 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)
    bce = F.binary_cross_entropy_with_logits(x, t, reduction="none").mean(1)
    loss = dice_weight * dice.mean() + bce_weight * bce.mean()
    return loss, {"dice": float(dice.mean().detach()), "bce": float(bce.mean().detach())}


def _as_mask(mask) -> torch.Tensor:
    m = np.asarray(mask)
    if m.ndim != 2 or 0 in m.shape:
        raise ValueError(f"a ground-truth mask must be a non-empty HxW array, got shape {m.shape}")
    return torch.from_numpy(m.astype(np.float32))[None, None]


def low_res_target(mask: np.ndarray, sam_img_size: int, low_res_size: int, soft: bool = False) -> torch.Tensor:
    """Ground truth [low_res_size, low_res_size] aligned with SAM's low-res logits.

    Those logits cover SAM's padded square input: the image resized so its longest side is S (same rounding
    and bilinear-antialias resize as common/models/sam.py preprocess_image), then zero-padded bottom/right
    to S x S. The mask goes through the same resize and padding, then is area-averaged down to the low-res
    grid and thresholded at 0.5 (a low-res pixel at least half lesion counts as lesion). `soft` returns the
    lesion fraction per low-res pixel instead.
    """
    m = _as_mask(mask)
    h, w = m.shape[-2:]
    scale = sam_img_size / max(h, w)
    nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
    if (nh, nw) != (h, w):
        m = F.interpolate(m, (nh, nw), mode="bilinear", align_corners=False, antialias=True).clamp(0.0, 1.0)
    m = F.pad(m, (0, sam_img_size - nw, 0, sam_img_size - nh))
    frac = F.interpolate(m, (low_res_size, low_res_size), mode="area")[0, 0]
    return frac if soft else (frac >= 0.5).float()


def resize_mask(mask: np.ndarray, size: Tuple[int, int]) -> torch.Tensor:
    """HxW mask -> [h, w] {0, 1} at `size` in the same frame (no padding): area average when shrinking,
    bilinear when enlarging, threshold 0.5."""
    m = _as_mask(mask)
    h, w = int(size[0]), int(size[1])
    if (h, w) != tuple(m.shape[-2:]):
        shrinking = h <= m.shape[-2] and w <= m.shape[-1]
        m = (F.interpolate(m, (h, w), mode="area") if shrinking
             else F.interpolate(m, (h, w), mode="bilinear", align_corners=False))
    return (m[0, 0] >= 0.5).float()


def mask_targets(gt_masks: Sequence[np.ndarray], size: Optional[Tuple[int, int]] = None,
                 sam_img_size: Optional[int] = None) -> torch.Tensor:
    """Targets [M, 1, h, w] for a list of HxW (union) masks.

    size None: the masks at full size (they must share one shape; pair with logits upscaled to the image).
    size (l, l) with sam_img_size: SAM low-res targets (`low_res_target`, padded-square geometry).
    size (h, w) alone: a plain resize in the image's own frame (`resize_mask`).
    """
    if size is None:
        shapes = {np.asarray(g).shape for g in gt_masks}
        if len(shapes) > 1:
            raise ValueError(f"full-size targets need masks of one shape, got {sorted(shapes)}")
        if not gt_masks:
            return torch.zeros(0, 1, 0, 0)
        return torch.stack([(_as_mask(g)[0] >= 0.5).float() for g in gt_masks])
    if sam_img_size is not None:
        if size[0] != size[1]:
            raise ValueError(f"SAM low-res logits are square, got size {tuple(size)}")
        out = [low_res_target(g, sam_img_size, int(size[0]))[None] for g in gt_masks]
    else:
        out = [resize_mask(g, size)[None] for g in gt_masks]
    return torch.stack(out) if out else torch.zeros(0, 1, int(size[0]), int(size[1]))
