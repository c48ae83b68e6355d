"""`coreseg predict`: an image (or a folder of images) + a question -> the answer, a mask PNG and an overlay PNG,
in-process (deploy/infer.py); `predict_with` answers through a Driver's pools (the path evaluation uses)."""
from __future__ import annotations

from pathlib import Path
from typing import List

import numpy as np
from PIL import Image

from coreseg.common.images import ImageError, decode_image, encode_png
from coreseg.common.prompts import parse_completion


def overlay(image: np.ndarray, mask: np.ndarray, colour=(255, 40, 40), alpha: float = 0.45) -> np.ndarray:
    out = image.astype(np.float32).copy()
    out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(colour, np.float32)
    return out.clip(0, 255).astype(np.uint8)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def image_paths(image: str) -> List[Path]:
    """The image file, or the images of a folder (sorted); DataError when there is none."""
    from coreseg.common.data import DataError

    path = Path(image)
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise DataError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)})")
        return found
    return [path]


def predict_files(predictor, image: str, question: str, out_dir: str, max_pixels: int) -> List[dict]:
    """`predictor` (deploy/infer.py) on an image file or every image of a folder. Every file is read and checked
    first (a bad one is named before any prediction). One image: OUT/mask.png and OUT/overlay.png; a folder:
    OUT/STEM/mask.png and overlay.png per image. OUT/predictions.jsonl holds one record per image."""
    import json

    paths = image_paths(image)
    images = [read_image_file(str(p), max_pixels) for p in paths]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for path, pixels in zip(paths, images):
        pred = predictor.predict(pixels, question)
        folder = out if len(paths) == 1 and not Path(image).is_dir() else out / path.stem
        folder.mkdir(parents=True, exist_ok=True)
        mask_path, overlay_path = folder / "mask.png", folder / "overlay.png"
        mask_path.write_bytes(encode_png(pred.mask))
        Image.fromarray(overlay(pixels, pred.mask)).save(overlay_path)
        parsed = parse_completion(pred.text)
        records.append({"image": str(path), "text": pred.text, "seg_found": pred.seg_found,
                        "format_ok": parsed.ok, "format_reason": parsed.reason,
                        "boxes": parsed.boxes if parsed.boxes_ok else None,
                        "mask_pixels": int(pred.mask.sum()), "mask_path": str(mask_path),
                        "overlay_path": str(overlay_path)})
    with open(out / "predictions.jsonl", "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return records


def read_image_file(image_path: str, max_pixels: int) -> np.ndarray:
    """HxWx3 uint8 of an image file; DataError naming the file when it is missing, empty, not an image,
    corrupt or above `max_pixels` pixels (checked before decoding)."""
    from coreseg.common.data import DataError

    path = Path(image_path)
    if not path.is_file():
        raise DataError(f"{path}: no such image file")
    try:
        return decode_image(path.read_bytes(), max_pixels)
    except ImageError as err:
        raise DataError(f"{path}: {err}") from None


def predict_with(driver, image_path: str, question: str, out_dir: str) -> dict:
    """Greedy answer for one image through the driver's answer() path; writes mask.png and overlay.png."""
    import torch

    from coreseg.common.data import LesionSample

    image = read_image_file(image_path, driver.cfg.data.max_image_pixels)
    sample = LesionSample(id=f"predict-{Path(image_path).stem}", image=image, masks=[],
                          boxes=np.zeros((0, 4)), question=question)
    answered = driver.answer([sample], driver.generate([sample], n=1, greedy=True), score=False)
    if answered.failed:
        raise RuntimeError(f"generation failed: {answered.failed[0][1]}")
    text, forward = answered.groups[0].completions[0].text, answered.forward
    mask = np.zeros(image.shape[:2], bool)
    if forward.seg_found[0]:
        mask = driver.reward.masks([sample.id], [image], torch.as_tensor(forward.seg_states[:1]))[0]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mask_path, overlay_path = out / "mask.png", out / "overlay.png"
    mask_path.write_bytes(encode_png(mask))
    Image.fromarray(overlay(image, mask)).save(overlay_path)
    parsed = parse_completion(text)
    return {"text": text, "parsed": parsed, "mask_path": str(mask_path), "overlay_path": str(overlay_path)}
