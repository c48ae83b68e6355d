"""DiceCE on mask logits (soft Dice + BCE with logits) and mask targets aligned with SAM's geometry."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from coreseg.common.models.sam import longest_side_size


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


def low_res_target(mask: np.ndarray, sam_img_size: int, low_res_size: int, soft: bool = False,
                   keep_aspect: bool = True) -> torch.Tensor:
    """Ground truth [low_res_size, low_res_size] aligned with SAM's low-res logits.

    Those logits cover SAM's square input. SAM (keep_aspect): the image resized so its longest side is S
    (same rounding and bilinear-antialias resize as common/models/sam.py sam_input), then zero-padded
    bottom/right to S x S. MedSAM (keep_aspect=False): the image stretched to S x S, no padding. The mask
    goes through the same resize and padding, then is area-averaged down to the low-res grid and thresholded
    at 0.5 (a low-res pixel at least half lesion counts as lesion). `soft` returns the lesion fraction per
    low-res pixel instead.
    """
    m = _as_mask(mask)
    h, w = m.shape[-2:]
    nh, nw = longest_side_size(h, w, sam_img_size) if keep_aspect else (sam_img_size, sam_img_size)
    if (nh, nw) != (h, w):
        m = F.interpolate(m, (nh, nw), mode="bilinear", align_corners=False, antialias=True).clamp(0.0, 1.0)
    m = F.pad(m, (0, sam_img_size - nw, 0, sam_img_size - nh))
    frac = F.interpolate(m, (low_res_size, low_res_size), mode="area")[0, 0]
    return frac if soft else (frac >= 0.5).float()
