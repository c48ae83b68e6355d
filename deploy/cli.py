"""`coreseg`: data preparation, SFT, GRPO training, evaluation, prediction and cluster submission.

Every command takes `--config PRESET_OR_YAML` (default: tiny_cpu; repeat it to layer files, later ones win; a
YAML may extend a preset with `defaults: NAME`) and dotted overrides such as `learner.lr=1e-5 rollout.group_size=8`.
`coreseg config show` prints the tree they resolve to. `eval`, `predict`, `export` and `train --resume` read the
run's own config.yaml and take overrides only.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from coreseg.common import storage
from coreseg.common.config import (DEFAULT_PRESET, ConfigError, TrainConfig, absolute_path, load_config, to_yaml,
                                   with_absolute_paths)
from coreseg.deploy.run_folder import fresh_run_dir, local_run_copy, saved_config

EPILOG = "Overrides are dotted keys of the config tree (see deploy/configs/tiny_cpu.yaml), e.g. run.steps=20."


DEMO_PRESET = "demo"  # `coreseg demo` without --config: deploy/configs/demo.yaml


def _common(p: argparse.ArgumentParser, preset: str = DEFAULT_PRESET) -> None:
    p.add_argument("--config", action="append", metavar="PRESET_OR_YAML",
                   help=f"preset name in deploy/configs or a YAML path (default: {preset}); repeat to layer "
                        "them, later ones win")
    p.set_defaults(default_preset=preset)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. learner.lr=1e-5")


OVERRIDE = re.compile(r"^[A-Za-z_][\w]*(\.[\w]+)+=")


def move_trailing_overrides(args) -> None:
    """`coreseg eval --splits test_id run.eval_sampled=true`: argparse gives every word after --splits to it; the
    ones shaped like a dotted override (key.sub=value, which no split name is) are the overrides the user meant."""
    splits = getattr(args, "splits", None)
    if splits:
        args.overrides = list(args.overrides or []) + [w for w in splits if OVERRIDE.match(w)]
        args.splits = [w for w in splits if not OVERRIDE.match(w)]


def _write_synth(cfg: TrainConfig, out_dir: str):
    """The synthetic set the config's `data.synth_*` keys describe, written to out_dir."""
    from coreseg.common.synth import write_synth

    d = cfg.data
    return write_synth(out_dir, d.synth_samples, d.synth_image_size, d.synth_seed, d.synth_reasoning, d.synth_task)


def cmd_data_synth(args, cfg: TrainConfig) -> None:
    out = _write_synth(cfg, args.out or cfg.data.path)
    print(f"wrote {cfg.data.synth_samples} samples to {out}")


def cmd_data_import(args, cfg: TrainConfig) -> None:
    from coreseg.common.importer import ImportOptions, import_folder, import_parquet

    opts = ImportOptions(category=args.category, modality=args.modality, source=args.source, split=args.split,
                         seed=cfg.data.synth_seed, mask_threshold=args.mask_threshold,
                         min_lesion_fraction=args.min_lesion_fraction, reasoning=args.reasoning,
                         max_image_pixels=cfg.data.max_image_pixels)
    if bool(args.parquet) == bool(args.images or args.masks):
        sys.exit("coreseg: data import takes either --images DIR --masks DIR or --parquet FILE")
    if args.parquet:
        out, stats = import_parquet(args.parquet, args.out, image_column=args.image_column,
                                    mask_column=args.mask_column, id_column=args.id_column, opts=opts)
    else:
        if not (args.images and args.masks):
            sys.exit("coreseg: data import needs both --images and --masks")
        out, stats = import_folder(args.images, args.masks, args.out, mask_suffix=args.mask_suffix, opts=opts)
    print(stats.summary(opts))
    print(f"wrote {out}")


def cmd_data_embed(args, cfg: TrainConfig) -> None:
    from coreseg.reward.embed import precompute_embeddings

    out = precompute_embeddings(cfg.data.path, args.split, args.out, cfg)
    print(f"wrote image embeddings to {out}; use them with reward.embed_cache_path={out}")


