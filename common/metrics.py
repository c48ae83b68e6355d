"""Evaluation metrics (the paper's): mean Dice, mean IoU and failure rate.

A sample fails when its Dice is 0 or its output does not follow the template (invalid format).
mDice/mIoU average over all samples, failed ones included (as 0 when no mask was drawn).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, Iterable, List


def summarize(records: Iterable[dict]) -> Dict[str, float]:
    """records: dicts with dice, iou, format_ok -> {mDice, mIoU, failure_rate, n}."""
    records = list(records)
    n = len(records)
    if n == 0:
        return {"mDice": 0.0, "mIoU": 0.0, "failure_rate": 0.0, "n": 0}
    failures = sum(1 for r in records if r["dice"] == 0.0 or not r["format_ok"])
    return {"mDice": sum(r["dice"] for r in records) / n, "mIoU": sum(r["iou"] for r in records) / n,
            "failure_rate": failures / n, "n": n}


def summarize_by(records: Iterable[dict], key: str = "modality") -> Dict[str, Dict[str, float]]:
    groups: Dict[str, List[dict]] = defaultdict(list)
    for r in records:
        groups[r[key]].append(r)
    return {k: summarize(v) for k, v in sorted(groups.items())}


def markdown_table(rows: Dict[str, Dict[str, float]], title: str = "split") -> str:
    lines = [f"| {title} | n | mDice | mIoU | failure rate |", "|---|---|---|---|---|"]
    for name, m in rows.items():
        lines.append(f"| {name} | {m['n']} | {m['mDice']:.4f} | {m['mIoU']:.4f} | {m['failure_rate']:.4f} |")
    return "\n".join(lines)
