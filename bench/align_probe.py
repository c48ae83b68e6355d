"""Does the stand-in alignment stage (common/models/align.py) teach the tiny policy to place boxes from the image?

    .venv/bin/python bench/align_probe.py --record                       # the tiny-aligned preset's own spec
    .venv/bin/python bench/align_probe.py --steps 1000 --samples 800     # another spec (not the preset's)

Builds `tiny-aligned` (seed 0, or `--seed`) into a scratch folder with the given spec, timed, then answers held-out samples of
the demo's data set (data seed 0, val + test_id) greedily with transformers and scores each answer's boxes with
the box reward (IoU >= 0.5 matching). Reported: the alignment's loss (first/last tenth of steps, train; and on
the held-out samples before/after), the mean box reward, the share of answers with any box reward, the
parse-failure rate, and how many distinct box lists the answers hold (one list for every image = the boxes do not
depend on the image). Then bench/align_diagnostics.py's teacher-forced diagnostics of the plain and the aligned
folder on 400 in-distribution samples of that data set: where the path from the image to the boxes breaks.

Variants of the preset's spec (AlignSpec, common/models/policy.py): `--rope-theta`, `--mrope T,H,W` (the language
model's M-RoPE sections), `--vision-pretrain STEPS` (the vision tower's own pre-training before the stage; with
STEPS > 0 the tower then stays frozen through the stage, with 0 the stage trains it), and `--layers` (the plain
build's language-model depth; the tiny preset has 2), `--no-vision-position` (the vision pre-training without
the tokens' own row and column as a target) and `--seed`. Recipe a2 (2026-12-06 23:10 UTC to 2026-12-07 01:40 UTC):
`--no-vision-position`; a1 before it: `--rope-theta 1e6 --mrope 4,6,6 --vision-pretrain 0 --steps 3000`.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def heldout_box_scores(policy_dir: Path, samples) -> dict:
    from PIL import Image

    from coreseg.common.models.policy import load_policy, policy_info
    from coreseg.common.prompts import SYSTEM_PROMPT, parse_completion
    from coreseg.reward.rewards import box_reward

    model, processor = load_policy(policy_dir)
    model.eval()
    info = policy_info(policy_dir)
    rewards, failures, lists = [], 0, set()
    for s in samples:
        enc = info.family.encode_prompt(processor, s.question, Image.fromarray(s.image), SYSTEM_PROMPT)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=128, do_sample=False, suppress_tokens=list(info.vision_token_ids))
        parsed = parse_completion(processor.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=False))
        if parsed.boxes is None:
            failures += 1
            rewards.append(0.0)
            continue
        lists.add(str(parsed.boxes))
        h, w = s.image.shape[:2]
        rewards.append(box_reward(parsed.boxes, s.boxes, 0.5, (w, h))[0])
    r = np.asarray(rewards)
    return {"n": len(samples), "box_mean": float(r.mean()), "box_any": float((r > 0).mean()),
            "fail": failures / len(samples), "distinct": len(lists)}


def main() -> None:
    from coreseg.common.models.align import collate, encode_rows, token_loss
    from coreseg.common.models.policy import ALIGNED_PRESETS, build_aligned_policy, ensure_policy_dir, load_policy, policy_info
    from coreseg.common.synth import generate

    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int)
    p.add_argument("--samples", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--heldout", type=int, default=48)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--rope-theta", type=float, help="the language model's rope_theta (AlignSpec.rope_theta)")
    p.add_argument("--mrope", help="the language model's M-RoPE sections T,H,W, sum head_dim / 2 (AlignSpec.mrope_section)")
    p.add_argument("--layers", type=int, help="a diagnostic: language-model layers (the tiny preset has 2)")
    p.add_argument("--vision-pretrain", type=int, metavar="STEPS",
                   help="the vision tower's own pre-training steps (AlignSpec.vision_steps; > 0 also freezes it in the stage)")
    p.add_argument("--no-vision-position", action="store_true",
                   help="the vision pre-training does not teach each token its own row and column "
                        "(AlignSpec.vision_position, on in the preset)")
    p.add_argument("--seed", type=int, default=0, help="the build's seed (the preset's folder for seed N)")
    p.add_argument("--record", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = ALIGNED_PRESETS["tiny-aligned"][1]
    spec = replace(spec, **{k: v for k, v in (("steps", args.steps), ("samples", args.samples), ("lr", args.lr)) if v})
    if args.rope_theta:
        spec = replace(spec, rope_theta=args.rope_theta)
    if args.mrope:
        spec = replace(spec, mrope_section=tuple(int(x) for x in args.mrope.split(",")))
    if args.vision_pretrain is not None:
        spec = replace(spec, vision_steps=args.vision_pretrain, train_vision=not args.vision_pretrain)
    if args.no_vision_position:
        spec = replace(spec, vision_position=False)
    data = generate(700, seed=0, progress=False)
    held = [s for s in data if s.split in ("val", "test_id")][:args.heldout]
    diagnosed = [s for s in data if s.split != "test_ood"][:400]
    scratch = Path(tempfile.mkdtemp(prefix="align-probe-"))
    try:
        if args.layers:
            from coreseg.common.models.policy import PRESETS, build_tiny_policy

            PRESETS["probe"] = dict(PRESETS["tiny"], layers=args.layers)
            plain = build_tiny_policy(scratch / "plain-layers", "probe", args.seed)
        else:
            plain = ensure_policy_dir("tiny", scratch / "assets", args.seed)

        def heldout_loss(folder):
            model, processor = load_policy(folder)
            family = policy_info(folder).family
            inputs, target = collate(encode_rows(processor, family, held), family, processor.tokenizer.pad_token_id)
            with torch.no_grad():
                return float(token_loss(model.eval()(**inputs).logits, inputs["input_ids"], target))

        before = heldout_loss(plain)
        start = time.time()
        aligned = build_aligned_policy(scratch / "aligned", "tiny-aligned", plain, args.seed, spec,
                                       log=lambda m: print(m, flush=True))
        build_s = time.time() - start
        import json

        stats = json.loads((aligned / "coreseg.json").read_text())["align"]
        after = heldout_loss(aligned)
        scores = heldout_box_scores(aligned, held)
        from bench.align_diagnostics import diagnose, diagnostics_table

        diagnostics = diagnostics_table({"before the stage": diagnose(plain, diagnosed),
                                         "after the stage": diagnose(aligned, diagnosed)})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    load = open("/proc/loadavg").read().split()[:3]
    variant = (f"rope_theta {spec.rope_theta or 1e6:g}, M-RoPE sections "
               f"{'/'.join(map(str, spec.mrope_section or (4, 6, 6)))}, "
               + (f"vision tower pre-trained {spec.vision_steps} steps then frozen in the stage"
                  + (" (with its own row and column as a target)" if spec.vision_position else "")
                  if spec.vision_steps else "vision tower trained in the stage")
               + f", {args.layers or 2} LM layers")
    table = ("| spec | build s | train loss first → last tenth | held-out loss before → after | n | box reward mean "
             "| answers with box reward > 0 | parse failures | distinct box lists |\n|---|---|---|---|---|---|---|---|---|\n"
             f"| {spec.samples} images, {spec.steps} steps × {spec.batch_size}, lr {spec.lr:g} | {build_s:.0f} | "
             f"{stats['first_loss']:.3f} → {stats['last_loss']:.3f} | {before:.3f} → {after:.3f} | {scores['n']} | "
             f"{scores['box_mean']:.3f} | {scores['box_any']:.2f} | {scores['fail']:.2f} | {scores['distinct']} |")
    table = f"Variant: {variant}.\n\n{table}\n\nDiagnostics (bench/align_diagnostics.py):\n\n{diagnostics}"
    print(table)
    if args.record:
        from bench.recording import record

        record("Stand-in alignment of the tiny policy: boxes from the image? (bench/align_probe.py)",
               f"tiny-aligned seed {args.seed} built with the spec below (torch threads: {args.threads or 'default'}; load "
               f"average at the end {' / '.join(load)} on 2 cores), then greedy answers "
               f"(transformers, no LoRA, no SFT) on the first {scores['n']} val + test_id samples of the demo's "
               "data set, boxes scored by the box reward (IoU >= 0.5 matching).\n\n" + table)


if __name__ == "__main__":
    main()
