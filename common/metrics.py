"""Evaluation metrics (the paper's): mean Dice, mean IoU and failure rate.

A sample fails when its Dice is 0 or its output does not follow the template (invalid format).
mDice/mIoU average over all samples, failed ones included (as 0 when no mask was drawn).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, Iterable, List, Tuple

import numpy as np


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


# ---- uncertainty: 95% intervals over samples (bootstrap) and over seeds (Student t) -----------------------------
METRICS = ("mDice", "mIoU", "failure_rate")


def per_sample(records: Iterable[dict]) -> Dict[str, np.ndarray]:
    """The per-sample values whose means are the summary metrics: dice, iou and the 0/1 failure flag."""
    records = list(records)
    return {"mDice": np.array([r["dice"] for r in records], np.float64),
            "mIoU": np.array([r["iou"] for r in records], np.float64),
            "failure_rate": np.array([float(r["dice"] == 0.0 or not r["format_ok"]) for r in records], np.float64)}


def _resample_means(columns: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """columns [n, k] -> [n_boot, k] means of n rows drawn with replacement (the same draws for every column)."""
    n = columns.shape[0]
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    return columns[idx].mean(axis=1)


def bootstrap_ci(values, confidence: float = 0.95, n_boot: int = 4000, seed: int = 0) -> Tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (resampling samples with replacement).
    One value: (v, v); none: (nan, nan)."""
    values = np.asarray(values, np.float64).reshape(-1)
    if values.size == 0:
        return float("nan"), float("nan")
    if values.size == 1:
        return float(values[0]), float(values[0])
    means = _resample_means(values[:, None], n_boot, seed)[:, 0]
    lo, hi = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(lo), float(hi)


def paired_delta_ci(before, after, confidence: float = 0.95, n_boot: int = 4000,
                    seed: int = 0) -> Tuple[float, float, float]:
    """Mean of after - before over the same samples, with the percentile bootstrap interval of that mean
    (samples resampled as pairs, so what both runs share, the sample's difficulty, cancels)."""
    before, after = np.asarray(before, np.float64), np.asarray(after, np.float64)
    if before.shape != after.shape:
        raise ValueError(f"paired_delta_ci: {before.shape[0]} values before and {after.shape[0]} after; the "
                         f"same samples are needed on both sides")
    diff = after - before
    lo, hi = bootstrap_ci(diff, confidence, n_boot, seed)
    return (float(diff.mean()) if diff.size else float("nan")), lo, hi


def t_interval(values, confidence: float = 0.95) -> Tuple[float, float, float]:
    """Mean and Student-t interval of the mean over independent runs (e.g. seeds): mean +- t_{n-1} s / sqrt(n).
    One value: its half-width is nan (no spread to estimate)."""
    from scipy.stats import t

    values = np.asarray(values, np.float64).reshape(-1)
    if values.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(values.mean())
    if values.size == 1:
        return mean, float("nan"), float("nan")
    half = float(t.ppf((1 + confidence) / 2, values.size - 1) * values.std(ddof=1) / np.sqrt(values.size))
    return mean, mean - half, mean + half


def summarize_ci(records: Iterable[dict], confidence: float = 0.95, n_boot: int = 4000,
                 seed: int = 0) -> Dict[str, float]:
    """summarize() plus `<metric>_lo` / `<metric>_hi`: percentile bootstrap intervals over samples (one set of
    resamples shared by the three metrics)."""
    records = list(records)
    out = summarize(records)
    if len(records) < 2:
        return out
    values = per_sample(records)
    means = _resample_means(np.stack([values[m] for m in METRICS], axis=1), n_boot, seed)
    bounds = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2], axis=0)
    for j, m in enumerate(METRICS):
        out[f"{m}_lo"], out[f"{m}_hi"] = float(bounds[0, j]), float(bounds[1, j])
    return out


def paired_deltas(before: Iterable[dict], after: Iterable[dict], confidence: float = 0.95, n_boot: int = 4000,
                  seed: int = 0) -> Dict[str, float]:
    """after - before on the samples both evaluated (matched by id): per metric the mean delta, its paired
    bootstrap interval and the std of the per-sample differences (`d_<metric>`, `d_<metric>_lo`, `d_<metric>_hi`,
    `sd_<metric>`), and `n` the samples paired."""
    first = {r["id"]: r for r in before}
    pairs = [(first[r["id"]], r) for r in after if r["id"] in first]
    out: Dict[str, float] = {"n": len(pairs)}
    if not pairs:
        return out
    a, b = per_sample(p[0] for p in pairs), per_sample(p[1] for p in pairs)
    for j, m in enumerate(METRICS):
        out[f"d_{m}"], out[f"d_{m}_lo"], out[f"d_{m}_hi"] = paired_delta_ci(a[m], b[m], confidence, n_boot, seed + j)
        out[f"sd_{m}"] = float(np.std(b[m] - a[m], ddof=1)) if len(pairs) > 1 else float("nan")
    return out


def _with_ci(m: Dict[str, float], key: str) -> str:
    if f"{key}_lo" in m:
        return f"{m[key]:.4f} [{m[key + '_lo']:.3f}, {m[key + '_hi']:.3f}]"
    return f"{m[key]:.4f}"


def markdown_table_ci(rows: Dict[str, Dict[str, float]], title: str = "split") -> str:
    """Like markdown_table, each metric followed by its 95% interval in brackets where one was computed."""
    lines = [f"| {title} | n | mDice [95% CI] | mIoU [95% CI] | failure rate [95% CI] |", "|---|---|---|---|---|"]
    for name, m in rows.items():
        lines.append(f"| {name} | {m['n']} | " + " | ".join(_with_ci(m, k) for k in METRICS) + " |")
    return "\n".join(lines)


def markdown_deltas(rows: Dict[str, Dict[str, float]], before: str, after: str) -> str:
    """Table of paired deltas (paired_deltas output per split)."""
    lines = [f"| split | n paired | Δ mDice [95% CI] | Δ mIoU [95% CI] | Δ failure rate [95% CI] |",
             "|---|---|---|---|---|"]
    for name, d in rows.items():
        if d.get("n"):
            cells = [f"{d['d_' + k]:+.4f} [{d['d_' + k + '_lo']:+.3f}, {d['d_' + k + '_hi']:+.3f}]" for k in METRICS]
            lines.append(f"| {name} | {d['n']} | " + " | ".join(cells) + " |")
    return f"{after} − {before} on the same samples (paired bootstrap):\n\n" + "\n".join(lines)
