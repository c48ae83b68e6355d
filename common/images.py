"""PNG encode/decode and small mask/box helpers shared by data, reward and eval."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image


def encode_png(array: np.ndarray) -> bytes:
    """uint8 HxW / HxWx3 array, or a bool mask, to PNG bytes."""
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG")
    return buf.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    """PNG/JPEG bytes to an HxWx3 uint8 RGB array (raises on corrupt bytes)."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def decode_mask(data: bytes) -> np.ndarray:
    """PNG bytes to an HxW bool mask (any non-zero pixel is foreground)."""
    with Image.open(io.BytesIO(data)) as img:
        arr = np.asarray(img.convert("L"))
    return arr > 0


def mask_to_box(mask: np.ndarray) -> np.ndarray | None:
    """Tight [x1, y1, x2, y2] box in pixel-edge coordinates (x2/y2 exclusive), None for an empty mask."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)


def union_mask(masks, height: int, width: int) -> np.ndarray:
    """The HxW bool union of per-lesion masks (all False when there are none); raises ValueError naming both
    shapes when a mask does not have the image's."""
    out = np.zeros((height, width), bool)
    for m in masks:
        m = np.asarray(m, bool)
        if m.shape != out.shape:
            raise ValueError(f"ground-truth mask is {m.shape}, image is {(height, width)}")
        out |= m
    return out
