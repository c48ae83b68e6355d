"""Does the stand-in alignment stage (common/models/align.py) teach the tiny policy to place boxes from the image?

    .venv/bin/python bench/align_probe.py --record                       # the tiny-aligned preset's own spec
    .venv/bin/python bench/align_probe.py --steps 1000 --samples 800     # another spec (not the preset's)

Builds `tiny-aligned` (seed 0) into a scratch folder with the given spec, timed, then answers held-out samples of
the demo's data set (data seed 0, val + test_id) greedily with transformers and scores each answer's boxes with
the box reward (IoU >= 0.5 matching). Reported: the alignment's loss (first/last tenth of steps, train; and on
the held-out samples before/after), the mean box reward, the share of answers with any box reward, the
parse-failure rate, and how many distinct box lists the answers hold (one list for every image = the boxes do not
depend on the image). Then bench/align_diagnostics.py's teacher-forced diagnostics of the plain and the aligned
folder on 400 in-distribution samples of that data set: where the path from the image to the boxes breaks.

Variants (diagnostics; the preset keeps its config): `--rope-theta`, `--mrope T,H,W` (the language model's M-RoPE
sections), `--layers`, `--vision-pretrain STEPS` (before the stage, the vision tower is trained alone to predict the
lesion coverage of every 7 px cell of every vision token, a stand-in for a pre-trained vision encoder; its output is
then scaled to a mean norm of 1 and it stays frozen through the stage).
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


COVER_CELLS = 4  # --vision-pretrain targets: 4 x 4 cells of 7 px per 28 px vision token


def coverage_targets(sample) -> torch.Tensor:
    """[tokens, COVER_CELLS²]: the lesion fraction of each 7 px cell of each vision token (raster order)."""
    from bench.align_diagnostics import MERGED_PX

    union = np.zeros(sample.image.shape[:2], np.float32)
    for m in sample.masks:
        union = np.maximum(union, m.astype(np.float32))
    g, c = union.shape[0] // MERGED_PX, MERGED_PX // COVER_CELLS
    cells = union.reshape(g, MERGED_PX, g, MERGED_PX).transpose(0, 2, 1, 3).reshape(g, g, COVER_CELLS, c, COVER_CELLS, c)
    return torch.as_tensor(cells.mean(axis=(3, 5)).reshape(g * g, COVER_CELLS ** 2))


def pretrain_vision(plain: Path, out: Path, steps: int, samples: int, seed: int = 0) -> Path:
    """A copy of `plain` whose vision tower (with a linear head, then dropped) learnt the lesion coverage of the
    alignment stage's own images (binary cross-entropy, AdamW 1e-3, 16 images a step); its output is scaled to a
    mean norm of 1 (a language model's embeddings are of that order; unscaled it grows to ~30-100)."""
    from coreseg.common.models.align import alignment_samples, encode_rows
    from coreseg.common.models.policy import load_policy, policy_info

    shutil.copytree(plain, out)
    model, processor = load_policy(out)
    family = policy_info(out).family
    pool = alignment_samples(samples, seed)
    rows = encode_rows(processor, family, pool)
    targets = [coverage_targets(s) for s in pool]
    visual = model.model.visual
    head = torch.nn.Linear(model.config.get_text_config().hidden_size, COVER_CELLS ** 2)
    opt = torch.optim.AdamW(list(visual.parameters()) + list(head.parameters()), lr=1e-3)
    rng = np.random.default_rng(seed)

    def features(pick):
        pixels = torch.cat([rows[i]["prompt"]["pixel_values"] for i in pick])
        grids = torch.cat([rows[i]["prompt"]["image_grid_thw"] for i in pick])
        return torch.cat(list(family.image_features(model, [{"pixel_values": pixels, "image_grid_thw": grids}])))

    for step in range(steps):
        pick = rng.choice(len(rows), 16, replace=False)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(features(pick)),
                                                                    torch.cat([targets[i] for i in pick]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 200 == 0 or step == steps - 1:
            print(f"vision pre-training step {step}/{steps} loss {loss.item():.4f}", flush=True)
    with torch.no_grad():
        scale = 1.0 / features(range(min(64, len(rows)))).norm(dim=-1).mean()
        last = visual.merger.mlp[-1]
        last.weight.mul_(scale)
        last.bias.mul_(scale)
    model.save_pretrained(str(out), safe_serialization=True)
    return out


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
    p.add_argument("--rope-theta", type=float, help="a diagnostic: the language model's rope_theta set to this in the "
                   "plain folder before the stage (the preset keeps 1e6)")
    p.add_argument("--mrope", help="a diagnostic: the language model's M-RoPE sections T,H,W (sum: head_dim / 2)")
    p.add_argument("--layers", type=int, help="a diagnostic: language-model layers (the tiny preset has 2)")
    p.add_argument("--vision-pretrain", type=int, default=0, metavar="STEPS",
                   help="a diagnostic: pre-train the vision tower on lesion coverage first, then freeze it")
    p.add_argument("--record", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = ALIGNED_PRESETS["tiny-aligned"][1]
    spec = replace(spec, **{k: v for k, v in (("steps", args.steps), ("samples", args.samples), ("lr", args.lr)) if v})
    spec = replace(spec, train_vision=not args.vision_pretrain)
    data = generate(700, seed=0, progress=False)
    held = [s for s in data if s.split in ("val", "test_id")][:args.heldout]
    diagnosed = [s for s in data if s.split != "test_ood"][:400]
    scratch = Path(tempfile.mkdtemp(prefix="align-probe-"))
    try:
        if args.layers:
            from coreseg.common.models.policy import PRESETS, build_tiny_policy

            PRESETS["probe"] = dict(PRESETS["tiny"], layers=args.layers)
            plain = build_tiny_policy(scratch / "plain-layers", "probe", 0)
        else:
            plain = ensure_policy_dir("tiny", scratch / "assets", 0)
        if args.rope_theta or args.mrope:
            import json

            plain = Path(shutil.copytree(plain, scratch / "plain-rope"))
            config = json.loads((plain / "config.json").read_text())
            rope = config["text_config"]["rope_parameters"]
            rope["rope_theta"] = args.rope_theta or rope["rope_theta"]
            rope["mrope_section"] = [int(x) for x in args.mrope.split(",")] if args.mrope else rope["mrope_section"]
            (plain / "config.json").write_text(json.dumps(config, indent=2))
        if args.vision_pretrain:
            plain = pretrain_vision(plain, scratch / "plain-vision", args.vision_pretrain, spec.samples)

        def heldout_loss(folder):
            model, processor = load_policy(folder)
            family = policy_info(folder).family
            inputs, target = collate(encode_rows(processor, family, held), family, processor.tokenizer.pad_token_id)
            with torch.no_grad():
                return float(token_loss(model.eval()(**inputs).logits, inputs["input_ids"], target))

        before = heldout_loss(plain)
        start = time.time()
        aligned = build_aligned_policy(scratch / "aligned", "tiny-aligned", plain, 0, spec,
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
    theta = f"{args.rope_theta:g}" if args.rope_theta else "1e+06 (preset)"
    variant = ", ".join(v for v in (f"M-RoPE sections {args.mrope}" if args.mrope else "",
                                    f"{args.layers} LM layers" if args.layers else "",
                                    f"vision tower pre-trained {args.vision_pretrain} steps, then frozen"
                                    if args.vision_pretrain else "") if v) or "the preset's"
    table = ("| spec | LM rope_theta | build s | train loss first → last tenth | held-out loss before → after | n | box reward mean "
             "| answers with box reward > 0 | parse failures | distinct box lists |\n|---|---|---|---|---|---|---|---|---|---|\n"
             f"| {spec.samples} images, {spec.steps} steps × {spec.batch_size}, lr {spec.lr:g} | {theta} | {build_s:.0f} | "
             f"{stats['first_loss']:.3f} → {stats['last_loss']:.3f} | {before:.3f} → {after:.3f} | {scores['n']} | "
             f"{scores['box_mean']:.3f} | {scores['box_any']:.2f} | {scores['fail']:.2f} | {scores['distinct']} |")
    table = f"Variant: {variant}.\n\n{table}\n\nDiagnostics (bench/align_diagnostics.py):\n\n{diagnostics}"
    print(table)
    if args.record:
        from bench.recording import record

        record("Stand-in alignment of the tiny policy: boxes from the image? (bench/align_probe.py)",
               f"tiny-aligned seed 0 built with the spec below (torch threads: {args.threads or 'default'}; load "
               f"average at the end {' / '.join(load)}, the 2 cores shared with other jobs), then greedy answers "
               f"(transformers, no LoRA, no SFT) on the first {scores['n']} val + test_id samples of the demo's "
               "data set, boxes scored by the box reward (IoU >= 0.5 matching).\n\n" + table)


if __name__ == "__main__":
    main()