def _require_data(cfg: TrainConfig) -> None:
    """A missing data path is an error naming it (never a silent stand-in); only `data synth` and the demo
    write the synthetic set."""
    try:
        found = storage.exists(cfg.data.path)
    except OSError as err:  # e.g. no credentials for the bucket on this machine: the job checks it again
        print(f"[coreseg] data.path {cfg.data.path} could not be checked here ({str(err).splitlines()[0]})")
        found = True
    if not found:
        sys.exit(f"coreseg: data.path {cfg.data.path} does not exist (write the synthetic set with `coreseg data "
                 f"synth data.path={cfg.data.path}`, or import images with `coreseg data import`)")


def _synth_if_missing(cfg: TrainConfig) -> None:
    """The demo's data: the synthetic set, written once."""
    if not Path(cfg.data.path).exists():
        print(f"[coreseg] demo: writing the synthetic set to {cfg.data.path}")
        _write_synth(cfg, cfg.data.path)


def cmd_sft(args, cfg: TrainConfig) -> None:
    from coreseg.deploy.driver import Driver

    _require_data(cfg)
    driver = Driver(cfg, fresh_run_dir(cfg, args.run_dir), with_rollout=False)
    try:
        driver.sft(cfg.run.sft_steps)
        print(f"checkpoint: {driver.save()}")
    finally:
        driver.close()


def cmd_train(args, cfg: TrainConfig) -> None:
    from coreseg.deploy.driver import Driver
    from coreseg.deploy.evaluation import evaluate_start
    from coreseg.deploy.recovery import resume
    from coreseg.deploy.report import write_report

    run_dir = absolute_path(args.resume, Path.cwd()) if args.resume else fresh_run_dir(cfg, args.run_dir)
    if args.resume:
        cfg = with_absolute_paths(load_config(str(saved_config(run_dir)), args.overrides))
    _require_data(cfg)
    print(f"[coreseg] run folder: {run_dir}")
    driver = Driver(cfg, run_dir)
    try:
        if args.resume:
            resume(driver)
        elif args.init:
            driver.restore(args.init)
            driver.step["grpo"] = 0
        if cfg.run.sft_steps and driver.step["sft"] == 0 and not args.no_sft:
            driver.sft(cfg.run.sft_steps)
        if (args.eval or cfg.run.eval_every) and not args.no_start_eval:  # step 0, for start -> end deltas
            evaluate_start(driver, cfg.data.eval_splits, cfg.run.eval_samples)
        remaining = cfg.run.steps - driver.step["grpo"]
        driver.train(max(0, remaining), save_at_end=True)
        driver.save()  # after SFT alone (a step already saved is not saved again)
        if args.eval:
            driver.evaluate(cfg.data.eval_splits, cfg.run.eval_samples)
    finally:
        driver.close()
    report = write_report(driver.run.local)
    driver.run.publish("report.md", "plots")
    print(f"report: {driver.run.join(report.name)}")


def cmd_eval(args, cfg: TrainConfig) -> None:
    from coreseg.deploy.driver import Driver

    run_dir = absolute_path(args.run_dir, Path.cwd())
    cfg = load_config(str(saved_config(run_dir)), args.overrides)
    driver = Driver(cfg, run_dir, read_only=True)  # the run's config and metrics stay as they are
    try:
        driver.restore(args.checkpoint)
        results = driver.evaluate(args.splits or cfg.data.eval_splits, args.limit or cfg.run.eval_samples)
    finally:
        driver.close()
    for split, res in results.items():
        o = res["overall"]
        print(f"{split}: mDice {o['mDice']:.4f} mIoU {o['mIoU']:.4f} failure rate {o['failure_rate']:.4f} (n={o['n']})")
    print(f"written to {driver.run.join('eval')}")


