"""Weight-push cost and the phase breakdown of a tiny end-to-end GRPO step (local mode, real actors).

    .venv/bin/python bench/push.py --steps 4 --pushes 5 --record

One driver with 1 learner, 2 rollout and 2 reward workers (the issue's setting) runs `--warmup` + `--steps`
GRPO steps on the synthetic set; then `--pushes` extra weight pushes are timed on their own.
Table 1 (push): median seconds of a push (export on the learner, one `ray.put`, 2+2 workers load it
concurrently, each its own part: LoRA to rollout, adapter + mask decoder to reward; versions checked), bytes of the bundle vs the trainable parameter bytes counted independently
(peft LoRA parameters + prompt adapter + SAM mask decoder built here, outside the actors), and the push as a
fraction of the median step time. Table 2 (phases): the median of each `time/*` over the timed steps and
its share of the step. `--record` appends both tables to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.recording import record  # noqa: E402

PHASES = ("rollout", "forward", "reward", "update", "push")


def trainable_bytes(cfg, policy_dir: Path) -> dict:
    """Bytes of what a push must carry, counted from freshly built modules (not from the bundle)."""
    import torch
    from peft import get_peft_model

    from coreseg.common.models.adapter import build_adapter
    from coreseg.common.models.family import model_family
    from coreseg.common.models.lora import make_lora_config
    from coreseg.common.models.policy import load_policy
    from coreseg.common.models.sam import build_sam

    model = get_peft_model(load_policy(policy_dir, torch.float32)[0], make_lora_config(cfg.model, model_family(policy_dir)))
    lora = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n)
    hidden = model.config.text_config.hidden_size if hasattr(model.config, "text_config") else model.config.hidden_size
    sam = build_sam(cfg.model.sam_type, cfg.model.sam_checkpoint)
    adapter = build_adapter(hidden, cfg.model.adapter_queries, cfg.model.adapter_mlp_blocks,
                            prompt_dim=sam.prompt_encoder.embed_dim)
    nbytes = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    return {"lora": lora, "adapter": nbytes(adapter),
            "mask_decoder": nbytes(sam.mask_decoder) if cfg.model.train_mask_decoder else 0}


def run(args) -> dict:
    from coreseg.common.config import load_config
    from coreseg.common.synth import write_synth
    from coreseg.deploy.driver import Driver

    work = Path(tempfile.mkdtemp(prefix="coreseg-push-"))
    data = write_synth(work / "data", 64, 112, 0).parent
    cfg = load_config("tiny_cpu", [f"data.path={data}", "cluster.learner_workers=1",
                                   f"cluster.rollout_workers={args.rollout_workers}",
                                   f"cluster.reward_workers={args.reward_workers}", "run.save_every=0",
                                   "run.eval_every=0", f"rollout.max_new_tokens={args.max_new_tokens}"])
    t0 = time.perf_counter()
    driver = Driver(cfg, work / "run")
    start_s = time.perf_counter() - t0
    try:
        driver.train(args.warmup + args.steps)
        records = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in records if r.get("phase") == "grpo" and "time/step" in r][args.warmup:]
        pushes = []
        for _ in range(args.pushes):
            pushes.append(driver.push_weights())
        bundle = driver.learner.export_weights()
    finally:
        driver.close()
    part = lambda d: sum(t.numel() * t.element_size() for t in (d or {}).values())  # noqa: E731
    expected = trainable_bytes(cfg, driver.policy_dir)
    med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
    return {"start_s": start_s, "steps": len(steps),
            "phases": {p: med([r[f"time/{p}"] for r in steps]) for p in PHASES + ("step",)},
            "push_in_step_s": med([r["time/push"] for r in steps]),
            "push_alone_s": med([p["time/push"] for p in pushes]),
            "rollout_load_s": med([p["time/push_rollout"] for p in pushes]),
            "reward_load_s": med([p["time/push_reward"] for p in pushes]),
            "moved": pushes[-1]["push/bytes_moved"], "rollout_bytes": pushes[-1]["push/lora_bytes"],
            "bundle": {"lora": part(bundle.lora), "adapter": part(bundle.adapter),
                       "mask_decoder": part(bundle.mask_decoder)},
            "expected": expected, "receivers": args.rollout_workers + args.reward_workers,
            "rollout_workers": args.rollout_workers, "reward_workers": args.reward_workers}


def tables(r: dict) -> str:
    kib = lambda b: f"{b / 1024:.1f}"  # noqa: E731
    b, e, ph = r["bundle"], r["expected"], r["phases"]
    total_b, total_e = sum(b.values()), sum(e.values())
    lines = ["| part | bundle KiB | trainable params KiB (independent count) |", "|---|---|---|"]
    lines += [f"| {k} | {kib(b[k])} | {kib(e[k])} |" for k in ("lora", "adapter", "mask_decoder")]
    lines += [f"| **total** | **{kib(total_b)}** | **{kib(total_e)}** |", "",
              "| push (median) | s | share of step |", "|---|---|---|",
              f"| inside a GRPO step | {r['push_in_step_s']:.3f} | {100 * r['push_in_step_s'] / ph['step']:.2f}% |",
              f"| alone ({r['receivers']} receivers) | {r['push_alone_s']:.3f} | "
              f"{100 * r['push_alone_s'] / ph['step']:.2f}% |",
              f"| of which: rollout workers load the LoRA | {r['rollout_load_s']:.3f} | |",
              f"| of which: reward workers load adapter + decoder (overlaps) | {r['reward_load_s']:.3f} | |", "",
              f"Bytes moved per push: {r['moved']:.0f} = LoRA {r['rollout_bytes']:.0f} x {r['rollout_workers']} rollout "
              f"workers + adapter and mask decoder {total_b - r['rollout_bytes']:.0f} x {r['reward_workers']} reward workers "
              f"(bundle {'equal to' if total_b == total_e else 'DIFFERENT from'} the trainable parameter bytes).", "",
              "| phase | median s | share of step |", "|---|---|---|"]
    lines += [f"| {p} | {ph[p]:.2f} | {100 * ph[p] / ph['step']:.1f}% |" for p in PHASES]
    other = ph["step"] - sum(ph[p] for p in PHASES)
    lines += [f"| other (batch, advantages, logging) | {other:.2f} | {100 * other / ph['step']:.1f}% |",
              f"| **step** | **{ph['step']:.2f}** | 100% |"]
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4, help="timed GRPO steps")
    ap.add_argument("--warmup", type=int, default=1, help="GRPO steps run first and not timed")
    ap.add_argument("--pushes", type=int, default=5, help="extra pushes timed on their own")
    ap.add_argument("--rollout-workers", type=int, default=2)
    ap.add_argument("--reward-workers", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--record", action="store_true", help="append the tables to bench/RESULTS.md")
    args = ap.parse_args(argv)
    result = run(args)
    text = tables(result)
    print(text)
    if args.record:
        record("Weight push and step phases",
               f"Tiny preset, 4 prompts x G=8 per step, 1 learner + {args.rollout_workers} rollout + "
               f"{args.reward_workers} reward workers, {result['steps']} timed steps after {args.warmup} warm-up, "
               f"{args.pushes} pushes alone; driver start {result['start_s']:.0f} s.\n\n{text}")
    return result


if __name__ == "__main__":
    main()
