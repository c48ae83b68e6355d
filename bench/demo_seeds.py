"""`coreseg demo` over seeds: the SFT start (step 0) against the GRPO end on val / test_id / test_ood, per seed.

    .venv/bin/python bench/demo_seeds.py --seeds 0 1 2 --record
    .venv/bin/python bench/demo_seeds.py run.sft_steps=100 --seeds 0      # config overrides go before --seeds

Each seed runs the demo exactly as `make demo` does (the preset's settings) with run.seed (the tiny policy's
random init), learner.seed, rollout.seed and data.shuffle_seed set to the seed, in runs/demo-seed<s>. A seed whose
folder holds eval/final.json is not rerun. Reported per seed and split: mDice at step 0 and at the end with their
95% bootstrap intervals, the paired delta with its interval, the std of the per-sample differences and the
paired samples a ±0.02 interval needs at that std, the failure rate at both ends; per seed the mean
total and box reward over the first and last third of the GRPO steps, and the demo's wall time.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from coreseg.common.metrics import paired_deltas  # noqa: E402
from coreseg.deploy.metrics_log import read_metrics  # noqa: E402


def run_seed(folder: Path, seed: int, preset: str, overrides: list) -> float:
    folder.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    log = folder.parent / f"{folder.name}.log"
    args = [sys.executable, "-m", "coreseg.deploy.cli", "demo", "--config", preset, "--run-dir", str(folder), *overrides,
            f"run.seed={seed}", f"learner.seed={seed}", f"rollout.seed={seed}", f"data.shuffle_seed={seed}"]
    start = time.time()
    with log.open("w") as f:
        code = subprocess.call(args, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if code:
        raise SystemExit(f"demo_seeds: seed {seed} failed (exit {code}); see {log}")
    return time.time() - start


def seed_summary(folder: Path) -> dict:
    """The start -> end numbers of one finished demo run."""
    start = json.loads((folder / "eval" / "step0.json").read_text())
    end = json.loads((folder / "eval" / "final.json").read_text())
    grpo = [r for r in read_metrics(folder) if r["phase"] == "grpo" and "reward/total" in r]
    k = max(1, len(grpo) // 3)
    mean = lambda rs, key: sum(r.get(key, 0.0) for r in rs) / len(rs)  # noqa: E731
    out = {"steps": len(grpo), "k": k,
           "reward": (mean(grpo[:k], "reward/total"), mean(grpo[-k:], "reward/total")),
           "box": (mean(grpo[:k], "reward/box"), mean(grpo[-k:], "reward/box")), "splits": {}}
    for split in end:
        if split in start:
            out["splits"][split] = {"start": start[split]["overall"], "end": end[split]["overall"],
                                    "delta": paired_deltas(start[split]["records"], end[split]["records"])}
    log = folder.parent / f"{folder.name}.log"
    found = re.findall(r"demo finished in (\d+)s", log.read_text()) if log.exists() else []
    out["wall_s"] = float(found[-1]) if found else float("nan")
    return out


def _ci(m: dict, key: str) -> str:
    return f"{m[key]:.3f} [{m[key + '_lo']:.3f}, {m[key + '_hi']:.3f}]" if key + "_lo" in m else f"{m[key]:.3f}"


def needed_for(sd: float, half_width: float = 0.02) -> str:
    """Paired samples for a 95% interval of ±half_width on the mean delta: (1.96 sd / half_width)^2 (normal
    approximation); a delta of that size is then resolved (its interval excludes 0)."""
    return "–" if not np.isfinite(sd) else str(int(np.ceil((1.959964 * sd / half_width) ** 2)))


def summary_table(summaries: dict) -> str:
    lines = ["| seed | split | n | mDice step 0 | mDice end | Δ mDice [95% CI] | sd of per-sample Δ | n for ±0.02 "
             "| failure step 0 → end |", "|---|---|---|---|---|---|---|---|---|"]
    for seed, s in summaries.items():
        for split, v in s["splits"].items():
            d = v["delta"]
            delta = f"{d['d_mDice']:+.3f} [{d['d_mDice_lo']:+.3f}, {d['d_mDice_hi']:+.3f}]" if d.get("n") else "–"
            sd = d.get("sd_mDice", float("nan"))
            lines.append(f"| {seed} | {split} | {v['end']['n']} | {_ci(v['start'], 'mDice')} | {_ci(v['end'], 'mDice')}"
                         f" | {delta} | {sd:.3f} | {needed_for(sd)} | {v['start']['failure_rate']:.3f} → "
                         f"{v['end']['failure_rate']:.3f} |")
    lines += ["", "| seed | GRPO steps | total reward first → last third | box reward first → last third | wall s |",
              "|---|---|---|---|---|"]
    for seed, s in summaries.items():
        lines.append(f"| {seed} | {s['steps']} | {s['reward'][0]:.3f} → {s['reward'][1]:.3f} | {s['box'][0]:.3f} → "
                     f"{s['box'][1]:.3f} | {s['wall_s']:.0f} |")
    ups = {split: sum(1 for s in summaries.values() if s["splits"].get(split, {}).get("delta", {}).get("d_mDice", 0) > 0)
           for split in ("val", "test_id", "test_ood")}
    resolved = {split: sum(1 for s in summaries.values()
                           if s["splits"].get(split, {}).get("delta", {}).get("d_mDice_lo", 0) > 0)
                for split in ("val", "test_id", "test_ood")}
    lines += ["", "GRPO raised mDice (point estimate) in " + ", ".join(
        f"{split} {n}/{len(summaries)}" for split, n in ups.items()) + " seeds; with the paired 95% interval above 0 "
        "in " + ", ".join(f"{split} {n}/{len(summaries)}" for split, n in resolved.items()) + "."]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--preset", default="demo")
    p.add_argument("--out", default=str(ROOT / "runs"))
    p.add_argument("--record", action="store_true")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    out = Path(args.out).resolve()
    for seed in args.seeds:
        folder = out / f"demo-seed{seed}"
        if (folder / "eval" / "final.json").exists():
            print(f"[demo_seeds] seed {seed}: finished before, kept ({folder})")
            continue
        print(f"[demo_seeds] seed {seed}: {run_seed(folder, seed, args.preset, args.overrides):.0f} s")
    summaries = {seed: seed_summary(out / f"demo-seed{seed}") for seed in args.seeds}
    table = summary_table(summaries)
    print(table)
    if args.record:
        from bench.recording import record

        record("make demo over seeds: SFT start vs GRPO end (bench/demo_seeds.py)",
               f"2-core CPU, shared with other jobs (wall times inflated by them). Preset `{args.preset}`"
               f"{', overrides `' + ' '.join(args.overrides) + '`' if args.overrides else ''}. Intervals: 95% "
               f"percentile bootstrap over samples; Δ is paired (same samples at step 0 and at the end).\n\n" + table)


if __name__ == "__main__":
    main()