def cmd_predict(args, cfg: TrainConfig) -> None:
    """In-process (no Ray, DeepSpeed or vLLM), from a run folder's checkpoint or an export; writes only --out."""
    from coreseg.deploy.infer import Predictor
    from coreseg.deploy.predict import image_paths, predict_files, read_image_file

    if bool(args.run_dir) == bool(args.export):
        sys.exit("coreseg: predict takes either --run-dir RUN or --export DIR")
    run_dir, checkpoint = local_run_copy(absolute_path(args.run_dir, Path.cwd()), args.checkpoint) if args.run_dir \
        else (None, None)
    if run_dir:
        cfg = load_config(str(saved_config(run_dir)), args.overrides)
    for path in image_paths(args.image):  # a bad file is named before any model loads
        read_image_file(str(path), cfg.data.max_image_pixels)
    from coreseg.deploy.export import ExportError

    try:
        if args.run_dir:
            predictor = Predictor.from_run(cfg, run_dir, checkpoint)
        else:
            predictor = Predictor.from_export(args.export, sam_checkpoint=args.sam_checkpoint)
    except ExportError as err:
        sys.exit(f"coreseg: {err}")
    for record in predict_files(predictor, args.image, args.question, args.out, cfg.data.max_image_pixels):
        print(f"{record['image']}: {record['text']}\n  mask: {record['mask_path']} overlay: {record['overlay_path']}")


def cmd_config_show(args, cfg: TrainConfig) -> None:
    print(to_yaml(cfg), end="")


def refuse_config_for_run_commands(args) -> None:
    """`eval`, `predict`, `export` and `train --resume` use the run's saved config.yaml (the tree it was trained
    with; an export carries what it needs); a `--config` there would be silently ignored, so it is refused."""
    run_bound = args.command in ("eval", "predict", "export") or getattr(args, "resume", None)
    if run_bound and args.config:
        what = "train --resume" if args.command == "train" else args.command
        sys.exit(f"coreseg: `{what}` reads the run's own config.yaml; --config does not apply (change single keys "
                 f"with dotted overrides, e.g. data.path=/other/data)")


def cmd_export(args, cfg: TrainConfig) -> None:
    from coreseg.deploy.export import ExportError, export_run

    try:
        run_dir, checkpoint = local_run_copy(absolute_path(args.run, Path.cwd()), args.checkpoint)
        out = export_run(run_dir, args.out, args.base, checkpoint=checkpoint, merged=args.merged)
    except ExportError as err:
        sys.exit(f"coreseg: {err}")
    print(f"exported to {out} (policy/: PEFT adapter on {args.base} + tokenizer/processor; segmenter/: prompt "
          f"adapter and mask decoder; coreseg_segmenter/: their loader)")


def cmd_submit(args, cfg: TrainConfig) -> None:
    from coreseg.deploy.submit import job_runtime_env, submit_command, train_entrypoint

    _require_data(cfg)
    print(f"[coreseg] the run folder will be {storage.join(cfg.run.output_dir, cfg.run.name)} (or NAME-2, ... if it "
          f"holds a run); it must be a URI or a path on storage the cluster's nodes share")
    with tempfile.TemporaryDirectory(prefix="coreseg-submit-") as staging:  # uploaded by `ray job submit`, then gone
        env = job_runtime_env(Path(staging), args.working_dir)
        cmd = submit_command(args.address, train_entrypoint(args.config or [DEFAULT_PRESET], args.overrides, cfg),
                             env, no_wait=args.no_wait)
        print("+ " + " ".join(shlex.quote(c) for c in cmd))
        code = subprocess.call(cmd)
    sys.exit(code)


