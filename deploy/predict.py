"""`coreseg predict`: one image + question -> reasoning text, mask PNG and overlay PNG."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from common.config import TrainConfig
from common.images import ImageError, decode_image, encode_png
from common.prompts import parse_completion


def overlay(image: np.ndarray, mask: np.ndarray, colour=(255, 40, 40), alpha: float = 0.45) -> np.ndarray:
    out = image.astype(np.float32).copy()
    out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(colour, np.float32)
    return out.clip(0, 255).astype(np.uint8)


def predict(cfg: TrainConfig, run_dir: Path, image_path: str, question: str, out_dir: str,
            checkpoint: str | None = None) -> dict:
    """Builds the run's pools in this process (no Ray), restores its latest checkpoint (or `checkpoint`) and
    predicts one image."""
    from deploy.driver import Driver

    read_image_file(image_path, cfg.data.max_image_pixels)  # a bad file fails here, before the models load
    cfg.cluster.reward_workers = 1
    driver = Driver(cfg, run_dir, local=True, read_only=True)  # the run's config and metrics stay as they are
    try:
        if driver.run.latest_checkpoint() is not None or checkpoint:
            driver.restore(checkpoint)
        return predict_with(driver, image_path, question, out_dir)
    finally:
        driver.close()


def read_image_file(image_path: str, max_pixels: int) -> np.ndarray:
    """HxWx3 uint8 of an image file; DataError naming the file when it is missing, empty, not an image,
    corrupt or above `max_pixels` pixels (checked before decoding)."""
    from common.data import DataError

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

    from common.data import LesionSample

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
