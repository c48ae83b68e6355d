"""`coreseg plan`: the memory a config needs, per process and role, and the GPUs it asks for, from arithmetic.

Nothing is loaded: parameter counts come from the policy's config.json (a local folder) or from the family's
known shapes (the tiny/small presets, the public Qwen2.5-VL sizes), SAM's from its modules built on the meta
device. Every row is a formula over those counts; the formulas are the pure functions below, each stated in its
docstring. Frameworks add their own overhead on top (CUDA context, allocator slack, Python and libraries), so a
measured peak is larger than the sum of the tensors counted here.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

GIB = 1024 ** 3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# system prompt + question + chat markup around the image, in tokens (the synthetic and ComLesion questions
# render to 60-100; a rough figure, next to ~1.4k vision tokens of a 1024² image)
PROMPT_TEXT_TOKENS = 100


@dataclass(frozen=True)
class PolicyShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    v_hidden: int
    v_depth: int
    v_intermediate: int
    patch: int = 14
    merge: int = 2
    temporal_patch: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 16384  # Qwen2.5-VL's processor default (12.8 MP)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def shape_from_config(config: dict, processor: Optional[dict] = None) -> PolicyShape:
    """A PolicyShape from a Qwen2.5-VL-style config.json (text keys at the top level or under text_config)
    and, when given, preprocessor_config.json's pixel budget."""
    text = {**config, **config.get("text_config", {})}
    vision = config["vision_config"]
    processor = processor or {}
    size = processor.get("size") or {}
    return PolicyShape(
        hidden=text["hidden_size"], layers=text["num_hidden_layers"], heads=text["num_attention_heads"],
        kv_heads=text["num_key_value_heads"], intermediate=text["intermediate_size"], vocab=text["vocab_size"],
        tied=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
        v_hidden=vision["hidden_size"], v_depth=vision["depth"], v_intermediate=vision["intermediate_size"],
        patch=vision.get("patch_size", 14), merge=vision.get("spatial_merge_size", 2),
        temporal_patch=vision.get("temporal_patch_size", 2),
        min_pixels=processor.get("min_pixels") or size.get("shortest_edge") or 56 * 56,
        max_pixels=processor.get("max_pixels") or size.get("longest_edge") or 28 * 28 * 16384)


_QWEN_VISION = dict(v_hidden=1280, v_depth=32, v_intermediate=3420)
# config.json values of the public checkpoints (folder name -> shape), for planning before the weights are here
KNOWN_SHAPES: Dict[str, PolicyShape] = {
    "Qwen2.5-VL-3B-Instruct": PolicyShape(hidden=2048, layers=36, heads=16, kv_heads=2, intermediate=11008,
                                          vocab=151936, tied=True, **_QWEN_VISION),
    "Qwen2.5-VL-7B-Instruct": PolicyShape(hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944,
                                          vocab=152064, tied=False, **_QWEN_VISION),
}


def preset_shape(name: str) -> PolicyShape:
    """The tiny/small presets' shape (common/models/policy.py PRESETS; vocabulary rows rounded up as built)."""
    from coreseg.common.models.family import family_for_type
    from coreseg.common.models.policy import PRESETS, TINY_FAMILY

    p = PRESETS[name]
    family = family_for_type(TINY_FAMILY)
    return PolicyShape(hidden=p["hidden"], layers=p["layers"], heads=p["heads"], kv_heads=p["kv_heads"],
                       intermediate=p["inter"], vocab=p["vocab"], tied=False, v_hidden=p["v_hidden"],
                       v_depth=p["v_depth"], v_intermediate=p["v_hidden"] * 2, min_pixels=family.tiny_min_pixels,
                       max_pixels=family.tiny_max_pixels)


