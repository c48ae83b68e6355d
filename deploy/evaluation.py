"""Evaluation of a driver's policy on data splits: greedy answers through `Driver.answer`, then mDice, mIoU and
failure rate overall and per modality with 95% bootstrap intervals over samples, written to the run's eval/
folder; the first `run.eval_mask_images` samples of a split are drawn with their predicted mask.

A split evaluated twice at the same step and policy version (the periodic eval of the last step, then the final
eval) is computed and logged once: the second call reuses the first's result."""
from __future__ import annotations

import json
import weakref
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
from tqdm import tqdm

from coreseg.common.data import LesionDataset
from coreseg.common.metrics import markdown_table_ci, summarize_ci
from coreseg.common.seeding import derive_seed

START_TAG = "step0"  # the starting checkpoint's eval (the SFT result when GRPO follows SFT)
SAMPLED = "_sampled"  # after the tag and split names of an eval of sampled answers (run.eval_sampled)
_DONE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # driver -> {(step, version, split, limit): result}


def evaluate_splits(driver, splits: List[str], limit: Optional[int] = None, tag: str = "final") -> Dict[str, dict]:
    """Greedy answer per sample (or one sampled as in training, run.eval_sampled) -> `<seg>` mask -> mDice, mIoU,
    failure rate (+ per modality); limit None or 0: the whole split."""
    if driver.rollout is None:
        raise RuntimeError("evaluation needs rollout workers")
    limit = limit or None
    sampled = driver.cfg.run.eval_sampled
    suffix = SAMPLED if sampled else ""
    tag += suffix
    done = _DONE.setdefault(driver, {})
    results: Dict[str, dict] = {}
    for split in splits:
        key = (driver.step["grpo"], driver.version, split, limit, sampled)
        if key in done:
            results[split] = done[key]
            continue
        try:
            ds = LesionDataset(driver.cfg.data.path, split, batch_size=16, shuffle=False,
                               skip_invalid=driver.cfg.data.skip_invalid,
                               max_image_pixels=driver.cfg.data.max_image_pixels)
        except ValueError as err:
            print(f"[coreseg] eval: skipping split {split}: {err}")
            continue
        records, drawn = [], []
        total = min(limit or len(ds), len(ds))
        for batch, samples in enumerate(tqdm(ds.iter_all(limit), desc=f"eval {split}", total=-(-total // 16),
                                             unit="batch")):
            # sampled: a seed per batch (the engines derive one per request from it), so no two samples share a draw
            seed = derive_seed(driver.cfg.run.seed, batch) if sampled else None
            groups = driver.generate(samples, n=1, greedy=not sampled, seed=seed)
            answered = driver.answer(samples, groups)
            for s, error in answered.failed:
                records.append({"id": s.id, "modality": s.modality, "dice": 0.0, "iou": 0.0,
                                "format_ok": False, "text": f"ERROR {error}"})
            for s, g, sc in zip(answered.samples, answered.groups, answered.scores):
                records.append({"id": s.id, "modality": s.modality, "dice": sc.dice, "iou": sc.iou,
                                "format_ok": sc.format_ok, "reward": sc.total, "text": g.completions[0].text})
            drawn += _mask_images(driver, answered, driver.cfg.run.eval_mask_images - len(drawn))
        results[split] = {"overall": summarize_ci(records), "by_modality": {
            k: summarize_ci(v) for k, v in _by_modality(records).items()}, "records": records}
        done[key] = results[split]
        if driver.logger is not None:
            driver.logger.log("eval", driver.step["grpo"],
                              {f"{split}{suffix}/{k}": v for k, v in results[split]["overall"].items()})
            for sample_id, image in drawn:
                driver.logger.image(f"eval_masks/{split}{suffix}/{sample_id}", image, driver.step["grpo"])
        write_mask_images(driver.run_dir / "eval" / f"{tag}_masks" / split, drawn)
    write_eval(driver.run_dir, results, tag)
    driver.run.publish("eval")
    return results


def evaluate_start(driver, splits: List[str], limit: Optional[int] = None) -> Optional[Dict[str, dict]]:
    """The starting checkpoint's eval (eval/step0.*), before the first GRPO step, so the report shows
    start -> end deltas. Skipped on a resumed run that has it already, or past step 0."""
    suffix = SAMPLED if driver.cfg.run.eval_sampled else ""
    if driver.step["grpo"] != 0 or (driver.run_dir / "eval" / f"{START_TAG}{suffix}.json").exists():
        return None
    if driver.version == 0:  # weights not pushed yet (GRPO from the base model): the workers need them
        driver.logger.log("grpo", 0, driver.push_weights())
    return evaluate_splits(driver, splits, limit, tag=START_TAG)


def _by_modality(records: List[dict]) -> Dict[str, List[dict]]:
    out: Dict[str, List[dict]] = {}
    for r in records:
        out.setdefault(r["modality"], []).append(r)
    return dict(sorted(out.items()))


def _mask_images(driver, answered, count: int) -> List[tuple]:
    """(sample id, HxWx3 uint8) for up to `count` answered samples that produced a `<seg>` state: the image with
    the predicted mask in red and the ground-truth outline in green."""
    rows = [k for k in range(len(answered.samples)) if answered.forward.seg_found[k]][:max(0, count)] \
        if answered.samples else []
    if not rows:
        return []
    picked = [answered.samples[k] for k in rows]
    masks = driver.reward.masks([s.id for s in picked], [s.image for s in picked], answered.forward.seg_states[rows])
    return [(s.id, draw_mask(s.image, m, s.masks)) for s, m in zip(picked, masks)]


def draw_mask(image: np.ndarray, pred: np.ndarray, gt_masks) -> np.ndarray:
    """The predicted mask blended in red, the ground-truth lesions' outlines in green."""
    from coreseg.deploy.predict import overlay

    out = overlay(np.asarray(image)[..., :3], np.asarray(pred, bool))
    for gt in gt_masks:
        gt = np.asarray(gt, bool)
        inner = gt.copy()  # a pixel is inside when it and its 4 neighbours are lesion
        inner[1:, :] &= gt[:-1, :]
        inner[:-1, :] &= gt[1:, :]
        inner[:, 1:] &= gt[:, :-1]
        inner[:, :-1] &= gt[:, 1:]
        out[gt & ~inner] = (40, 220, 40)
    return out


def write_mask_images(folder: Path, drawn: List[tuple]) -> None:
    from PIL import Image

    if not drawn:
        return
    folder.mkdir(parents=True, exist_ok=True)
    for sample_id, image in drawn:
        Image.fromarray(image).save(folder / f"{Path(sample_id).name}.png")


def write_eval(run_dir: Path, results: Dict[str, dict], tag: str) -> None:
    out = run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{tag}.json").write_text(json.dumps(results, indent=1))
    lines = [f"# Evaluation ({tag})", "", "95% intervals: percentile bootstrap over samples.", "",
             markdown_table_ci({k: v["overall"] for k, v in results.items()})]
    for split, res in results.items():
        lines += ["", f"## {split} by modality", "", markdown_table_ci(res["by_modality"], "modality")]
    (out / f"{tag}.md").write_text("\n".join(lines) + "\n")
