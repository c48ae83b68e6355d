"""`coreseg plan` of a preset, recorded: the memory estimate per role and GPU, with its formulas.

    .venv/bin/python bench/plan_preset.py --config qwen25vl_3b learner.gradient_checkpointing=true --record

Arithmetic only (deploy/plan.py); nothing is loaded or measured.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.recording import record  # noqa: E402


def main(argv=None) -> str:
    from coreseg.common.config import load_config
    from coreseg.deploy.plan import format_plan, make_plan

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="qwen25vl_3b")
    ap.add_argument("--gpu-mem-gib", type=float, default=80.0)
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--record", action="store_true", help="append the plan to bench/RESULTS.md")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    plan = make_plan(load_config(args.config, args.overrides), gpu_mem_gib=args.gpu_mem_gib, image_size=args.image_size)
    text = format_plan(plan).replace(str(ROOT) + "/", "")
    print(text)
    if args.record:
        record(f"coreseg plan: {args.config} {' '.join(args.overrides)} on {args.gpu_mem_gib:g} GiB GPUs, "
               f"{args.image_size}² images (an estimate, not a measurement)",
               "Arithmetic from the config and the model's shape (deploy/plan.py); tensors only.\n\n```\n" + text + "\n```")
    return text


if __name__ == "__main__":
    main()