def resolve_shape(policy: str) -> Tuple[PolicyShape, str]:
    """(shape, where it came from): a folder's config.json, a preset, or a known public shape by folder name."""
    from coreseg.common.models.policy import PRESETS, size_preset

    if size_preset(policy):
        return preset_shape(size_preset(policy)), f"preset {policy}"
    folder = Path(policy).expanduser()
    if (folder / "config.json").exists():
        proc_file = folder / "preprocessor_config.json"
        proc = json.loads(proc_file.read_text()) if proc_file.exists() else None
        return shape_from_config(json.loads((folder / "config.json").read_text()), proc), f"{folder}/config.json"
    if folder.name in KNOWN_SHAPES:
        return KNOWN_SHAPES[folder.name], f"known shape of {folder.name} (no folder at {folder})"
    raise FileNotFoundError(f"model.policy={policy!r}: no config.json there and not a known shape "
                            f"({', '.join(sorted(KNOWN_SHAPES))}, {', '.join(PRESETS)})")


def lm_linear_shapes(s: PolicyShape) -> Dict[str, Tuple[int, int]]:
    """(in, out) of each linear of one decoder layer."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    return {"q_proj": (s.hidden, q), "k_proj": (s.hidden, kv), "v_proj": (s.hidden, kv), "o_proj": (q, s.hidden),
            "gate_proj": (s.hidden, s.intermediate), "up_proj": (s.hidden, s.intermediate),
            "down_proj": (s.intermediate, s.hidden)}


def lm_params(s: PolicyShape) -> int:
    """Decoder layers (linears, q/k/v biases, 2 RMSNorms) + embedding (+ an untied lm_head) + final norm."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    layer = sum(i * o for i, o in lm_linear_shapes(s).values()) + q + 2 * kv + 2 * s.hidden
    return s.layers * layer + s.vocab * s.hidden * (1 if s.tied else 2) + s.hidden


def vision_params(s: PolicyShape) -> int:
    """Patch embedding (3 x t x p x p -> v, no bias); per block qkv + proj (with biases), SwiGLU MLP (with
    biases), 2 RMSNorms; merger: RMSNorm, then (m² v -> m² v -> LM hidden) with biases."""
    v, vi, m2 = s.v_hidden, s.v_intermediate, s.merge ** 2
    block = (v * 3 * v + 3 * v) + (v * v + v) + (3 * v * vi + 2 * vi + v) + 2 * v
    merger = v + (m2 * v * m2 * v + m2 * v) + (m2 * v * s.hidden + s.hidden)
    return 3 * s.temporal_patch * s.patch ** 2 * v + s.v_depth * block + merger


def lora_params(s: PolicyShape, r: int, targets: Sequence[str]) -> int:
    """r x (in + out) per targeted linear per layer (A: r x in, B: out x r), language model only."""
    shapes = lm_linear_shapes(s)
    unknown = [t for t in targets if t not in shapes]
    if unknown:
        raise ValueError(f"model.lora_target_modules: {unknown} are not linears of the language model "
                         f"({', '.join(shapes)})")
    return s.layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)


