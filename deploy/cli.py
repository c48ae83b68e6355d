"""`coreseg`: data preparation, SFT, GRPO training, evaluation, prediction and cluster submission.

Every command takes `--config PRESET_OR_YAML` (default: tiny_cpu) and dotted overrides such as
`learner.lr=1e-5 rollout.group_size=8`.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

from common.config import (DEFAULT_PRESET, PATH_KEYS, ConfigError, TrainConfig, absolute_path, get_value, load_config,
                           with_absolute_paths)

EPILOG = "Overrides are dotted keys of the config tree (see deploy/configs/tiny_cpu.yaml), e.g. run.steps=20."


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=DEFAULT_PRESET, help="preset name in deploy/configs or a YAML path")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. learner.lr=1e-5")


def _run_dir(cfg: TrainConfig, given: str | None) -> Path:
    return Path(given).resolve() if given else Path(cfg.run.output_dir) / cfg.run.name


def fresh_run_dir(cfg: TrainConfig, given: str | None) -> Path:
    """The folder of a new run. A new run never appends to an old one (its metrics and report would mix):
    if the folder already holds a run, the next free `NAME-2`, `NAME-3`, ... is used and the old run is kept."""
    base = _run_dir(cfg, given)
    if not (base / "metrics.jsonl").exists():
        return base
    n = 2
    while (base.parent / f"{base.name}-{n}" / "metrics.jsonl").exists():
        n += 1
    out = base.parent / f"{base.name}-{n}"
    print(f"[coreseg] {base} already holds a run; this run goes to {out} (continue the old one with --resume {base})")
    return out


def cmd_data_synth(args, cfg: TrainConfig) -> None:
    from common.synth import write_synth

    out = write_synth(args.out or cfg.data.path, cfg.data.synth_samples, cfg.data.synth_image_size, cfg.data.synth_seed,
                      cfg.data.synth_reasoning)
    print(f"wrote {cfg.data.synth_samples} samples to {out}")


def cmd_data_import(args, cfg: TrainConfig) -> None:
    from common.importer import import_folder

    out = import_folder(args.images, args.masks, args.out, category=args.category, modality=args.modality,
                        source=args.source, mask_suffix=args.mask_suffix, split=args.split, seed=cfg.data.synth_seed,
                        max_image_pixels=cfg.data.max_image_pixels)
    print(f"wrote {out}")


def cmd_data_embed(args, cfg: TrainConfig) -> None:
    from reward.embed import precompute_embeddings

    out = precompute_embeddings(cfg.data.path, args.split, args.out, cfg)
    print(f"wrote image embeddings to {out}; use them with reward.embed_cache_path={out}")


def _require_data(cfg: TrainConfig) -> None:
    """A missing data path is an error naming it (never a silent stand-in); only `data synth` and the demo
    write the synthetic set."""
    if "://" not in cfg.data.path and not Path(cfg.data.path).exists():
        sys.exit(f"coreseg: data.path {cfg.data.path} does not exist (write the synthetic set with `coreseg data "
                 f"synth data.path={cfg.data.path}`, or import images with `coreseg data import`)")


def _synth_if_missing(cfg: TrainConfig) -> None:
    """The demo's data: the synthetic set, written once."""
    if not Path(cfg.data.path).exists():
        from common.synth import write_synth
        print(f"[coreseg] demo: writing the synthetic set to {cfg.data.path}")
        write_synth(cfg.data.path, cfg.data.synth_samples, cfg.data.synth_image_size, cfg.data.synth_seed,
                    cfg.data.synth_reasoning)


def cmd_sft(args, cfg: TrainConfig) -> None:
    from deploy.driver import Driver

    _require_data(cfg)
    driver = Driver(cfg, fresh_run_dir(cfg, args.run_dir), with_rollout=False)
    try:
        driver.sft(cfg.run.sft_steps)
        print(f"checkpoint: {driver.save()}")
    finally:
        driver.close()


