"""Learner step, padded rows vs packed shared-prefix batches (learner.packed), side by side in one process.

    python bench/learner_prefix.py                       # prompts of ~256 / ~1k / ~1.4k vision tokens, G=8, 150 tokens
    python bench/learner_prefix.py --record              # append the tables to bench/RESULTS.md

A tiny-width random-init Qwen2.5-VL (bench/learner_step.py's TINY shape: hidden 128, 2 layers) with large images,
so the prompt is long (an image of S px is (S/28)^2 vision tokens) and the completions short, as in a real run.
One step = `LearnerCore.forward` (`<seg>` states + log-probs, reference pass at kl_beta > 0) + `LearnerCore.update`
(GRPO + KL + DiceCE, one AdamW step), exactly what the driver calls; the same LearnerCore runs both paths
(`module.packed` switched), alternating per step, and each figure is the median over the measured steps.
One micro-batch per group (micro_batch_size = G), so each path runs what its design runs for a group.

Token work per step and pass: the physical bound is P + G*C per group (each prompt token and each completion token
once); the padded path runs G*(P + C) (plus padding to the longest row, none here: equal completions), the packed
path P + G*C. The tables give both as a ratio to the bound, next to the measured times.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.learner_step import TINY, build_policy_folder, make_batch  # noqa: E402
from bench.recording import record  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_core(policy_dir: Path, image_size: int, group: int, tokens: int, port: int):
    from coreseg.common.config import load_config
    from coreseg.learner.worker import LearnerCore

    pixels = image_size * image_size
    cfg = load_config("tiny_cpu", [
        "model.lora_r=16", "model.lora_alpha=32", "model.lora_dropout=0.0", "model.sam_type=tiny",
        f"model.min_pixels={pixels}", f"model.max_pixels={pixels}", f"learner.micro_batch_size={group}",
        f"rollout.max_new_tokens={tokens}", "learner.kl_beta=0.01", "learner.reference=base",
        "learner.mask_loss_weight=1.0", "cluster.learner_gpus=0"])
    return LearnerCore(cfg, str(policy_dir), master_port=port)


def tokens_run(core, samples, groups, packed: bool) -> int:
    """Tokens one pass runs through the language model over the batch (padded rows: rows x longest row)."""
    from coreseg.learner.balance import flatten_rows

    rows, comps = flatten_rows(groups, samples)
    core.module.packed = packed
    try:
        layout = core._grpo_layout(rows, comps)
        return sum(core._batch([rows[i] for i in layout.rows[a:b]], [comps[i] for i in layout.rows[a:b]])
                   .input_ids.numel() for a, b in layout.micro)
    finally:
        core.module.packed = True


def time_steps(core, samples, groups, adv, steps: int, warmup: int) -> dict:
    """Median forward / update / step seconds of each path, the two alternating step by step."""
    import numpy as np

    from coreseg.learner.grpo import loss_norm

    norm = loss_norm([len(c.token_ids) for g in groups for c in g.completions], len(adv), "token_mean")
    times = {p: {"forward": [], "update": []} for p in (False, True)}
    for step in range(warmup + steps):
        for packed in (False, True):
            core.module.packed = packed
            for c in (c for g in groups for c in g.completions):
                c.version = core.version  # on-policy, as in a synchronous run
            t0 = time.perf_counter()
            fwd = core.forward(groups, samples)
            t1 = time.perf_counter()
            core.update(groups, samples, adv, fwd.ref_logprobs, norm)
            t2 = time.perf_counter()
            if step >= warmup:
                times[packed]["forward"].append(t1 - t0)
                times[packed]["update"].append(t2 - t1)
            print(f"  step {step} {'packed' if packed else 'padded'}: forward {t1 - t0:.2f}s update {t2 - t1:.2f}s",
                  flush=True)
    core.module.packed = True
    out = {}
    for packed, name in ((False, "padded"), (True, "packed")):
        f, u = float(np.median(times[packed]["forward"])), float(np.median(times[packed]["update"]))
        out[name] = {"forward_s": f, "update_s": u, "step_s": f + u}
    return out


def measure(policy_dir, image_size, group, tokens, prompts, steps, warmup, port) -> dict:
    core = make_core(policy_dir, image_size, group, tokens, port)
    samples, groups, adv = make_batch(core, prompts, group, tokens, image_size, seed=0)
    P = len(groups[0].completions[0].prompt_token_ids)
    bound = prompts * (P + group * tokens)
    run_padded, run_packed = tokens_run(core, samples, groups, False), tokens_run(core, samples, groups, True)
    print(f"image {image_size}px: prompt {P} tokens, G={group}, C={tokens}: bound {bound}, padded runs "
          f"{run_padded}, packed runs {run_packed}", flush=True)
    t = time_steps(core, samples, groups, adv, steps, warmup)
    return dict(image_size=image_size, prompt_tokens=P, group=group, completion_tokens=tokens, prompts=prompts,
                bound_tokens=bound, padded_tokens=run_padded, packed_tokens=run_packed, **t,
                speedup=t["padded"]["step_s"] / t["packed"]["step_s"])


def table(rows, first: str, key) -> str:
    lines = [f"| {first} | prompt tokens P | G | bound P+G*C per step | padded runs (x bound) | packed runs (x bound) | "
             "padded step s (fwd + update) | packed step s (fwd + update) | speed-up |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a, b = r["padded"], r["packed"]
        lines.append(
            f"| {key(r)} | {r['prompt_tokens']} | {r['group']} | {r['bound_tokens']} | {r['padded_tokens']} "
            f"({r['padded_tokens'] / r['bound_tokens']:.2f}x) | {r['packed_tokens']} "
            f"({r['packed_tokens'] / r['bound_tokens']:.2f}x) | {a['step_s']:.2f} ({a['forward_s']:.2f} + "
            f"{a['update_s']:.2f}) | {b['step_s']:.2f} ({b['forward_s']:.2f} + {b['update_s']:.2f}) | "
            f"{r['speedup']:.2f}x |")
    return "\n".join(lines)


def markdown(by_prompt, by_group, args) -> str:
    parts = [f"Tiny-width Qwen2.5-VL (hidden {TINY['hidden']}, {TINY['layers']} layers, random init), LoRA r=16 + "
             f"`<seg>` rows, tiny SAM; {args.prompts} prompts per step, {args.tokens} completion tokens each, "
             f"kl_beta 0.01 (reference pass on), one micro-batch per group; CPU float32, medians of {args.steps} "
             "steps after "
             f"{args.warmup} warm-up, the two paths alternating in one process. Token columns: tokens one pass "
             "runs through the language model per step, and their ratio to the bound P + G*C per group.", "",
             "Prompt length (image size), G = " + str(args.group) + ":", "",
             table(by_prompt, "image px", lambda r: r["image_size"])]
    if by_group:
        parts += ["", f"Growth with G at {by_group[0]['image_size']} px ({by_group[0]['prompt_tokens']} prompt tokens): "
                  "the padded path's cost grows with G*(P + C), the packed path's with P + G*C.", "",
                  table(by_group, "G", lambda r: r["group"])]
    return "\n".join(parts) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-sizes", type=int, nargs="+", default=[448, 896, 1036],
                   help="px; (S/28)^2 vision tokens: 256, 1024, 1369")
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--groups-sweep", type=int, nargs="*", default=[2, 4, 8, 16], help="G values at --sweep-size")
    p.add_argument("--sweep-size", type=int, default=896)
    p.add_argument("--tokens", type=int, default=150)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--port", type=int, default=29533)
    p.add_argument("--work-dir", default=str(ROOT / ".cache" / "bench"))
    p.add_argument("--json", default=None)
    p.add_argument("--record", action="store_true")
    args = p.parse_args(argv)
    policy_dir = build_policy_folder(TINY, Path(args.work_dir) / "policy-tiny-prefix", 448, "cpu")
    run = lambda size, g: measure(policy_dir, size, g, args.tokens, args.prompts, args.steps,  # noqa: E731
                                  args.warmup, args.port)
    by_prompt = [run(size, args.group) for size in args.image_sizes]
    by_group = [next((r for r in by_prompt if r["image_size"] == args.sweep_size and r["group"] == g), None)
                or run(args.sweep_size, g) for g in args.groups_sweep]
    result = {"by_prompt": by_prompt, "by_group": by_group}
    print(json.dumps(result, indent=1))
    text = markdown(by_prompt, by_group, args)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.record:
        record("Learner step: padded rows vs packed shared-prefix batches (tiny width, CPU)", text)
    return result


if __name__ == "__main__":
    main()