def vision_tokens(height: int, width: int, s: PolicyShape) -> int:
    """Qwen2-VL's smart resize: each side rounded to a multiple of f = patch x merge, the area scaled into
    [min_pixels, max_pixels]; one token per f x f block."""
    f = s.patch * s.merge
    h, w = max(f, round(height / f) * f), max(f, round(width / f) * f)
    if h * w > s.max_pixels:
        beta = math.sqrt(height * width / s.max_pixels)
        h, w = max(f, math.floor(height / beta / f) * f), max(f, math.floor(width / beta / f) * f)
    elif h * w < s.min_pixels:
        beta = math.sqrt(s.min_pixels / (height * width))
        h, w = math.ceil(height * beta / f) * f, math.ceil(width * beta / f) * f
    return (h // f) * (w // f)


def trainable_state_bytes(n: int, mixed_precision: bool, zero_stage: int, ranks: int) -> Dict[str, float]:
    """Weights, gradients and Adam state of n trainable parameters per rank (the ZeRO paper's accounting):
    mixed precision keeps 2-byte weights and gradients and 12 bytes of fp32 master weights + m + v; fp32
    keeps 4 + 4 and 8 (m, v). ZeRO stage >= 1 splits the optimizer state over the ranks, >= 2 the gradients,
    3 the weights."""
    w = g = 2 if mixed_precision else 4
    opt = 12 if mixed_precision else 8
    split = lambda stage: ranks if zero_stage >= stage else 1  # noqa: E731
    return {"weights": n * w / split(3), "gradients": n * g / split(2), "optimizer": n * opt / split(1)}


def activation_bytes_per_token_layer(s: PolicyShape, dtype_bytes: int) -> int:
    """What autograd keeps per token in one decoder layer (SDPA attention: no T² scores kept):
    10 h values (2 norm inputs and outputs, q, rotated q, attention output, o_proj output, 2 residual sums),
    4 kv (k, v, rotated k, and the repeated-kv view SDPA saves), 4 I (gate, up, act(gate), act(gate) x up),
    in the model dtype, + the fp32 copies the 2 RMSNorms keep (2 x 4 h bytes)."""
    kv = s.kv_heads * s.head_dim
    return dtype_bytes * (10 * s.hidden + 4 * kv + 4 * s.intermediate) + 8 * s.hidden


def learner_activation_bytes(s: PolicyShape, tokens: int, dtype_bytes: int, checkpointing: bool) -> float:
    """Without checkpointing: every layer's activations (above) x tokens. With: each layer's input
    (h values per token) + one layer's activations recomputed in backward."""
    per_layer = activation_bytes_per_token_layer(s, dtype_bytes) * tokens
    if not checkpointing:
        return s.layers * per_layer
    return s.layers * s.hidden * dtype_bytes * tokens + per_layer


def logits_bytes(s: PolicyShape, rows: int, window: int, dtype_bytes: int) -> float:
    """Logits over the completion window in the model dtype, their float32 copy and its gradient."""
    return rows * window * s.vocab * (dtype_bytes + 4 + 4)


def kv_bytes_per_token(s: PolicyShape, dtype_bytes: int) -> int:
    """K and V of every layer: 2 x layers x kv_heads x head_dim values."""
    return 2 * s.layers * s.kv_heads * s.head_dim * dtype_bytes


def sam_encoder_peak_bytes(image_size: int, heads: int, embed_dim: int, batch: int = 1, dtype_bytes: int = 4) -> float:
    """SAM's ViT at full resolution materialises a global attention block's scores and their softmax
    (heads x N² each, N = (size/16)² tokens) + ~8 N x embed activations, per image of the encoder batch."""
    n = (image_size // 16) ** 2
    return batch * (2 * heads * n * n + 8 * n * embed_dim) * dtype_bytes


@dataclass
class Row:
    role: str
    item: str
    formula: str
    nbytes: float


@dataclass
class Plan:
    device: str  # gpu | cpu
    shape_source: str
    rows: List[Row] = field(default_factory=list)
    per_process: Dict[str, float] = field(default_factory=dict)  # role -> bytes per process (its GPU on GPU)
    per_gpu: Dict[str, float] = field(default_factory=dict)  # GPU kind -> bytes
    gpus: Dict[str, int] = field(default_factory=dict)
    facts: Dict[str, float] = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)

    def add(self, role: str, item: str, formula: str, nbytes: float) -> None:
        self.rows.append(Row(role, item, formula, float(nbytes)))
        self.per_process[role] = self.per_process.get(role, 0.0) + float(nbytes)


SAM_HEADS = {"vit_b": 12, "vit_l": 16, "vit_h": 16}


def sam_counts(sam_type: str) -> Dict[str, int]:
    """Parameters of SAM's image encoder, prompt encoder and mask decoder, the encoder's image size, width and
    heads, built on the meta device (no memory, no checkpoint)."""
    import torch

    from coreseg.common.models.sam import build_tiny_sam

    if sam_type == "tiny":
        sam = build_tiny_sam()
        heads, width = 2, 64
    else:
        from segment_anything import sam_model_registry

        from coreseg.common.models.sam import SAM_TYPES

        arch = SAM_TYPES[sam_type][0]  # medsam is a vit_b
        with torch.device("meta"):
            sam = sam_model_registry[arch](checkpoint=None)
        heads, width = SAM_HEADS[arch], sam.image_encoder.patch_embed.proj.out_channels
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    grid = sam.prompt_encoder.image_embedding_size[0]
    return {"encoder": count(sam.image_encoder), "prompt_encoder": count(sam.prompt_encoder),
            "mask_decoder": count(sam.mask_decoder), "image_size": sam.image_encoder.img_size, "heads": heads,
            "width": width, "embedding": sam.prompt_encoder.embed_dim * grid * grid}


def adapter_params(hidden: int, queries: int, blocks: int) -> int:
    from coreseg.common.models.adapter import build_adapter

    return sum(p.numel() for p in build_adapter(hidden, queries, blocks).parameters())


def gpus_needed(c) -> Dict[str, int]:
    """GPUs per role: whole GPUs for whole shares, fractional shares packed (ceil of the sum); colocated
    rollout engines use the learner's GPUs."""
    learner = math.ceil(c.learner_workers * c.learner_gpus - 1e-9)
    rollout = 0 if c.colocate else math.ceil(c.rollout_workers * c.rollout_gpus_per_worker - 1e-9)
    reward = math.ceil(c.reward_workers * c.reward_gpus_per_worker - 1e-9)
    return {"learner": learner, "rollout": rollout, "reward": reward, "total": learner + rollout + reward}


def make_plan(cfg, gpu_mem_gib: float = 80.0, image_size: int = 1024,
              prompt_text_tokens: int = PROMPT_TEXT_TOKENS) -> Plan:
    """Memory per process of each role for `cfg` (a TrainConfig) on square images of `image_size` px."""
    c, L, R, M = cfg.cluster, cfg.learner, cfg.rollout, cfg.model
    shape, source = resolve_shape(M.policy)
    # an image budget in the config (model.min_pixels / model.max_pixels) replaces the processor's
    budget = {k: getattr(M, k, 0) for k in ("min_pixels", "max_pixels")}
    shape = replace(shape, **{k: v for k, v in budget.items() if v})
    on_gpu = c.learner_gpus > 0
    dtype = M.dtype if M.dtype != "auto" else ("bfloat16" if on_gpu else "float32")
    b = DTYPE_BYTES[dtype]
    p = Plan(device="gpu" if on_gpu else "cpu", shape_source=source)
    n_lm, n_vis = lm_params(shape), vision_params(shape)
    n_lora = lora_params(shape, M.lora_r, M.lora_target_modules)
    sam = sam_counts(M.sam_type)
    n_sam = sam["encoder"] + sam["prompt_encoder"] + sam["mask_decoder"]
    n_heads = adapter_params(shape.hidden, M.adapter_queries, M.adapter_mlp_blocks) + (
        sam["mask_decoder"] if M.train_mask_decoder else 0)
    vis_tok = vision_tokens(image_size, image_size, shape)
    prompt = vis_tok + prompt_text_tokens
    seq = prompt + R.max_new_tokens
    rows = min(L.micro_batch_size, cfg.data.batch_size * R.group_size)
    tokens = rows * seq
    p.facts.update(lm_params=n_lm, vision_params=n_vis, lora_params=n_lora, head_params=n_heads, sam_params=n_sam,
                   vision_tokens=vis_tok, prompt_tokens=prompt, sequence_tokens=seq, micro_batch_rows=rows,
                   dtype_bytes=b)
    # learner rank
    ranks = c.learner_workers
    w = "/ ranks" if L.zero_stage >= 3 else ""
    p.add("learner", "policy weights", f"({n_lm:,} LM + {n_vis:,} vision) x {b} B {w}",
          (n_lm + n_vis) * b / (ranks if L.zero_stage >= 3 else 1))
    state = trainable_state_bytes(n_lora + n_heads, mixed_precision=b == 2, zero_stage=L.zero_stage, ranks=ranks)
    p.add("learner", "LoRA + adapter + decoder: weights, grads, Adam",
          f"{n_lora:,} LoRA + {n_heads:,} heads; ZeRO-{L.zero_stage} over {ranks} rank(s), "
          f"{'2+2+12' if b == 2 else '4+4+8'} B/param", sum(state.values()))
    with_ckpt = learner_activation_bytes(shape, tokens, b, True)
    without = learner_activation_bytes(shape, tokens, b, False)
    per = activation_bytes_per_token_layer(shape, b)
    p.facts.update(activations_with_checkpointing=with_ckpt, activations_without_checkpointing=without)
    p.add("learner", f"LM activations, checkpointing {'on' if L.gradient_checkpointing else 'off'}",
          f"{rows} rows x {seq} tokens; {per:,} B/token/layer x {shape.layers} layers"
          + (" (on: layer inputs + 1 layer)" if L.gradient_checkpointing else ""),
          with_ckpt if L.gradient_checkpointing else without)
    window = R.max_new_tokens + 1
    p.add("learner", "logits over the completion window", f"{rows} x {window} x {shape.vocab:,} x ({b}+4+4) B",
          logits_bytes(shape, rows, window, b))
    # an SFT micro-batch holds up to micro_batch_size distinct images; the encoder takes up to 8 at once
    images = min(8, L.micro_batch_size, cfg.data.batch_size)
    p.add("learner", "SAM (frozen) + encoder peak", f"{n_sam:,} x {b} B + {images} image(s) at {sam['image_size']} px",
          n_sam * b + sam_encoder_peak_bytes(sam["image_size"], sam["heads"], sam["width"], images, b))
    p.add("learner", "SAM embedding cache (its bound)",
          f"learner.embed_cache_bytes = {L.embed_cache_bytes // (sam['embedding'] * 4):,} images of "
          f"{sam['embedding'] * 4:,} B (fp32)", L.embed_cache_bytes)
    if L.packed:  # packed batches keep the frozen vision tower's output per image in a second cache, same bound
        feature = vis_tok * shape.hidden * b
        p.add("learner", "vision-feature cache (its bound; learner.packed)",
              f"learner.embed_cache_bytes = {L.embed_cache_bytes // feature:,} images of {vis_tok:,} x "
              f"{shape.hidden:,} x {b} B", L.embed_cache_bytes)
    # rollout engine
    kv_tok = kv_bytes_per_token(shape, b)
    step_tokens = math.ceil(cfg.data.batch_size / max(1, c.rollout_workers)) * (prompt + R.group_size * R.max_new_tokens)
    weights = (n_lm + n_vis) * b / R.tensor_parallel_size
    p.facts.update(kv_bytes_per_token=kv_tok, rollout_step_tokens=step_tokens)
    p.add("rollout", "vLLM weights", f"({n_lm:,} + {n_vis:,}) x {b} B / TP {R.tensor_parallel_size}", weights)
    if on_gpu:
        budget = R.gpu_memory_utilization * gpu_mem_gib * GIB
        kv = budget - weights
        p.add("rollout", "vLLM KV cache + activations", f"gpu_memory_utilization {R.gpu_memory_utilization} x "
              f"{gpu_mem_gib:g} GiB - weights", kv)
    else:
        # vLLM-CPU packs every linear's weight for oneDNN and drops the original, except the lm_head (the
        # embedding when tied), whose original stays beside the packed copy (vocab_parallel_embedding.py)
        p.add("rollout", "vLLM-CPU packed lm_head copy", f"{shape.vocab:,} x {shape.hidden:,} x {b} B",
              shape.vocab * shape.hidden * b)
        kv = R.cpu_kv_cache_gb * GIB
        p.add("rollout", "vLLM KV cache", f"rollout.cpu_kv_cache_gb {R.cpu_kv_cache_gb}", kv)
    p.facts["kv_capacity_tokens"] = kv / kv_tok
    if kv < R.max_model_len * kv_tok:
        p.warnings.append(f"rollout: the KV cache ({kv / GIB:.2f} GiB) cannot hold one sequence of "
                          f"rollout.max_model_len={R.max_model_len} tokens ({kv_tok:,} B per token); vLLM will not start")
    elif kv < step_tokens * kv_tok:
        p.warnings.append(f"rollout: a step needs {step_tokens:,} tokens of KV cache per engine, the cache holds "
                          f"{kv / kv_tok:,.0f}: generation runs in waves")
    if seq > R.max_model_len:
        p.warnings.append(f"rollout: prompt {prompt} (+{R.max_new_tokens} new) tokens exceeds rollout.max_model_len="
                          f"{R.max_model_len} at {image_size} px")
    # reward worker
    p.add("reward", "SAM weights (fp32)", f"{n_sam:,} x 4 B", n_sam * 4)
    # a worker scores whole groups: ceil(batch / workers) images a step, up to 8 per encoder batch
    images = min(8, math.ceil(cfg.data.batch_size / c.reward_workers))
    p.add("reward", "SAM encoder peak", f"{images} image(s) x (2 x {sam['heads']} heads x N² x 4 B + 8 N x "
          f"{sam['width']} x 4 B), N = ({sam['image_size']}/16)²",
          sam_encoder_peak_bytes(sam["image_size"], sam["heads"], sam["width"], images))
    p.add("reward", "image-embedding cache (its bound)", f"reward.cache_bytes = "
          f"{cfg.reward.cache_bytes // (sam['embedding'] * 4):,} images", cfg.reward.cache_bytes)
    _per_gpu(p, cfg, gpu_mem_gib)
    return p


def _per_gpu(p: Plan, cfg, gpu_mem_gib: float) -> None:
    """What each kind of GPU holds and the warnings for those that do not fit."""
    c = cfg.cluster
    p.gpus = gpus_needed(c)
    if p.device == "cpu":
        total = (p.per_process["learner"] * c.learner_workers + p.per_process["rollout"] * c.rollout_workers
                 + p.per_process["reward"] * c.reward_workers)
        p.facts["host_total"] = total
        return
    learner, rollout, reward = (p.per_process[r] for r in ("learner", "rollout", "reward"))
    if c.colocate:
        persistent = sum(r.nbytes for r in p.rows if r.role == "learner" and not r.item.startswith(("LM act", "logits")))
        p.per_gpu["learner + sleeping/awake vLLM"] = max(learner, persistent + rollout)
    else:
        p.per_gpu["learner"] = learner
        if c.rollout_gpus_per_worker:
            p.per_gpu["rollout"] = rollout
    if c.reward_gpus_per_worker:
        p.per_gpu["reward"] = reward * max(1, math.floor(1 / c.reward_gpus_per_worker + 1e-9))
    limit = gpu_mem_gib * GIB
    for kind, need in p.per_gpu.items():
        if need > limit:
            p.warnings.append(f"{kind} GPU: needs {need / GIB:.1f} GiB, above --gpu-mem-gib {gpu_mem_gib:g}")
    if not cfg.learner.gradient_checkpointing and p.facts["activations_without_checkpointing"] > 0.5 * limit:
        p.warnings.append("learner: activations without checkpointing take over half the GPU; set "
                          "learner.gradient_checkpointing=true")


def format_plan(p: Plan) -> str:
    f = p.facts
    lines = [f"policy shape: {p.shape_source}; {p.device}; {f['dtype_bytes']} B per weight",
             f"prompt: {f['vision_tokens']} vision + {f['prompt_tokens'] - f['vision_tokens']} text tokens; "
             f"sequence {f['sequence_tokens']}; learner micro-batch {f['micro_batch_rows']} rows",
             f"activations per learner micro-batch: {f['activations_with_checkpointing'] / GIB:.2f} GiB with "
             f"gradient checkpointing, {f['activations_without_checkpointing'] / GIB:.2f} GiB without", "",
             f"{'role':8} {'item':48} {'GiB':>8}  formula"]
    for r in p.rows:
        lines.append(f"{r.role:8} {r.item:48} {r.nbytes / GIB:8.2f}  {r.formula}")
    lines.append("")
    for role, nbytes in p.per_process.items():
        lines.append(f"{role} process total: {nbytes / GIB:.2f} GiB")
    for kind, nbytes in p.per_gpu.items():
        lines.append(f"per GPU ({kind}): {nbytes / GIB:.2f} GiB")
    if p.device == "cpu":
        lines.append(f"all processes on the host: {f['host_total'] / GIB:.2f} GiB (no GPU asked for)")
    g = p.gpus
    lines.append(f"GPUs: {g['total']} (learner {g['learner']}, rollout {g['rollout']}, reward {g['reward']})")
    lines += [f"WARNING: {w}" for w in p.warnings]
    return "\n".join(lines)
