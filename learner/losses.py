"""DiceCE on mask logits (soft Dice + BCE with logits) and mask targets aligned with SAM's geometry."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 1.0, bce_weight: float = 1.0,
                 smooth: float = 1.0, valid: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, float]]:
    """logits/target [M, 1, h, w]; mean over valid samples of dice_w * (1 - soft Dice) + bce_w * BCE."""
    if valid is None:
        valid = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    if not bool(valid.any()):
        zero = logits.sum() * 0.0
        return zero, {"dice": 0.0, "bce": 0.0}
    x, t = logits[valid].flatten(1).float(), target[valid].flatten(1).float()
    p = torch.sigmoid(x)
    dice = 1.0 - (2.0 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)
    bce = F.binary_cross_entropy_with_logits(x, t, reduction="none").mean(1)
    loss = dice_weight * dice.mean() + bce_weight * bce.mean()
    return loss, {"dice": float(dice.mean().detach()), "bce": float(bce.mean().detach())}


def low_res_target(mask: np.ndarray, sam_img_size: int, low_res_size: int) -> torch.Tensor:
    """Ground truth aligned with SAM's low-res logits, which cover the padded square input: the longest side
    is scaled to `low_res_size * input/S` and the rest padded (bottom/right), as in preprocessing."""
    h, w = mask.shape
    scale = sam_img_size / max(h, w)
    nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
    lh = max(1, round(nh * low_res_size / sam_img_size))
    lw = max(1, round(nw * low_res_size / sam_img_size))
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    small = F.interpolate(m, (lh, lw), mode="area")[0, 0]
    out = torch.zeros(low_res_size, low_res_size)
    out[:lh, :lw] = (small >= 0.5).float()
    return out
