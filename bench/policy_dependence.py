"""Does the mask follow what GRPO changed in the answers? Per ablation row and seed, against the SFT checkpoint
of the same seed (bench/ablate.py's folders), on the same eval samples:

    .venv/bin/python bench/policy_dependence.py --record        # after bench/ablate.py --seeds 0 1 2

- answers changed: the share of samples whose greedy answer text differs from the SFT checkpoint's;
- masks changed: the share whose Dice differs (the mask is drawn from the answer's `<seg>` state, so a mask that
  stays bit-identical while the answer changed did not use what changed);
- format failures at the SFT checkpoint and after GRPO, and the most frequent parser reason after GRPO
  (common/prompts.py; the failure rate counts these with the Dice-0 samples);
- where both runs also have an eval of answers sampled as in training (`coreseg eval --run-dir RUN
  run.eval_sampled=true`, eval/final_sampled.json): the format failures of those, SFT → GRPO.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ablate import ROWS, SFT_ONLY, SPLITS, slug  # noqa: E402
from coreseg.deploy.evaluation import SAMPLED  # noqa: E402


def compare_records(start: List[dict], end: List[dict]) -> Dict[str, object]:
    """Paired by sample id: answers changed, masks (Dice) changed, format failures before/after and the most
    frequent parser reason of the failures after."""
    from coreseg.common.prompts import parse_completion

    by_id = {r["id"]: r for r in start}
    missing = [r["id"] for r in end if r["id"] not in by_id]
    if missing:
        raise ValueError(f"{len(missing)} samples of the GRPO eval are not in the SFT eval (first: {missing[0]})")
    pairs = [(by_id[r["id"]], r) for r in end]
    reasons = Counter(parse_completion(b["text"]).reason for _, b in pairs if not b["format_ok"])
    n = len(pairs)
    return {"n": n,
            "answers_changed": sum(a["text"] != b["text"] for a, b in pairs) / n,
            "masks_changed": sum(a["dice"] != b["dice"] for a, b in pairs) / n,
            "format_fail_start": sum(not a["format_ok"] for a, _ in pairs) / n,
            "format_fail_end": sum(not b["format_ok"] for _, b in pairs) / n,
            "top_reason_end": (f"{reasons.most_common(1)[0][0]} ({reasons.most_common(1)[0][1]})" if reasons else "-")}


def dependence_table(out: Path, seeds: List[int]) -> str:
    lines = ["| row | seed | split | n | answers changed | masks changed | format failures SFT → GRPO "
             "| most frequent reason after GRPO | sampled answers: format failures SFT → GRPO |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in ROWS:
        if row == SFT_ONLY:
            continue
        for seed in seeds:
            start, end = (out / slug(r) / f"seed{seed}" / "eval" / "final.json" for r in (SFT_ONLY, row))
            if not (start.exists() and end.exists()):
                continue
            a, b = json.loads(start.read_text()), json.loads(end.read_text())
            sampled = [p.with_name(f"final{SAMPLED}.json") for p in (start, end)]
            sa, sb = (json.loads(p.read_text()) for p in sampled) if all(p.exists() for p in sampled) else ({}, {})
            for split in SPLITS:
                c = compare_records(a[split]["records"], b[split]["records"])
                s = (compare_records(sa[split]["records"], sb[split]["records"])
                     if split in sa and split in sb else None)
                lines.append(f"| {row} | {seed} | {split} | {c['n']} | {c['answers_changed']:.2f} | "
                             f"{c['masks_changed']:.2f} | {c['format_fail_start']:.2f} → {c['format_fail_end']:.2f} | "
                             f"{c['top_reason_end']} | "
                             + (f"{s['format_fail_start']:.2f} → {s['format_fail_end']:.2f} |" if s else "- |"))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "ablate"), help="bench/ablate.py's --out")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--record", action="store_true")
    args = p.parse_args()
    table = dependence_table(Path(args.out), args.seeds)
    if table.count("\n") < 2:
        raise SystemExit(f"policy_dependence: no finished ablation runs with an SFT-only run under {args.out}")
    print(table)
    if args.record:
        from bench.recording import record

        record("Does the mask follow the answer? Ablation runs against their SFT checkpoint (bench/policy_dependence.py)",
               "Paired over the same eval samples (each run's eval/final.json against the SFT-only run of its seed). "
               "Masks changed: the share of samples whose Dice differs at all.\n\n" + table)


if __name__ == "__main__":
    main()
