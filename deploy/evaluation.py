"""Evaluation of a driver's policy on data splits: greedy answers through `Driver.answer`, then mDice, mIoU and
failure rate overall and per modality, written to the run's eval/ folder."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

from tqdm import tqdm

from common.data import LesionDataset
from common.metrics import markdown_table, summarize, summarize_by


def evaluate_splits(driver, splits: List[str], limit: Optional[int] = None, tag: str = "final") -> Dict[str, dict]:
    """Greedy answer per sample -> `<seg>` mask -> mDice, mIoU, failure rate (+ per modality)."""
    if driver.rollout is None:
        raise RuntimeError("evaluation needs rollout workers")
    results: Dict[str, dict] = {}
    for split in splits:
        try:
            ds = LesionDataset(driver.cfg.data.path, split, batch_size=16, shuffle=False,
                               skip_invalid=driver.cfg.data.skip_invalid,
                               max_image_pixels=driver.cfg.data.max_image_pixels)
        except ValueError as err:
            print(f"[coreseg] eval: skipping split {split}: {err}")
            continue
        records = []
        total = min(limit or len(ds), len(ds))
        for samples in tqdm(ds.iter_all(limit), desc=f"eval {split}", total=-(-total // 16), unit="batch"):
            answered = driver.answer(samples, driver.generate(samples, n=1, greedy=True))
            for s, error in answered.failed:
                records.append({"id": s.id, "modality": s.modality, "dice": 0.0, "iou": 0.0,
                                "format_ok": False, "text": f"ERROR {error}"})
            for s, g, sc in zip(answered.samples, answered.groups, answered.scores):
                records.append({"id": s.id, "modality": s.modality, "dice": sc.dice, "iou": sc.iou,
                                "format_ok": sc.format_ok, "reward": sc.total, "text": g.completions[0].text})
        results[split] = {"overall": summarize(records), "by_modality": summarize_by(records),
                          "records": records}
        if driver.logger is not None:
            driver.logger.log("eval", driver.step["grpo"],
                            {f"{split}/{k}": v for k, v in results[split]["overall"].items()})
    write_eval(driver.run_dir, results, tag)
    driver.run.publish("eval")
    return results


def write_eval(run_dir: Path, results: Dict[str, dict], tag: str) -> None:
    out = run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{tag}.json").write_text(json.dumps(results, indent=1))
    lines = [f"# Evaluation ({tag})", "", markdown_table({k: v["overall"] for k, v in results.items()})]
    for split, res in results.items():
        lines += ["", f"## {split} by modality", "", markdown_table(res["by_modality"], "modality")]
    (out / f"{tag}.md").write_text("\n".join(lines) + "\n")