def cmd_train(args, cfg: TrainConfig) -> None:
    from deploy.driver import Driver
    from deploy.report import write_report

    run_dir = Path(args.resume).resolve() if args.resume else fresh_run_dir(cfg, args.run_dir)
    if args.resume:
        cfg = with_absolute_paths(load_config(str(run_dir / "config.yaml"), args.overrides))
    _require_data(cfg)
    print(f"[coreseg] run folder: {run_dir.resolve()}")
    driver = Driver(cfg, run_dir)
    try:
        if args.resume:
            driver.restore()
        elif args.init:
            driver.restore(args.init)
            driver.step["grpo"] = 0
        if cfg.run.sft_steps and driver.step["sft"] == 0 and not args.no_sft:
            driver.sft(cfg.run.sft_steps)
        remaining = cfg.run.steps - driver.step["grpo"]
        driver.train(max(0, remaining))
        driver.save()
        if args.eval:
            driver.evaluate(cfg.data.eval_splits, cfg.run.eval_samples)
    finally:
        driver.close()
    print(f"report: {write_report(run_dir)}")


def cmd_eval(args, cfg: TrainConfig) -> None:
    from deploy.driver import Driver

    run_dir = Path(args.run_dir)
    cfg = load_config(str(run_dir / "config.yaml"), args.overrides)
    driver = Driver(cfg, run_dir, read_only=True)  # the run's config and metrics stay as they are
    try:
        driver.restore(args.checkpoint)
        results = driver.evaluate(args.splits or cfg.data.eval_splits, args.limit or cfg.run.eval_samples)
    finally:
        driver.close()
    for split, res in results.items():
        o = res["overall"]
        print(f"{split}: mDice {o['mDice']:.4f} mIoU {o['mIoU']:.4f} failure rate {o['failure_rate']:.4f} (n={o['n']})")
    print(f"written to {run_dir / 'eval'}")


def cmd_predict(args, cfg: TrainConfig) -> None:
    from deploy.predict import predict

    run_dir = Path(args.run_dir)
    cfg = load_config(str(run_dir / "config.yaml"), args.overrides)
    out = predict(cfg, run_dir, args.image, args.question, args.out, checkpoint=args.checkpoint)
    print(out["text"])
    print(f"mask: {out['mask_path']}\noverlay: {out['overlay_path']}")


def cmd_submit(args, cfg: TrainConfig) -> None:
    _require_data(cfg)
    print(f"[coreseg] the run folder will be {Path(cfg.run.output_dir) / cfg.run.name} (or NAME-2, ... if it holds a "
          f"run); it must be on storage the cluster's nodes share")
    cmd = submit_command(args.address, train_entrypoint(args.config, args.overrides, cfg), no_wait=args.no_wait)
    print("+ " + " ".join(shlex.quote(c) for c in cmd))
    sys.exit(subprocess.call(cmd))


def train_entrypoint(config: str, overrides: list, cfg: TrainConfig) -> list:
    """`coreseg train` for the cluster: the user's overrides, then every path key as an absolute path (resolved
    here, where the user runs `coreseg submit`; a job runs in a copy of the code elsewhere)."""
    preset = absolute_path(config, Path.cwd()) if Path(config).suffix in (".yaml", ".yml") else config
    paths = [f"{key}={get_value(cfg, key)}" for key in PATH_KEYS if get_value(cfg, key)]
    return ["coreseg", "train", "--config", preset, *overrides, "cluster.mode=cluster", *paths]


def submit_command(address: str | None, entrypoint: list, no_wait: bool = False) -> list:
    """`ray job submit` of `entrypoint`, uploading the code only (deploy/runtime_env.yaml excludes data, runs and
    caches). Ray joins the entrypoint into one shell command line, so every word is quoted here: nothing in an
    override (`$(...)`, backticks, `;`) reaches a shell unquoted."""
    root = Path(__file__).resolve().parent.parent
    cmd = ["ray", "job", "submit", "--working-dir", str(root), "--runtime-env",
           str(root / "deploy" / "runtime_env.yaml")]
    if address:
        cmd += ["--address", address]
    if no_wait:
        cmd.append("--no-wait")
    return cmd + ["--", *(shlex.quote(word) for word in entrypoint)]


