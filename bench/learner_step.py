"""Learner step of a Qwen2.5-VL-3B-shaped policy: step time, peak memory, tokens/s and MFU.

    python bench/learner_step.py                 # CUDA: 3B shape, bf16, LoRA r=64, ZeRO-2, 8 prompts x G=8 x 512
    python bench/learner_step.py --tiny          # CPU: the same code path on a tiny shape (checks it runs)
    python bench/learner_step.py --grad-ckpt --micro 16 --record

The model is a random init from the real Qwen2.5-VL-3B-Instruct config values (nothing is downloaded): the
tokenizer/processor come from the tiny preset (its ids fit in the 3B vocabulary), the processor is set to
keep each image at --image-size px. SAM is vit_b, random init (a checkpoint file written once). One learner step = `LearnerCore.forward`
(old log-probs, reference log-probs with the LoRA disabled, `<seg>` states) + `LearnerCore.update` (GRPO
+ KL + DiceCE, micro-batches with accumulation, one AdamW step), exactly what the driver calls.

MFU = model FLOPs / (time x peak bf16 dense FLOP/s). Model FLOPs count what the step must compute, not
recomputation (so gradient checkpointing lowers MFU, as it should): per forward, 2 x params x tokens for
every matmul (LM linears, the lm_head on the kept logit positions, vision linears on the patches) plus
causal attention 2 x T^2 x d_attn per LM layer; per backward (update only), activation gradients = 1x the
LM matmuls and lm_head + 2x attention (the base weights are frozen: no weight gradients except LoRA's, which
are counted at 2 x 3 x LoRA params x tokens for forward+backward).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.recording import record  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Qwen2.5-VL-3B-Instruct config.json values (text + vision).
QWEN25VL_3B = dict(hidden=2048, layers=36, heads=16, kv_heads=2, inter=11008, vocab=151936, rms_eps=1e-6,
                   mrope=[16, 24, 24], tie=True, v_hidden=1280, v_depth=32, v_heads=16, v_inter=3420,
                   v_fullatt=[7, 15, 23, 31])
TINY = dict(hidden=128, layers=2, heads=4, kv_heads=2, inter=256, vocab=4096, rms_eps=1e-6, mrope=[4, 6, 6],
            tie=True, v_hidden=64, v_depth=2, v_heads=4, v_inter=128, v_fullatt=[1])
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}  # dense tensor-core FLOP/s


def build_policy_folder(shape: dict, out: Path, image_size: int, device: str) -> Path:
    """Random-init Qwen2.5-VL of `shape` + the tiny preset's tokenizer and a processor for `image_size`."""
    import torch
    from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from coreseg.common.models.family import family_for_type
    from coreseg.common.models.policy import ensure_policy_dir

    if (out / "config.json").exists():
        return out
    tiny_dir = ensure_policy_dir("tiny", ROOT / ".cache" / "coreseg")
    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                      "<|vision_end|>", "<|im_end|>", "<|endoftext|>")}
    s = shape
    text = dict(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["inter"],
                num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                max_position_embeddings=128000, rms_norm_eps=s["rms_eps"], tie_word_embeddings=s["tie"],
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": s["mrope"]},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                use_sliding_window=False)
    vision = dict(depth=s["v_depth"], hidden_size=s["v_hidden"], intermediate_size=s["v_inter"],
                  num_heads=s["v_heads"], out_hidden_size=s["hidden"], patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=112, fullatt_block_indexes=s["v_fullatt"])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                              video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                              vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=s["tie"],
                              architectures=["Qwen2_5_VLForConditionalGeneration"])
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2_5_VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(str(tmp), safe_serialization=True)
    del model
    pixels = image_size * image_size
    family_for_type("qwen2_5_vl").tiny_processor(tok, min_pixels=pixels, max_pixels=pixels).save_pretrained(str(tmp))
    tmp.rename(out)
    return out


def make_batch(core, prompts: int, group: int, tokens: int, image_size: int, seed: int):
    """Synthetic prompts (one image each) and G random completions of exactly `tokens` tokens, each ending
    with `<seg>` ... end of turn so the DiceCE path runs on every completion; the prompt ids are those an
    engine gives (the family's rendered prompt through the processor)."""
    import numpy as np

    from coreseg.common.protocol import Completion, RolloutGroup
    from coreseg.common.synth import generate

    samples = generate(prompts, image_size=image_size, seed=seed, progress=False)
    rng = np.random.default_rng(seed)
    info, tokenizer = core.module.info, core.module.processor.tokenizer
    seg_id, end = info.seg_token_id, info.end_of_turn_id
    high = len(tokenizer) - 64  # ordinary tokens, not the added specials at the top
    groups = []
    for s in samples:
        prompt = core.encoder.encode(s)["input_ids"][0].tolist()
        comps = []
        for _ in range(group):
            ids = rng.integers(300, high, size=tokens).tolist()
            ids[-8], ids[-1] = seg_id, end
            comps.append(Completion("", prompt, ids, [0.0] * tokens, "stop", 0))
        groups.append(RolloutGroup(s.id, comps))
    advantages = rng.standard_normal(prompts * group)
    return samples, groups, advantages


