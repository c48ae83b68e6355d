"""PNG encode/decode and small mask/box helpers shared by data, reward and eval.

Decoding is guarded: empty or non-image bytes raise `ImageError`, and an image with more pixels than
`max_pixels` is refused from its header, before any pixel is decoded (a 12 KB PNG can declare 10000x10000).
High-bit-depth images (16-bit PNG greyscale / RGB / RGBA, 16/32-bit integer greyscale) are scaled to uint8 by
their bit depth: the PNG `sBIT` chunk when present, else the smallest depth (>= 8 bits) that holds the image's
largest value, so a 12-bit ramp in a 16-bit container spans 0..255 instead of being clipped.
"""
from __future__ import annotations

import hashlib
import io
import struct
import warnings
from typing import List, Optional, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

# SAM encodes at 1024x1024 and Qwen2.5-VL's processor caps an image at 12.8 M pixels, so nothing above ~16.8 M
# pixels reaches either model at full resolution, while memory grows with the pixels: a 10000x10000 PNG took
# 4.2 GB of RSS through the reader (~42 bytes per pixel), so the limit costs ~0.7 GB. `data.max_image_pixels`
# raises it (e.g. for full-size ISIC images, up to ~30 M pixels).
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_INT_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class ImageError(ValueError):
    """Bytes that are not a usable image: empty, not an image format, corrupt, or too large."""


def encode_png(array: np.ndarray) -> bytes:
    """uint8 HxW / HxWx3 array, or a bool mask, to PNG bytes."""
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG")
    return buf.getvalue()


def open_image(data: bytes, max_pixels: Optional[int] = None) -> Image.Image:
    """A lazily decoding PIL image whose header was checked: raises ImageError on empty / non-image bytes and
    when width*height > max_pixels (None or 0: no limit), without decoding pixels."""
    if data is None or len(data) == 0:
        raise ImageError("undecodable image: 0 bytes")
    try:
        with warnings.catch_warnings():  # our own limit below is the one that applies
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise ImageError(f"image refused before decoding: {err}; the limit is {max_pixels} pixels") from None
    except UnidentifiedImageError:
        raise ImageError(f"undecodable image: not a known image format ({len(data)} bytes, "
                         f"starting {bytes(data[:8])!r})") from None
    except Exception as err:  # PIL raises several types on a broken header
        raise ImageError(f"undecodable image: {type(err).__name__}: {err}") from None
    w, h = img.size
    if max_pixels and w * h > max_pixels:
        img.close()
        raise ImageError(f"image is {w}x{h} = {w * h} pixels, above the limit of {max_pixels} pixels "
                         f"(data.max_image_pixels); refused before decoding")
    return img


def _png_sbit(data: bytes) -> Optional[int]:
    """The largest significant-bit count of a PNG's colour channels (sBIT chunk), None without one."""
    if not data.startswith(_PNG_MAGIC):
        return None
    pos = 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            return None
        if kind == b"sBIT" and length:
            colour_type = data[25]
            body = data[pos + 8:pos + 8 + length]
            channels = {0: 1, 2: 3, 3: 3, 4: 1, 6: 3}.get(colour_type, len(body))
            return max(body[:channels])
        pos += 12 + length
    return None


def _to_uint8(values: np.ndarray, sbit: Optional[int]) -> np.ndarray:
    """Integer intensities to uint8 by bit depth: sBIT when known, else the smallest depth >= 8 that holds
    the largest value (so values are scaled, never clipped)."""
    values = np.clip(values, 0, None)
    bits = sbit or max(8, int(values.max(initial=0)).bit_length())
    full = float((1 << bits) - 1)
    return np.clip(np.rint(values.astype(np.float64) * (255.0 / full)), 0, 255).astype(np.uint8)


def _png16_colour(img: Image.Image, data: bytes) -> Optional[np.ndarray]:
    """HxWxC uint16 of a 16-bit RGB/RGBA PNG (PIL keeps only the high bytes: decode again with the
    little-endian raw mode, which picks the low bytes of the same big-endian samples). None otherwise."""
    rawmode = img.tile[0].args if img.tile else None
    if isinstance(rawmode, tuple):
        rawmode = rawmode[0]
    if img.format != "PNG" or rawmode not in ("RGB;16B", "RGBA;16B"):
        return None
    high = np.asarray(img).astype(np.uint16)
    with Image.open(io.BytesIO(data)) as low_img:
        low_img.tile = [t._replace(args=rawmode.replace(";16B", ";16L")) for t in low_img.tile]
        low = np.asarray(low_img).astype(np.uint16)
    return (high << 8) | low


def decode_image(data: bytes, max_pixels: Optional[int] = None) -> np.ndarray:
    """PNG/JPEG/... bytes to an HxWx3 uint8 RGB array. Raises ImageError (empty, not an image, corrupt, or
    more than max_pixels pixels, checked before decoding). High bit depths are scaled (module doc)."""
    img = open_image(data, max_pixels)
    try:
        with img:
            colour16 = _png16_colour(img, data)
            if colour16 is not None:
                return _to_uint8(colour16[..., :3], _png_sbit(data))
            if img.mode in _INT_GREY_MODES:
                grey = _to_uint8(np.asarray(img), _png_sbit(data))
                return np.repeat(grey[..., None], 3, axis=2)
            return np.asarray(img.convert("RGB"))
    except ImageError:
        raise
    except Exception as err:  # truncated / corrupt pixel data: PIL raises OSError, SyntaxError, zlib.error ...
        raise ImageError(f"undecodable image: {type(err).__name__}: {err}") from None


def decode_mask(data: bytes, max_pixels: Optional[int] = None) -> np.ndarray:
    """PNG bytes to an HxW bool mask (any non-zero pixel is foreground, also in 16-bit masks)."""
    img = open_image(data, max_pixels)
    try:
        with img:
            if img.mode in _INT_GREY_MODES:
                return np.asarray(img) > 0
            return np.asarray(img.convert("L")) > 0
    except Exception as err:
        raise ImageError(f"undecodable mask: {type(err).__name__}: {err}") from None


IMAGE_KEY_SCHEME = "id#blake2b128(shape,dtype,pixels)"  # names `image_key` in files of keyed embeddings


def image_key(sample_id: str, image: np.ndarray) -> str:
    """Cache key of an image: its sample id plus a 128-bit BLAKE2b digest of its pixels (shape, dtype, bytes).
    Ids are checked unique within one data set, but caches outlive one data set (train and eval splits,
    predict requests, warm-start files written from an earlier version of the data); with the digest a cache
    can never answer with another image's entry. ~8 ms per 1024x1024 RGB image on a slow CPU core."""
    arr = np.ascontiguousarray(image)
    digest = hashlib.blake2b(f"{arr.shape}{arr.dtype}".encode(), digest_size=16)
    digest.update(arr.data)
    return f"{sample_id}#{digest.hexdigest()}"


def image_keys(ids: Sequence[str], images: Sequence[np.ndarray]) -> List[str]:
    """`image_key` of each (id, image); an image object repeated in the list (the G rollouts of a prompt) is
    hashed once."""
    seen: dict = {}
    keys = []
    for sid, image in zip(ids, images):
        memo = (sid, id(image))
        if memo not in seen:
            seen[memo] = image_key(sid, image)
        keys.append(seen[memo])
    return keys


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