def cmd_demo(args, cfg: TrainConfig) -> None:
    """synthetic data -> SFT -> GRPO -> eval -> report on the `demo` preset (or --config)."""
    import time

    from coreseg.deploy.driver import Driver
    from coreseg.deploy.evaluation import evaluate_start
    from coreseg.deploy.report import write_report

    start = time.time()
    _synth_if_missing(cfg)
    run_dir = fresh_run_dir(cfg, args.run_dir)
    driver = Driver(cfg, run_dir)
    try:
        driver.sft(cfg.run.sft_steps)
        evaluate_start(driver, cfg.data.eval_splits, cfg.run.eval_samples)  # the SFT result: GRPO's start
        driver.train(cfg.run.steps)
        driver.save()
        driver.evaluate(cfg.data.eval_splits, cfg.run.eval_samples)
    finally:
        driver.close()
    report = write_report(driver.run.local)
    driver.run.publish("report.md", "plots")
    print(f"\ndemo finished in {time.time() - start:.0f}s\nreport: {report}")


def cmd_plan(args, cfg: TrainConfig) -> None:
    from coreseg.deploy.plan import format_plan, make_plan

    try:
        plan = make_plan(cfg, gpu_mem_gib=args.gpu_mem_gib, image_size=args.image_size,
                         prompt_text_tokens=args.prompt_text_tokens)
    except (FileNotFoundError, ValueError) as err:  # no shape for model.policy, an unknown LoRA target
        sys.exit(f"coreseg plan: {err}")
    print(format_plan(plan))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coreseg", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True)
    config = sub.add_parser("config", help="inspect the config tree").add_subparsers(dest="config_command",
                                                                                       required=True)
    p = config.add_parser("show", help="print the resolved config tree (presets, their defaults, overrides)")
    _common(p)
    p.set_defaults(func=cmd_config_show)
    data = sub.add_parser("data", help="prepare data sets").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("synth", help="write the deterministic synthetic lesion set (Parquet)")
    p.add_argument("--out", help="output folder (default: data.path)")
    _common(p)
    p.set_defaults(func=cmd_data_synth)
    p = data.add_parser("import", help="image + mask files (folders matched by stem, or a Parquet file such as HF "
                                       "datasets writes) to the lesion Parquet format")
    p.add_argument("--images", help="folder of images (with --masks)")
    p.add_argument("--masks", help="folder of masks, matched to the images by file stem")
    p.add_argument("--mask-suffix", default="", help="e.g. _segmentation for ISIC masks")
    p.add_argument("--parquet", help="a Parquet file with an image and a mask column (binary or HF Image structs)")
    p.add_argument("--image-column", default="image")
    p.add_argument("--mask-column", default="mask")
    p.add_argument("--id-column", default="", help="column of sample ids (default: FILESTEM-ROW)")
    p.add_argument("--out", required=True, help="output .parquet file")
    p.add_argument("--category", default="lesion")
    p.add_argument("--modality", default="unknown")
    p.add_argument("--source", default="")
    p.add_argument("--split", default="auto", help="a split for every row, or auto (80/10/10 train/val/test_id)")
    p.add_argument("--mask-threshold", type=float, default=0.5,
                   help="lesion pixels are above this fraction of the mask's brightest value (default 0.5)")
    p.add_argument("--min-lesion-fraction", type=float, default=0.001,
                   help="drop (and count) mask components smaller than this fraction of the image (default 0.001)")
    p.add_argument("--reasoning", choices=("none", "template"), default="none",
                   help="none: empty reasoning; template: one sentence per image from its masks (as the "
                        "synthetic set's short style)")
    _common(p)
    p.set_defaults(func=cmd_data_import)
    p = data.add_parser("embed", help="precompute SAM image embeddings of a split (warms the reward cache)")
    p.add_argument("--split", default="train")
    p.add_argument("--out", required=True, help="output .safetensors file")
    _common(p)
    p.set_defaults(func=cmd_data_embed)

    p = sub.add_parser("sft", help="supervised fine-tuning stage (CE on reasoning+answer + DiceCE)")
    p.add_argument("--run-dir")
    _common(p)
    p.set_defaults(func=cmd_sft)
    p = sub.add_parser("train", help="GRPO training (runs run.sft_steps of SFT first unless --no-sft)")
    p.add_argument("--run-dir")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run exactly from its latest checkpoint")
    p.add_argument("--init", metavar="CHECKPOINT", help="start from a checkpoint folder (e.g. an SFT run's)")
    p.add_argument("--no-sft", action="store_true")
    p.add_argument("--eval", action="store_true", help="evaluate on data.eval_splits at the end")
    p.add_argument("--no-start-eval", action="store_true",
                   help="skip the eval of the starting checkpoint (step 0) that --eval or run.eval_every > 0 adds")
    _common(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("eval", help="mDice, mIoU and failure rate on val/test_id/test_ood (+ per modality)")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--checkpoint", help="checkpoint folder (default: the run's latest)")
    p.add_argument("--splits", nargs="*")
    p.add_argument("--limit", type=int)
    _common(p)
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("predict", help="answer for an image (or each image of a folder): text, mask PNG, overlay "
                                       "PNG; in-process, from a run folder or an export")
    p.add_argument("--run-dir", help="run folder (its latest checkpoint, or --checkpoint)")
    p.add_argument("--checkpoint")
    p.add_argument("--export", help="a `coreseg export` folder (instead of --run-dir)")
    p.add_argument("--sam-checkpoint", default="", help="with --export: the SAM .pth a vit_* segmenter was trained on")
    p.add_argument("--image", required=True, help="an image file or a folder of images")
    p.add_argument("--question", required=True)
    p.add_argument("--out", default="prediction")
    _common(p)
    p.set_defaults(func=cmd_predict)
    p = sub.add_parser("export", help="a run's checkpoint as a folder that transformers + peft + segment-anything "
                                      "load without coreseg")
    p.add_argument("run", metavar="RUN", help="run folder")
    p.add_argument("--checkpoint", help="checkpoint folder or name (default: the run's latest)")
    p.add_argument("--base", required=True, help="the base model's local folder or hub id (written into the "
                                                 "adapter config)")
    p.add_argument("--out", required=True, help="new output folder")
    p.add_argument("--merged", action="store_true", help="also write the policy with the LoRA merged (merged/)")
    _common(p)
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("submit", help="submit `coreseg train` to a Ray cluster with `ray job submit`")
    p.add_argument("--address", help="Ray dashboard address (default: RAY_ADDRESS)")
    p.add_argument("--no-wait", action="store_true")
    p.add_argument("--working-dir", default=".", help="folder shipped as the job's working dir, for modules a config "
                   "names by import path (default: the current folder; '' ships none; the code itself always ships)")
    _common(p)
    p.set_defaults(func=cmd_submit)
    p = sub.add_parser("plan", help="memory per GPU by role and the GPUs a config needs (arithmetic, nothing loaded)")
    p.add_argument("--gpu-mem-gib", type=float, default=80.0, help="memory of one GPU; roles above it are warned")
    p.add_argument("--image-size", type=int, default=1024, help="side of the (square) training images, px")
    p.add_argument("--prompt-text-tokens", type=int, default=100, help="text tokens of a prompt besides the image")
    _common(p)
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("demo", help="synthetic data -> SFT -> GRPO -> eval -> report (preset `demo`: tiny, aligned policy)")
    p.add_argument("--run-dir")
    _common(p, DEMO_PRESET)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    args = build_parser().parse_args(argv)
    move_trailing_overrides(args)
    refuse_config_for_run_commands(args)
    try:
        cfg = with_absolute_paths(load_config(args.config or [args.default_preset], args.overrides))
    except ConfigError as err:
        sys.exit(f"coreseg: {err}")
    from coreseg.common.data import DataError

    try:
        args.func(args, cfg)
    except (ConfigError, DataError) as err:  # bad input: the message names the file/row/key, a traceback adds nothing
        sys.exit(f"coreseg: {err}")


if __name__ == "__main__":
    main()
