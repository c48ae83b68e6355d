"""Rollout throughput: vLLM vs the HF transformers engine on the same policy, n completions per prompt.

    .venv/bin/python bench/rollout.py --presets tiny small --prompts 32 --n 8 --max-new-tokens 64 --repeats 3 --record

Each (preset, engine) runs in its own subprocess so one engine's memory and threads never slow the other.
Generated tokens/s and completions/s are those of the median of `--repeats` timed `generate` calls, each
on new prompts, after a warm-up call; engine start time is reported separately. `--lora` makes both engines
serve a random LoRA, as in training. `--record` appends the table to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.recording import record  # noqa: E402


def run_one(preset: str, engine_name: str, prompts: int, n: int, max_new_tokens: int, seed: int,
            repeats: int = 1, lora: bool = False) -> dict:
    """Build one engine (serving a random LoRA when `lora`, as in training), warm it up, time `repeats`
    generates, each over `prompts` new prompts (as in training, where no prompt is in the prefix cache yet);
    returns the measurements of the median call."""
    from coreseg.common.config import load_config
    from coreseg.common.models.family import model_family
    from coreseg.common.models.policy import ensure_policy_dir
    from coreseg.common.protocol import RolloutRequest
    from coreseg.common.synth import generate as synth
    from coreseg.rollout.engine import Sampling

    cfg = load_config("tiny_cpu", [f"model.policy={preset}", f"rollout.engine={engine_name}",
                                   f"rollout.max_new_tokens={max_new_tokens}", "rollout.max_model_len=1024"])
    policy_dir = ensure_policy_dir(preset, ROOT / cfg.model.assets_dir)
    samples = synth(prompts * repeats + 2, image_size=112, seed=seed, progress=False)
    family = model_family(policy_dir)
    requests = [RolloutRequest(s.id, family.prompt(s.question), s.image) for s in samples]
    t0 = time.perf_counter()
    if engine_name == "vllm":
        from coreseg.rollout.vllm_engine import VLLMEngine
        engine = VLLMEngine(cfg, policy_dir)
    else:
        from coreseg.rollout.hf_engine import HFEngine
        engine = HFEngine(cfg, policy_dir)
    start_s = time.perf_counter() - t0
    if lora:
        engine.load_weights(random_lora_bundle(cfg, policy_dir, seed))
    sampling = Sampling(temperature=1.0, top_p=1.0, max_new_tokens=max_new_tokens, seed=seed)
    engine.generate(requests[-2:], 2, Sampling(1.0, 1.0, 8, seed=seed))  # warm-up (kernels, allocations)
    calls = []
    for r in range(repeats):
        t0 = time.perf_counter()
        groups = engine.generate(requests[r * prompts:(r + 1) * prompts], n, sampling)
        gen_s = time.perf_counter() - t0
        comps = [c for g in groups for c in g.completions]
        calls.append(dict(gen_s=gen_s, completions=len(comps), tokens=sum(len(c.token_ids) for c in comps),
                          errors=sum(g.error is not None for g in groups)))
    median = sorted(calls, key=lambda c: c["gen_s"])[len(calls) // 2]
    return dict(preset=preset, engine=engine_name, prompts=prompts, n=n, **median, start_s=start_s,
                tokens_per_s=median["tokens"] / median["gen_s"],
                completions_per_s=median["completions"] / median["gen_s"], repeats=repeats,
                all_gen_s=[round(c["gen_s"], 1) for c in calls], params=count_parameters(policy_dir))


def random_lora_bundle(cfg, policy_dir, seed: int):
    """A version-1 bundle of random LoRA weights (A and B both non-zero) on the config's target modules."""
    import torch
    from peft import get_peft_model

    from coreseg.common.models.family import model_family
    from coreseg.common.models.lora import lora_state, make_lora_config, peft_config_dict
    from coreseg.common.models.policy import load_policy
    from coreseg.common.protocol import WeightBundle

    torch.manual_seed(seed)
    model = get_peft_model(load_policy(policy_dir)[0],
                           make_lora_config(cfg.model, model_family(policy_dir), init_random=True))
    config = peft_config_dict(model.peft_config["default"])
    return WeightBundle(version=1, lora=lora_state(model), peft_config=config, adapter={})


def count_parameters(policy_dir) -> int:
    from safetensors import safe_open

    total = 0
    for file in Path(policy_dir).glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            total += sum(_prod(f.get_slice(k).get_shape()) for k in f.keys())
    return total


def _prod(shape) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out


def run_subprocess(preset: str, engine: str, args) -> dict:
    cmd = [sys.executable, __file__, "--one", preset, engine, "--prompts", str(args.prompts), "--n", str(args.n),
           "--max-new-tokens", str(args.max_new_tokens), "--seed", str(args.seed), "--repeats", str(args.repeats),
           *(["--lora"] if args.lora else [])]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        sys.stderr.write(out.stderr[-4000:])
        raise RuntimeError(f"{preset}/{engine} failed (exit {out.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


def table(results: list) -> str:
    rows = ["| preset | params | engine | completions | gen tokens | gen s | tokens/s | completions/s | start s "
            "| all calls s |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r['preset']} | {r['params'] / 1e6:.1f}M | {r['engine']} | {r['completions']} | "
                    f"{r['tokens']} | {r['gen_s']:.1f} | {r['tokens_per_s']:.1f} | {r['completions_per_s']:.2f} | "
                    f"{r['start_s']:.1f} | {', '.join(map(str, r['all_gen_s']))} |")
    by = {(r["preset"], r["engine"]): r for r in results}
    for preset in dict.fromkeys(r["preset"] for r in results):
        if (preset, "vllm") in by and (preset, "hf") in by:
            v, h = by[(preset, "vllm")], by[(preset, "hf")]
            rows.append(f"\n{preset}: vLLM / HF = {v['tokens_per_s'] / h['tokens_per_s']:.2f}x tokens/s, "
                        f"{v['completions_per_s'] / h['completions_per_s']:.2f}x completions/s")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--engines", nargs="+", default=["vllm", "hf"], choices=["vllm", "hf"])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lora", action="store_true", help="both engines serve a random LoRA (r from the preset)")
    ap.add_argument("--repeats", type=int, default=1, help="timed calls per engine, each on new prompts; median")
    ap.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    ap.add_argument("--one", nargs=2, metavar=("PRESET", "ENGINE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        result = run_one(*args.one, args.prompts, args.n, args.max_new_tokens, args.seed, args.repeats, args.lora)
        print("RESULT " + json.dumps(result))
        return
    results = []
    for preset in args.presets:
        for engine in args.engines:
            results.append(run_subprocess(preset, engine, args))
            print(json.dumps(results[-1]), flush=True)
    text = table(results)
    print(text)
    if args.record:
        record("Rollout throughput",
               f"LoRA: {'a random LoRA served by both engines (vLLM as configured for CPU)' if args.lora else 'none'}. "
               "Sampling: temperature 1, top_p 1, random-weight policies (completions mostly run to max_new_tokens). "
               f"Timed: after a warm-up, {args.repeats} generate call(s), each on {args.prompts} new prompts; the "
               f"median call is shown; start = engine construction.\n\n{text}")


if __name__ == "__main__":
    main()
