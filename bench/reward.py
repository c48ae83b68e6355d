"""Reward throughput: masks/s through RewardPool for a batch of I images x G rollouts.

    .venv/bin/python bench/reward.py --sam tiny --workers 1 2 4 --record
    .venv/bin/python bench/reward.py --sam vit_b --workers 1 --modes warm cold --images 2 --repeats 1 --record

Modes (the same pool, only the sample ids differ):
  nocache  every rollout has its own id, so every rollout pays an image-encoder pass (no cache)
  cold     one id per image, new each repeat: one encoder pass per image, shared by its G rollouts
  warm     the same ids as a previous batch (a later epoch): no encoder pass
masks/s = scored completions / wall seconds of one `RewardPool.score` (parse + SAM + rewards), median of
--repeats. SAMs are random-init (`save_random_sam`, written once under --work-dir). With a GPU, each worker gets 1/N of it.
`--record` appends the table to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.recording import record  # noqa: E402


def make_items(samples, group: int, hidden: int, mode: str, repeat: int, seed: int = 0):
    from coreseg.common.prompts import build_completion
    from coreseg.common.protocol import ScoreItem

    rng = np.random.default_rng(seed)
    items = []
    for s in samples:
        for g in range(group):
            sid = {"nocache": f"r{repeat}-{s.id}-{g}", "cold": f"r{repeat}-{s.id}", "warm": s.id}[mode]
            text = build_completion(s.reasoning, s.category, s.boxes)
            items.append(ScoreItem(sid, text, rng.normal(size=hidden).astype(np.float32), s.image, s.masks, s.boxes))
    return items


def bench_pool(sam: str, workers: int, modes, samples, args) -> list:
    import torch

    from coreseg.common.config import load_config
    from coreseg.reward.worker import RewardPool

    checkpoint = ""
    if sam != "tiny":  # a random-init checkpoint, loaded like a real one
        from coreseg.common.models.sam import save_random_sam

        checkpoint = Path(args.work_dir) / f"sam-{sam}-random.safetensors"
        checkpoint = checkpoint if checkpoint.exists() else save_random_sam(sam, checkpoint)
    cfg = load_config("tiny_cpu", [f"model.sam_type={sam}", f"model.sam_checkpoint={checkpoint}",
                                   f"reward.cache_bytes={args.cache_mb << 20}"])
    cpus = max(1, (os.cpu_count() or 1) // workers)
    gpus = 1.0 / workers if torch.cuda.is_available() else 0.0
    pool = RewardPool(cfg, args.hidden, num_workers=workers, num_cpus_per_worker=cpus, num_gpus_per_worker=gpus)
    rows = []
    try:
        pool.score(make_items(samples[:1], 1, args.hidden, "cold", -1))  # warm-up: build, first kernels
        if "warm" in modes:
            pool.score(make_items(samples, args.group, args.hidden, "warm", 0))  # fill the caches
        for mode in modes:
            times, calls = [], []
            for r in range(args.repeats):
                items = make_items(samples, args.group, args.hidden, mode, r)
                before = pool.stats()["encoder_calls"]
                t0 = time.perf_counter()
                scores = pool.score(items)
                times.append(time.perf_counter() - t0)
                calls.append(pool.stats()["encoder_calls"] - before)
                assert len(scores) == len(items)
            sec = statistics.median(times)
            rows.append(dict(sam=sam, workers=workers, mode=mode, masks=len(items), seconds=sec,
                             masks_per_s=len(items) / sec, encoder_calls=statistics.median(calls),
                             cpus_per_worker=cpus, gpus_per_worker=gpus))
            print(f"  {sam:6s} workers={workers} {mode:8s} {len(items) / sec:9.1f} masks/s "
                  f"({sec:.3f} s, encoder calls {calls})", flush=True)
    finally:
        pool.shutdown()
    return rows


def table(rows, args) -> str:
    lines = ["| SAM | workers | mode | masks/s | s/batch | encoder calls/batch | speed-up vs nocache |",
             "|---|---|---|---|---|---|---|"]
    scaling = []
    for r in rows:
        base = [x for x in rows if (x["sam"], x["workers"], x["mode"]) == (r["sam"], r["workers"], "nocache")]
        ratio = f"{r['masks_per_s'] / base[0]['masks_per_s']:.2f}x" if base else "-"
        lines.append(f"| {r['sam']} | {r['workers']} | {r['mode']} | {r['masks_per_s']:.1f} | {r['seconds']:.3f} | "
                     f"{r['encoder_calls']:.0f} | {ratio} |")
    for sam in dict.fromkeys(r["sam"] for r in rows):
        for mode in dict.fromkeys(r["mode"] for r in rows):
            one = [r for r in rows if (r["sam"], r["mode"], r["workers"]) == (sam, mode, 1)]
            for r in rows:
                if one and (r["sam"], r["mode"]) == (sam, mode) and r["workers"] > 1:
                    eff = r["masks_per_s"] / (one[0]["masks_per_s"] * r["workers"])
                    scaling.append(f"- scaling {sam}/{mode}: {r['workers']} workers = {eff:.2f} x linear")
    return "\n".join(lines + ([""] + scaling if scaling else []))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sam", nargs="+", default=["tiny"], choices=["tiny", "vit_b", "vit_l", "vit_h", "medsam"])
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--modes", nargs="+", default=["nocache", "cold", "warm"], choices=["nocache", "cold", "warm"])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=2048, help="LLM hidden size (Qwen2.5-VL-3B: 2048)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache-mb", type=int, default=1024)
    parser.add_argument("--work-dir", default=".cache/coreseg/bench", help="where random SAM checkpoints are written")
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()

    import ray

    from coreseg.common.synth import generate

    samples = generate(args.images, image_size=args.image_size, seed=0, progress=False)
    # more workers than cores still get one logical CPU each (oversubscribed; the table says so)
    ray.init(num_cpus=max(os.cpu_count() or 1, max(args.workers)), include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        for sam in args.sam:
            for workers in args.workers:
                rows.extend(bench_pool(sam, workers, args.modes, samples, args))
    finally:
        ray.shutdown()
    text = table(rows, args)
    print(text)
    if args.record:
        record("Reward throughput", f"Batch: {args.images} images x G={args.group} ({args.image_size}px), LLM hidden "
               f"{args.hidden}, median of {args.repeats} repeat(s).\n\n{text}")


if __name__ == "__main__":
    main()
