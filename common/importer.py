"""`coreseg data import`: an image folder + a mask folder (ISIC/Kvasir style, matched by file stem) to the
lesion Parquet format. Each connected component of a mask is one lesion (scipy.ndimage.label)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from common.data import DataError, LesionSample, write_parquet
from common.images import DEFAULT_MAX_IMAGE_PIXELS, ImageError, decode_image, decode_mask, mask_to_box

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def split_masks(mask: np.ndarray, min_pixels: int = 1) -> List[np.ndarray]:
    """One bool mask per 8-connected component with at least `min_pixels` pixels."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
    out = [labels == k for k in range(1, count + 1)]
    return [m for m in out if m.sum() >= min_pixels]


def _find_mask(masks_dir: Path, stem: str, mask_suffix: str) -> Optional[Path]:
    for candidate in sorted(masks_dir.glob(f"{stem}{mask_suffix}.*")):
        if candidate.suffix.lower() in IMAGE_SUFFIXES:
            return candidate
    return None


def _read_file(path: Path, decode, max_image_pixels: int):
    try:
        return decode(path.read_bytes(), max_image_pixels)
    except ImageError as err:
        raise DataError(f"{path}: {err}") from None


def import_folder(images_dir: str | Path, masks_dir: str | Path, out_path: str | Path, *, category: str = "lesion",
                  modality: str = "unknown", source: str = "", mask_suffix: str = "", split: str = "auto",
                  seed: int = 0, min_pixels: int = 1, question: str = "Locate and segment the {category}.",
                  max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Path:
    """Raises DataError naming the file for an empty, non-image, corrupt or too large (> max_image_pixels,
    checked before decoding) image or mask."""
    images_dir, masks_dir = Path(images_dir), Path(masks_dir)
    for d in (images_dir, masks_dir):
        if not d.is_dir():
            raise DataError(f"{d} is not a folder")
    images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DataError(f"{images_dir}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    by_stem: dict = {}
    for path in images:  # the stem is the sample id: two images of one stem would share it
        if path.stem in by_stem:
            raise DataError(f"{by_stem[path.stem]} and {path} have the same file stem, which is the sample id; "
                            "rename one")
        by_stem[path.stem] = path
    samples, unmatched = [], []
    for path in tqdm(images, desc="import"):
        mask_path = _find_mask(masks_dir, path.stem, mask_suffix)
        if mask_path is None:
            unmatched.append(path.name)
            continue
        image = _read_file(path, decode_image, max_image_pixels)
        mask = _read_file(mask_path, decode_mask, max_image_pixels)
        if mask.shape != image.shape[:2]:
            raise DataError(f"{mask_path}: mask {mask.shape[::-1]} differs from image {image.shape[1::-1]}")
        lesions = split_masks(mask, min_pixels)
        boxes = np.stack([mask_to_box(m) for m in lesions]) if lesions else np.zeros((0, 4))
        if split == "auto":
            u = np.random.default_rng([seed, len(samples)]).random()
            row_split = "train" if u < 0.8 else "val" if u < 0.9 else "test_id"
        else:
            row_split = split
        samples.append(LesionSample(id=path.stem, image=image, masks=lesions, boxes=boxes,
                                    question=question.format(category=category), reasoning="",
                                    source=source or images_dir.name, modality=modality, split=row_split,
                                    category=category))
    if not samples:
        raise DataError(f"no image in {images_dir} has a mask in {masks_dir} (matched by file stem"
                        f"{' + ' + repr(mask_suffix) if mask_suffix else ''})")
    if unmatched:
        print(f"warning: {len(unmatched)} images without a mask were skipped (e.g. {unmatched[0]})")
    return write_parquet(samples, out_path)