def cmd_demo(args, cfg: TrainConfig) -> None:
    """synthetic data -> SFT -> GRPO -> eval -> report on the embedded default."""
    import time

    from deploy.driver import Driver
    from deploy.report import write_report

    start = time.time()
    _synth_if_missing(cfg)
    run_dir = fresh_run_dir(cfg, args.run_dir)
    driver = Driver(cfg, run_dir)
    try:
        driver.sft(cfg.run.sft_steps)
        driver.train(cfg.run.steps)
        driver.save()
        driver.evaluate(cfg.data.eval_splits, cfg.run.eval_samples)
    finally:
        driver.close()
    report = write_report(run_dir)
    print(f"\ndemo finished in {time.time() - start:.0f}s\nreport: {report}")


def cmd_plan(args, cfg: TrainConfig) -> None:
    from deploy.plan import format_plan, make_plan

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
    data = sub.add_parser("data", help="prepare data sets").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("synth", help="write the deterministic synthetic lesion set (Parquet)")
    p.add_argument("--out", help="output folder (default: data.path)")
    _common(p)
    p.set_defaults(func=cmd_data_synth)
    p = data.add_parser("import", help="turn an image folder + mask folder (matched by stem) into Parquet")
    p.add_argument("--images", required=True)
    p.add_argument("--masks", required=True)
    p.add_argument("--out", required=True, help="output .parquet file")
    p.add_argument("--category", default="lesion")
    p.add_argument("--modality", default="unknown")
    p.add_argument("--source", default="")
    p.add_argument("--mask-suffix", default="", help="e.g. _segmentation for ISIC masks")
    p.add_argument("--split", default="auto", help="a split for every row, or auto (80/10/10 train/val/test_id)")
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
    _common(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("eval", help="mDice, mIoU and failure rate on val/test_id/test_ood (+ per modality)")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--checkpoint", help="checkpoint folder (default: the run's latest)")
    p.add_argument("--splits", nargs="*")
    p.add_argument("--limit", type=int)
    _common(p)
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("predict", help="reason about one image, write a mask PNG and an overlay PNG")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--checkpoint")
    p.add_argument("--image", required=True)
    p.add_argument("--question", required=True)
    p.add_argument("--out", default="prediction")
    _common(p)
    p.set_defaults(func=cmd_predict)
    p = sub.add_parser("submit", help="submit `coreseg train` to a Ray cluster with `ray job submit`")
    p.add_argument("--address", help="Ray dashboard address (default: RAY_ADDRESS)")
    p.add_argument("--no-wait", action="store_true")
    _common(p)
    p.set_defaults(func=cmd_submit)
    p = sub.add_parser("plan", help="memory per GPU by role and the GPUs a config needs (arithmetic, nothing loaded)")
    p.add_argument("--gpu-mem-gib", type=float, default=80.0, help="memory of one GPU; roles above it are warned")
    p.add_argument("--image-size", type=int, default=1024, help="side of the (square) training images, px")
    p.add_argument("--prompt-text-tokens", type=int, default=100, help="text tokens of a prompt besides the image")
    _common(p)
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("demo", help="synthetic data -> SFT -> GRPO -> eval -> report (tiny preset)")
    p.add_argument("--run-dir")
    _common(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    args = build_parser().parse_args(argv)
    try:
        cfg = with_absolute_paths(load_config(args.config, args.overrides))
    except ConfigError as err:
        sys.exit(f"coreseg: {err}")
    from common.data import DataError

    try:
        args.func(args, cfg)
    except (ConfigError, DataError) as err:  # bad input: the message names the file/row/key, a traceback adds nothing
        sys.exit(f"coreseg: {err}")


if __name__ == "__main__":
    main()
