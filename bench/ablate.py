"""The paper's reward ablation as a multi-seed table: SFT only; GRPO with the format reward only; + box; + mask
with the coarse-to-fine switch; the mask as plain Dice (no coarse stage); + DiceCE; density-aware on.

    .venv/bin/python bench/ablate.py --seeds 0 1 2 --record [--steps 20 --sft-steps 400 --eval-samples 0]
    .venv/bin/python bench/ablate.py rollout.group_size=4 --seeds 0 1 2   # config overrides go before --seeds

Every run goes through the real CLI. Per seed, one SFT run (`coreseg sft`) is shared by all rows: the SFT-only row
is `coreseg eval` of it, every GRPO row is `coreseg train --init <that SFT checkpoint> --no-sft --eval`. Seed s
sets run.seed (the tiny policy's random init), learner.seed, rollout.seed and data.shuffle_seed. Resumable: a run
whose folder holds eval/final.json (an SFT run: checkpoints/latest) is not redone; an unfinished folder is
cleared and run again. The table: per row, mean ± half-width of the 95% Student-t interval over seeds of
test_id and test_ood mDice, mIoU and failure rate (each run's eval/final.json).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from coreseg.common.metrics import METRICS, t_interval  # noqa: E402

SFT_ONLY = "SFT only"
# row name -> overrides of the GRPO run (None: the SFT checkpoint evaluated as it is). Without DiceCE means
# learner.mask_loss_weight=0 (the adapter and mask decoder get no supervised mask loss during GRPO);
# "plain Dice": reward.dice_threshold=0, so the mask reward is 1 + 2·Dice everywhere (no GIoU coarse stage).
ROWS: Dict[str, Optional[List[str]]] = {
    SFT_ONLY: None,
    "GRPO format": ["reward.terms=[format]", "learner.mask_loss_weight=0"],
    "+ box": ["reward.terms=[format,box]", "learner.mask_loss_weight=0"],
    "+ mask (coarse-to-fine)": ["reward.terms=[format,box,mask]", "learner.mask_loss_weight=0"],
    "mask as plain Dice": ["reward.terms=[format,box,mask]", "reward.dice_threshold=0",
                           "learner.mask_loss_weight=0"],
    "+ DiceCE": ["reward.terms=[format,box,mask]", "learner.mask_loss_weight=1"],
    "+ density-aware": ["reward.terms=[format,box,mask]", "learner.mask_loss_weight=1", "reward.density_aware=true"],
}
SPLITS = ("test_id", "test_ood")


def slug(row: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in row.lower()).strip("_").replace("__", "_")


def seed_overrides(seed: int) -> List[str]:
    return [f"run.seed={seed}", f"learner.seed={seed}", f"rollout.seed={seed}", f"data.shuffle_seed={seed}"]


def run_finished(folder: Path, sft: bool = False) -> bool:
    return (folder / "checkpoints" / "latest").exists() if sft else (folder / "eval" / "final.json").exists()


def read_final(folder: Path) -> Dict[str, Dict[str, float]]:
    """split -> overall metrics of a finished run."""
    data = json.loads((folder / "eval" / "final.json").read_text())
    return {split: res["overall"] for split, res in data.items()}


def collect(out: Path, rows, seeds) -> Dict[str, Dict[int, Dict[str, Dict[str, float]]]]:
    """row -> seed -> split -> metrics, for the finished runs under `out`."""
    found: Dict[str, Dict[int, dict]] = {}
    for row in rows:
        for seed in seeds:
            folder = out / slug(row) / f"seed{seed}"
            if run_finished(folder):
                found.setdefault(row, {})[seed] = read_final(folder)
    return found


def _cell(values: List[float]) -> str:
    if not values:
        return "–"
    mean, lo, hi = t_interval(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ± {hi - mean:.3f}"


def ablation_table(results: Dict[str, Dict[int, Dict[str, Dict[str, float]]]], splits=SPLITS) -> str:
    """Markdown: per row the seeds that finished and, per split and metric, mean ± 95% t half-width over seeds."""
    names = {"mDice": "mDice", "mIoU": "mIoU", "failure_rate": "fail"}
    head = ["row", "seeds"] + [f"{s} {names[m]}" for s in splits for m in METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, per_seed in results.items():
        seeds = sorted(per_seed)
        cells = [_cell([per_seed[s][split][m] for s in seeds if split in per_seed[s]]) for split in splits
                 for m in METRICS]
        lines.append(f"| {row} | {','.join(map(str, seeds))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def coreseg(args: List[str], log: Path) -> float:
    """One CLI call (no shell), its output to `log`; returns its wall time; a failure stops the ablation."""
    start = time.time()
    with log.open("w") as f:
        code = subprocess.call([sys.executable, "-m", "coreseg.deploy.cli", *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if code:
        raise SystemExit(f"ablate: `coreseg {' '.join(args[:3])} ...` failed (exit {code}); see {log}")
    return time.time() - start


def run_all(out: Path, rows, seeds, preset: str, common: List[str]) -> Dict[str, float]:
    """Runs what is not finished yet; returns wall seconds per run done now."""
    times: Dict[str, float] = {}
    for seed in seeds:
        sft = out / "sft" / f"seed{seed}"
        base = ["--config", preset, *common, *seed_overrides(seed)]
        if not run_finished(sft, sft=True):
            shutil.rmtree(sft, ignore_errors=True)
            sft.mkdir(parents=True)
            times[f"sft seed{seed}"] = coreseg(["sft", "--run-dir", str(sft), *base], out / f"sft_seed{seed}.log")
        checkpoint = sft / "checkpoints" / (sft / "checkpoints" / "latest").read_text().strip()
        for row in rows:
            folder = out / slug(row) / f"seed{seed}"
            if run_finished(folder):
                print(f"[ablate] {row} seed {seed}: done before, kept")
                continue
            shutil.rmtree(folder, ignore_errors=True)
            log = out / f"{slug(row)}_seed{seed}.log"
            print(f"[ablate] {row} seed {seed} -> {folder}")
            if ROWS[row] is None:  # the SFT checkpoint as it is: its eval goes into a folder of its own
                shutil.copytree(sft, folder, ignore=shutil.ignore_patterns("eval", "tb"))
                args = ["eval", "--run-dir", str(folder), *common, "--splits", *SPLITS]
            else:
                args = ["train", "--run-dir", str(folder), "--init", str(checkpoint), "--no-sft", "--eval",
                        "--no-start-eval", *base, *ROWS[row], f"data.eval_splits=[{','.join(SPLITS)}]"]
            times[f"{row} seed{seed}"] = coreseg(args, log)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny_cpu")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rows", nargs="*", help=f"a subset of: {', '.join(ROWS)}")
    p.add_argument("--steps", type=int, help="GRPO steps per run (default: the preset's run.steps)")
    p.add_argument("--sft-steps", type=int, help="SFT steps (default: the preset's run.sft_steps)")
    p.add_argument("--eval-samples", type=int, help="per split (default: the preset's run.eval_samples; 0 = all)")
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "ablate"))
    p.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    p.add_argument("overrides", nargs="*", help="dotted config overrides for every run")
    args = p.parse_args()
    rows = args.rows or list(ROWS)
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"ablate: unknown rows {unknown}; known: {list(ROWS)}")
    common = list(args.overrides) + ["run.eval_every=0", "run.save_every=0"]
    common += [f"run.steps={args.steps}"] if args.steps is not None else []
    common += [f"run.sft_steps={args.sft_steps}"] if args.sft_steps is not None else []
    common += [f"run.eval_samples={args.eval_samples}"] if args.eval_samples is not None else []
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    times = run_all(out, rows, args.seeds, args.preset, common)
    table = ablation_table(collect(out, rows, args.seeds))
    print(table)
    if args.record:
        from bench.recording import record

        body = ("2-core CPU, shared with other jobs (wall times inflated by them). "
                f"Preset `{args.preset}`, overrides `{' '.join(common)}`, seeds {args.seeds}. Each cell: mean ± "
                f"half-width of the 95% Student-t interval over the seeds (eval/final.json of each run). Runs done "
                f"now: {len(times)} in {time.time() - start:.0f} s ("
                + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + "); finished runs found from before "
                f"were kept.\n\n" + table)
        record("Reward ablation (bench/ablate.py)", body)


if __name__ == "__main__":
    main()
