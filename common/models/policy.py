"""Policy builders: the tiny/small Qwen2.5-VL presets (built in-process, saved once to a folder that
transformers and vLLM both load) and the loader for a real local model folder of any registered family
(`common.models.family`).

`<seg>` must get an id inside the model's existing embedding rows, so the base weights are never resized
and vLLM only ever receives LoRA deltas.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from coreseg.common.models.align import AlignSpec
from coreseg.common.models.family import ModelFamily, family_for_type, model_family

# Presets: (hidden, layers, heads, kv_heads, intermediate, vision hidden, vision depth, vocab, spare rows)
PRESETS = {
    # head_dim 32: vLLM's CPU attention supports it; mrope sections sum to head_dim / 2.
    "tiny": dict(hidden=128, layers=2, heads=4, kv_heads=2, inter=256, v_hidden=64, v_depth=2, v_heads=4,
                 vocab=2048, mrope=[4, 6, 6]),
    # ~40M parameters: the "small" size the rollout benchmark uses.
    "small": dict(hidden=512, layers=8, heads=8, kv_heads=4, inter=1536, v_hidden=256, v_depth=4, v_heads=4,
                  vocab=2048, mrope=[8, 12, 12]),
}
# Presets whose folder is a size preset's random build after the stand-in alignment stage
# (common/models/align.py): name -> (size preset, its AlignSpec). The folder name carries the spec's recipe tag.
ALIGNED_PRESETS = {
    # what the recipe does and does not teach: bench/align_probe.py records (RESULTS.md, 2026-12-07; recipe a2
    # without vision_position at 2026-12-06 23:30 UTC, a1 at 23:13)
    "tiny-aligned": ("tiny", AlignSpec(samples=3000, steps=4000, batch_size=8, lr=3e-3, train_vision=False,
                                       vision_steps=1000, vision_position=True, rope_theta=100.0,
                                       mrope_section=(1, 3, 12), recipe="a3")),
}
SPARE_ROWS = 64
LM_HEAD_SCALE = 8.0
RECIPE = "v3"  # bump when the tiny build changes, so cached folders are rebuilt
TINY_FAMILY = "qwen2_5_vl"  # the family the tiny/small presets are built as


class ModelPathError(FileNotFoundError):
    pass


@dataclass
class PolicyInfo:
    path: str
    family: ModelFamily
    seg_token_id: int
    image_token_id: int
    vision_token_ids: tuple  # never sampled in a completion
    end_of_turn_id: int  # generation stops there


def default_dtype(requested: str = "auto", device: str | torch.device = "cpu") -> torch.dtype:
    """float32 on CPU (bf16 is much slower without AVX-512 bf16); bf16 on GPU."""
    if requested != "auto":
        return getattr(torch, requested)
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def build_tiny_policy(out_dir: str | Path, preset: str = "tiny", seed: int = 0, corpus_samples: int = 300) -> Path:
    """Train the tokenizer, build a random-init Qwen2.5-VL of the preset's size and save everything."""
    from transformers import AutoTokenizer

    from coreseg.common.models.tokenizer import save_hf_tokenizer, train_tokenizer, training_corpus
    from coreseg.common.synth import generate

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    corpus = [s for style in ("short", "detailed") for s in generate(corpus_samples, seed=12345, progress=False, reasoning=style)]
    family = family_for_type(TINY_FAMILY)
    tok = train_tokenizer(training_corpus(corpus), family, vocab_size=PRESETS[preset]["vocab"] - SPARE_ROWS)
    save_hf_tokenizer(tok, tmp, family)
    hf_tok = AutoTokenizer.from_pretrained(str(tmp))
    vocab_rows = ((len(hf_tok) + SPARE_ROWS + 63) // 64) * 64  # spare rows beyond the vocabulary, as in Qwen
    config = family.tiny_config(PRESETS[preset], vocab_rows, hf_tok)
    torch.manual_seed(seed)
    model = family.model_class()(config).to(torch.float32)
    with torch.no_grad():
        # With a frozen lm_head at std 0.02 the largest reachable logit margin is ~3 (final RMSNorm fixes the
        # hidden norm), so LoRA-only SFT could never fit the templates; a trained model's head is far larger.
        model.lm_head.weight.mul_(LM_HEAD_SCALE)
    model.save_pretrained(str(tmp), safe_serialization=True)
    family.tiny_processor(hf_tok).save_pretrained(str(tmp))
    (tmp / "coreseg.json").write_text(json.dumps({"preset": preset, "seed": seed}))
    tmp.rename(out_dir) if not out_dir.exists() else None
    return out_dir


def size_preset(policy: str) -> Optional[str]:
    """The PRESETS size a built-in policy name has (`tiny-aligned` -> `tiny`); None for a folder path."""
    if policy in PRESETS:
        return policy
    return ALIGNED_PRESETS[policy][0] if policy in ALIGNED_PRESETS else None


def build_aligned_policy(out_dir: str | Path, name: str, plain_dir: str | Path, seed: int = 0,
                         spec: Optional[AlignSpec] = None, log=None) -> Path:
    """The size preset's random build in `plain_dir` (`build_tiny_policy`, same seed) after the stand-in alignment
    stage (common/models/align.py); `spec` defaults to the preset's. Saved like the plain build (its tokenizer and
    processor files copied unchanged; config.json too, but for the rotary settings the spec names), with the
    stage's losses and time in coreseg.json."""
    from coreseg.common.models.align import align, pretrain_vision, stage_rows

    spec = spec or ALIGNED_PRESETS[name][1]
    out_dir = Path(out_dir)
    staging = out_dir.with_name(out_dir.name + f".staging{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    shutil.copytree(plain_dir, staging)
    if spec.rope_theta or spec.mrope_section:
        config = json.loads((staging / "config.json").read_text())
        rope = config["text_config"]["rope_parameters"]
        rope["rope_theta"] = spec.rope_theta or rope["rope_theta"]
        rope["mrope_section"] = list(spec.mrope_section) or rope["mrope_section"]
        (staging / "config.json").write_text(json.dumps(config, indent=2))
    model, processor = load_policy(staging)
    torch.manual_seed(seed)
    family = policy_info(staging).family
    samples, rows = stage_rows(processor, family, spec, seed)
    stats = pretrain_vision(model, family, spec, seed, samples, rows, log=log) if spec.vision_steps else {}
    stats.update(align(model, processor, family, spec, seed, rows, log=log))
    # only the weights (and the rotary settings the spec names) change: the tokenizer and processor files stay the
    # plain build's, byte for byte
    model.save_pretrained(str(staging / "aligned"), safe_serialization=True)
    for f in (staging / "aligned").glob("*.safetensors"):
        f.replace(staging / f.name)
    shutil.rmtree(staging / "aligned")
    plain_meta = json.loads((Path(plain_dir) / "coreseg.json").read_text())
    meta = {"preset": name, "size": plain_meta["preset"], "seed": seed, "align": {**asdict(spec), **stats}}
    (staging / "coreseg.json").write_text(json.dumps(meta, indent=1))
    if out_dir.exists():  # another process finished the same build first
        shutil.rmtree(staging)
    else:
        staging.rename(out_dir)
    return out_dir


def ensure_policy_dir(policy: str, assets_dir: str | Path = ".cache/coreseg", seed: int = 0) -> Path:
    """A folder transformers and vLLM can load, with `<seg>` in its tokenizer.

    `tiny`/`small` (random init) and `tiny-aligned` (after the stand-in alignment stage) are built once under
    `assets_dir`; a local path is checked and, when its tokenizer lacks `<seg>`, mirrored (weights symlinked)
    with the token added inside the spare embedding rows.
    """
    if policy in PRESETS:
        out = Path(assets_dir) / f"policy-{policy}-{RECIPE}-seed{seed}"
        if not (out / "config.json").exists():
            build_tiny_policy(out, policy, seed)
        return out
    if policy in ALIGNED_PRESETS:
        out = Path(assets_dir) / f"policy-{policy}-{RECIPE}{ALIGNED_PRESETS[policy][1].recipe}-seed{seed}"
        if not (out / "config.json").exists():
            plain = ensure_policy_dir(ALIGNED_PRESETS[policy][0], assets_dir, seed)
            build_aligned_policy(out, policy, plain, seed, log=lambda m: print(f"[{policy} seed {seed}] {m}", flush=True))
        return out
    src = Path(policy).expanduser()
    if not (src / "config.json").exists():
        raise ModelPathError(
            f"model.policy={policy!r}: no model folder with config.json there. Use 'tiny'/'small'/'tiny-aligned' or a "
            f"local folder (e.g. a downloaded Qwen/Qwen2.5-VL-3B-Instruct); nothing is downloaded at run time.")
    from transformers import AutoTokenizer, AutoConfig
    from tokenizers import AddedToken

    seg = model_family(src).seg_token  # an unknown model_type fails here, naming the folder and the known families
    tok = AutoTokenizer.from_pretrained(str(src))
    if seg in tok.get_vocab():
        return src
    out = Path(assets_dir) / f"policy-{src.name}-seg"
    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix in (".safetensors", ".json") and "token" not in f.name and not (out / f.name).exists():
            (out / f.name).symlink_to(f.resolve())
    tok.add_tokens([AddedToken(seg, special=False, normalized=False)])
    rows = AutoConfig.from_pretrained(str(src)).get_text_config().vocab_size
    if tok.convert_tokens_to_ids(seg) >= rows:
        raise ValueError(f"{src}: no spare embedding row for {seg} (vocab {len(tok)} >= rows {rows})")
    tok.save_pretrained(str(out))
    return out


def policy_info(path: str | Path) -> PolicyInfo:
    """The folder's family and the token ids the rest of the code needs."""
    from transformers import AutoTokenizer

    family = model_family(path)
    tok = AutoTokenizer.from_pretrained(str(path))
    return PolicyInfo(path=str(path), family=family, seg_token_id=family.token_id_of(tok, family.seg_token),
                      image_token_id=family.token_id_of(tok, family.image_pad),
                      vision_token_ids=tuple(family.token_id_of(tok, t) for t in family.vision_tokens),
                      end_of_turn_id=family.token_id_of(tok, family.end_of_turn))


def load_processor(path: str | Path, min_pixels: int = 0, max_pixels: int = 0):
    """The folder's processor with the image budget (model.min_pixels / model.max_pixels; 0 keeps the folder's).
    Every path that turns an image into vision tokens loads it here, so they agree on the token count."""
    from transformers import AutoProcessor

    return model_family(path).set_image_budget(AutoProcessor.from_pretrained(str(path)), min_pixels, max_pixels)


def load_policy(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu", min_pixels: int = 0,
                max_pixels: int = 0):
    """(model, processor) from a prepared folder (see `ensure_policy_dir`), with its family's model class."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise ModelPathError(f"no model folder with config.json at {path}")
    model = model_family(path).model_class().from_pretrained(str(path), dtype=dtype).to(device)
    return model, load_processor(path, min_pixels, max_pixels)


def gather_seg_states(hidden: torch.Tensor, input_ids: torch.Tensor, seg_token_id: int,
                      search_mask: Optional[torch.Tensor] = None):
    """Last-layer hidden state at the last `<seg>` of each sequence.

    hidden [B, T, H], input_ids [B, T], search_mask [B, T] (e.g. completion tokens only).
    Returns (states [B, H] (zeros where absent), found [B] bool).
    """
    is_seg = input_ids == seg_token_id
    if search_mask is not None:
        is_seg = is_seg & search_mask.bool()
    found = is_seg.any(dim=1)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    last = torch.where(is_seg, positions, torch.full_like(positions, -1)).max(dim=1).values.clamp(min=0)
    states = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return states * found.unsqueeze(1).to(states.dtype), found