def step_flops(core, batch_shapes, lora_params: int) -> dict:
    """Model FLOPs of one forward (old+ref passes) and one update over the batch (see module docstring)."""
    text = core.module.policy.base_model.model.config.get_text_config()
    vision = core.module.policy.base_model.model.config.vision_config
    h, L = text.hidden_size, text.num_hidden_layers
    d_attn = text.num_attention_heads * (h // text.num_attention_heads)
    kv = text.num_key_value_heads * (h // text.num_attention_heads)
    per_layer = h * d_attn + 2 * h * kv + d_attn * h + 3 * h * text.intermediate_size
    lm_linear = L * per_layer
    head = h * text.vocab_size
    vh = vision.hidden_size
    vis_linear = vision.depth * (4 * vh * vh + 3 * vh * vision.intermediate_size) + (4 * vh * 4 * vh + 4 * vh * h) / 4
    fwd = bwd = 0.0
    for seq_len, logit_positions, patches in batch_shapes:
        attn = 2 * L * seq_len * seq_len * d_attn  # QK^T + AV, causal half: 2*(2*T^2*d)/2
        lin = 2 * lm_linear * seq_len + 2 * head * logit_positions
        fwd += lin + attn + 2 * vis_linear * patches
        bwd += lin + 2 * attn
    lora = 6 * lora_params * sum(s for s, _, _ in batch_shapes)
    return {"forward": 2 * fwd, "update": fwd + bwd + lora}  # forward = policy pass + reference pass


def random_sam_checkpoint(sam_type: str, work_dir: str) -> str:
    """A random-init SAM checkpoint under work_dir, written once, loaded like a real one."""
    from coreseg.common.models.sam import save_random_sam

    path = Path(work_dir) / f"sam-{sam_type}-random.safetensors"
    return str(path if path.exists() else save_random_sam(sam_type, path))


def run(args) -> dict:
    import numpy as np
    import torch

    from coreseg.common.config import load_config
    from coreseg.learner.batch import build_batch, logits_window
    from coreseg.learner.grpo import loss_norm
    from coreseg.learner.worker import LearnerCore

    on_gpu = torch.cuda.is_available() and not args.tiny
    shape = TINY if args.tiny else QWEN25VL_3B
    folder = Path(args.work_dir) / ("policy-tiny-bench" if args.tiny else "policy-qwen25vl3b-shape")
    t0 = time.perf_counter()
    policy_dir = build_policy_folder(shape, folder, args.image_size, "cuda" if on_gpu else "cpu")
    build_s = time.perf_counter() - t0
    overrides = [f"model.lora_r={args.lora_r}", f"model.lora_alpha={2 * args.lora_r}", "model.lora_dropout=0.0",
                 f"model.sam_type={'tiny' if args.tiny else 'vit_b'}",
                 f"model.sam_checkpoint={'' if args.tiny else random_sam_checkpoint('vit_b', args.work_dir)}",
                 f"learner.micro_batch_size={args.micro}", f"learner.zero_stage={args.zero}",
                 f"learner.gradient_checkpointing={args.grad_ckpt}", f"rollout.max_new_tokens={args.tokens}",
                 "learner.kl_beta=0.01", "learner.mask_loss_weight=1.0",
                 f"cluster.learner_gpus={1 if on_gpu else 0}"]  # the learner's device comes from the config
    cfg = load_config("tiny_cpu", overrides)
    t0 = time.perf_counter()
    core = LearnerCore(cfg, str(policy_dir), master_port=args.port)
    load_s = time.perf_counter() - t0
    samples, groups, adv = make_batch(core, args.prompts, args.group, args.tokens, args.image_size, args.seed)
    flat = [s for s in samples for _ in range(args.group)]
    comps = [c.token_ids for g in groups for c in g.completions]
    shapes = []
    for a in range(0, len(comps), args.micro):
        batch = build_batch(core.encoder, flat[a:a + args.micro], comps[a:a + args.micro], core.pad_id)
        patches = int(batch.extra_inputs["pixel_values"].shape[0])
        T = batch.input_ids.shape[1]
        shapes += [(T, logits_window(batch), patches // len(batch.prompt_lens))] * len(batch.prompt_lens)
    lora_params = sum(p.numel() for p in core.module.param_groups()[0])
    flops = step_flops(core, shapes, lora_params)
    n_tokens = sum(t for t, _, _ in shapes)
    norm = loss_norm([args.tokens] * len(comps), len(comps), "token_mean")

    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    times = {"forward": [], "update": []}
    for step in range(args.warmup + args.steps):
        if step == args.warmup and on_gpu:
            torch.cuda.reset_peak_memory_stats()
        sync()
        t0 = time.perf_counter()
        for c in (c for g in groups for c in g.completions):
            c.version = core.version  # on-policy, as in a synchronous run
        fwd = core.forward(groups, samples)
        sync()
        t1 = time.perf_counter()
        stats = core.update(groups, samples, adv, fwd.ref_logprobs, norm)
        sync()
        t2 = time.perf_counter()
        if step >= args.warmup:
            times["forward"].append(t1 - t0)
            times["update"].append(t2 - t1)
        print(f"step {step}: forward {t1 - t0:.2f}s update {t2 - t1:.2f}s loss {stats['pg_loss']:+.4f} "
              f"dice_ce {stats['dice_ce']:.3f} grad_norm {stats['grad_norm']:.3f}", flush=True)
    fwd_s, upd_s = float(np.median(times["forward"])), float(np.median(times["update"]))
    step_s = fwd_s + upd_s
    name = torch.cuda.get_device_name() if on_gpu else "cpu"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else next(
        (v for k, v in PEAK_BF16.items() if k in name), float("nan"))
    out = dict(device=name, shape="tiny" if args.tiny else "qwen2.5-vl-3b", prompts=args.prompts, group=args.group,
               completion_tokens=args.tokens, image_size=args.image_size, micro_batch=args.micro, zero=args.zero,
               grad_ckpt=args.grad_ckpt, lora_r=args.lora_r, lora_params=lora_params,
               seq_tokens=n_tokens, completion_tokens_total=len(comps) * args.tokens,
               forward_s=fwd_s, update_s=upd_s, step_s=step_s,
               tokens_per_s=n_tokens / step_s, completion_tokens_per_s=len(comps) * args.tokens / step_s,
               tflops_step=(flops["forward"] + flops["update"]) / 1e12,
               mfu_step=(flops["forward"] + flops["update"]) / step_s / peak,
               mfu_forward=flops["forward"] / fwd_s / peak, mfu_update=flops["update"] / upd_s / peak,
               peak_mem_gib=(torch.cuda.max_memory_allocated() / 2 ** 30) if on_gpu else float("nan"),
               peak_reserved_gib=(torch.cuda.max_memory_reserved() / 2 ** 30) if on_gpu else float("nan"),
               build_s=build_s, load_s=load_s)
    return out


def title(r: dict) -> str:
    return f"Learner step ({r['shape']}, {r['device']})"


def markdown(r: dict) -> str:
    return "\n".join([
        f"{r['prompts']} prompts x G={r['group']} x {r['completion_tokens']} completion tokens, one "
        f"{r['image_size']} px image each; LoRA r={r['lora_r']} ({r['lora_params'] / 1e6:.1f} M params), "
        f"ZeRO-{r['zero']}, micro-batch {r['micro_batch']}, gradient checkpointing {r['grad_ckpt']}.", "",
        "| forward s | update s | step s | tokens/s (all) | completion tokens/s | TFLOP/step | MFU step | "
        "MFU fwd | MFU update | peak mem GiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {r['forward_s']:.2f} | {r['update_s']:.2f} | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} | "
        f"{r['completion_tokens_per_s']:.0f} | {r['tflops_step']:.1f} | {r['mfu_step']:.1%} | "
        f"{r['mfu_forward']:.1%} | {r['mfu_update']:.1%} | {r['peak_mem_gib']:.1f} |", ""])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny shape on CPU (checks the code path)")
    p.add_argument("--prompts", type=int, default=None)
    p.add_argument("--group", type=int, default=None)
    p.add_argument("--tokens", type=int, default=None, help="completion tokens per rollout")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--micro", type=int, default=None, help="learner.micro_batch_size")
    p.add_argument("--lora-r", type=int, default=64)
    p.add_argument("--zero", type=int, default=2)
    p.add_argument("--grad-ckpt", action="store_true")
    p.add_argument("--steps", type=int, default=None, help="measured steps (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=29517)
    p.add_argument("--peak-tflops", type=float, default=None, help="override the device's peak bf16 TFLOP/s")
    p.add_argument("--work-dir", default=str(ROOT / ".cache" / "bench"))
    p.add_argument("--json", default=None, help="write the result here")
    p.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = p.parse_args(argv)
    defaults = dict(prompts=2, group=2, tokens=32, image_size=112, micro=2, steps=2) if args.tiny else \
        dict(prompts=8, group=8, tokens=512, image_size=448, micro=8, steps=3)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    result = run(args)
    print(json.dumps(result, indent=1))
    print(f"## {title(result)}\n\n{markdown(result)}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.record:
        record(title(result), markdown(result))  # with the date, the command and the machine
    return result


if __name__ == "__main__":
    main()
