"""A minimal PNG writer for tests, independent of PIL: 8/16-bit greyscale/RGB, optional sBIT chunk, rows
filtered with None or Sub (so the decoder's unfiltering is exercised), and rows streamed through zlib (a
10000x10000 image of zeros is a few KB and is never held in memory)."""
from __future__ import annotations

import struct
import zlib
from typing import Iterable, Optional, Sequence

import numpy as np

MAGIC = b"\x89PNG\r\n\x1a\n"
COLOUR_TYPES = {1: 0, 3: 2, 4: 6}  # channels -> PNG colour type (grey, RGB, RGBA)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def _sub(row: bytes, bpp: int) -> bytes:
    r = np.frombuffer(row, np.uint8)
    out = r.copy()
    out[bpp:] = r[bpp:] - r[:-bpp]  # uint8 arithmetic wraps mod 256, as the PNG Sub filter does
    return out.tobytes()


def png_from_rows(width: int, height: int, bit_depth: int, channels: int, rows: Iterable[bytes],
                  sbit: Optional[Sequence[int]] = None) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, COLOUR_TYPES[channels], 0, 0, 0)
    bpp = max(1, bit_depth // 8 * channels)
    comp = zlib.compressobj(9)
    parts = []
    for y, row in enumerate(rows):
        parts.append(comp.compress(b"\x01" + _sub(row, bpp) if y % 2 else b"\x00" + row))
    parts.append(comp.flush())
    body = MAGIC + _chunk(b"IHDR", ihdr)
    if sbit:
        body += _chunk(b"sBIT", bytes(sbit))
    return body + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")


def png16(array: np.ndarray, sbit: Optional[Sequence[int]] = None) -> bytes:
    """HxW or HxWxC (C = 3, 4) uint16 array to a 16-bit PNG (samples big-endian, as PNG stores them)."""
    h, w = array.shape[:2]
    channels = 1 if array.ndim == 2 else array.shape[2]
    big = np.ascontiguousarray(array.astype(">u2"))
    return png_from_rows(w, h, 16, channels, (big[y].tobytes() for y in range(h)), sbit)


def blank_png(width: int, height: int) -> bytes:
    """A 1-bit greyscale all-black PNG of any size, streamed row by row (10000x10000 is ~12 KB)."""
    row = bytes(-(-width // 8))
    return png_from_rows(width, height, 1, 1, (row for _ in range(height)))
