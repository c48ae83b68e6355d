"""A stand-in alignment stage for the tiny policy presets.

A real Qwen2.5-VL reaches SFT after pre-training and alignment that taught its vision tower to see and its
language model to name what and where things are (grounding). A random-initialised tiny policy has had none of
that: its frozen vision tower cannot tell a lesion from the background, so no box it writes after LoRA SFT is
placed from the image. This stage stands in for that training, once, when the preset's folder is built: the
language model and (unless `train_vision` is False) the vision tower and merger are trained with next-token
cross-entropy on the task's completion (reasoning, boxes, `<seg>`) for synthetic images drawn from a seed no
run's data uses (`ALIGN_SYNTH_SEED`), in the in-distribution modalities only (the OOD modality of `test_ood` is
never shown). The folder then holds these weights; LoRA SFT and GRPO start from them as from a real model.

Optionally (`AlignSpec.vision_steps`) the vision tower is first trained alone, as a real one is pre-trained before
it meets the language model: a linear head on each vision token predicts the lesion coverage of its 7 px cells
(binary cross-entropy); the head is dropped and the tower's output scaled to a mean norm of 1 (unscaled it can
grow far past the scale of the text embeddings), and `train_vision=False` keeps it so through the stage. With
`AlignSpec.vision_position` a second linear head also predicts each token's own row and column in the token grid
(cross-entropy): a pre-trained tower's features carry where in the image they are, and the language model can only
copy a lesion's place into its boxes from the features its attention reads (rotary positions shape which tokens
are read, not what is read).
`AlignSpec.rope_theta` / `mrope_section` give the language model's M-RoPE other frequencies (bench/align_probe.py
measures why: with the tiny build's 1e6 and 4/6/6 sections, one vision-token step barely turns the column section).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import List, Sequence

import numpy as np
import torch

from coreseg.common.data import LesionSample
from coreseg.common.models.family import ModelFamily
from coreseg.common.prompts import SYSTEM_PROMPT

# Synthetic images of the alignment stage come from this seed (+ the policy seed); runs draw their data set from
# data.synth_seed (0 by default), so the images differ from every train/val/test image of such a run.
ALIGN_SYNTH_SEED = 7_000_000


@dataclass(frozen=True)
class AlignSpec:
    samples: int  # distinct synthetic images (in-distribution modalities only)
    steps: int  # optimizer steps over them
    batch_size: int
    lr: float  # AdamW peak rate; linear warm-up over the first 5% of steps, cosine decay to 10%
    recipe: str = ""  # a tag in the built folder's name: change it with any field, so cached folders rebuild
    train_vision: bool = True  # False: the vision tower (and merger) stays as it is; the language model is trained
    vision_steps: int = 0  # steps of the vision tower's own pre-training before the stage (0: none)
    vision_position: bool = False  # that pre-training also teaches each vision token its own row and column
    rope_theta: float = 0.0  # the language model's rope_theta in the built folder (0: the plain build's)
    mrope_section: tuple = ()  # its M-RoPE sections (t, h, w; sum head_dim / 2); (): the plain build's


def alignment_samples(count: int, seed: int, image_size: int = 112) -> List[LesionSample]:
    """`count` synthetic samples of the in-distribution modalities, drawn from ALIGN_SYNTH_SEED + seed."""
    from coreseg.common.synth import MODALITIES, make_sample

    seen = [m for m in MODALITIES if not m.ood]
    return [make_sample(i, seen[i % len(seen)], image_size, ALIGN_SYNTH_SEED + seed, "align")
            for i in range(count)]


def lr_at(step: int, spec: AlignSpec) -> float:
    """Linear warm-up to spec.lr over 5% of the steps, then cosine decay to 10% of it."""
    warm = max(1, spec.steps // 20)
    if step < warm:
        return spec.lr * (step + 1) / warm
    t = (step - warm) / max(1, spec.steps - warm)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def encode_rows(processor, family: ModelFamily, samples: Sequence[LesionSample]) -> List[dict]:
    """Prompt inputs (rendered as SFT renders them) and target completion ids per sample."""
    from PIL import Image

    from coreseg.learner.sft import sft_target_ids

    rows = []
    for s in samples:
        enc = family.encode_prompt(processor, s.question, Image.fromarray(s.image), SYSTEM_PROMPT)
        rows.append({"prompt": enc, "target": sft_target_ids(processor.tokenizer, s, family)})
    return rows


def collate(rows: Sequence[dict], family: ModelFamily, pad_id: int):
    """Padded model inputs and the completion mask ([B, T], 1 at target tokens)."""
    seqs = [torch.cat([r["prompt"]["input_ids"][0], torch.as_tensor(r["target"], dtype=torch.long)]) for r in rows]
    length, B = max(len(s) for s in seqs), len(seqs)
    ids = torch.full((B, length), pad_id, dtype=torch.long)
    attention = torch.zeros((B, length), dtype=torch.long)
    target = torch.zeros((B, length))
    aligned = {k: torch.zeros((B, length), dtype=rows[0]["prompt"][k].dtype) for k in family.token_input_keys}
    for i, (seq, r) in enumerate(zip(seqs, rows)):
        p = r["prompt"]["input_ids"].shape[1]
        ids[i, :len(seq)], attention[i, :len(seq)], target[i, p:len(seq)] = seq, 1, 1
        for k, values in aligned.items():
            values[i, :p] = r["prompt"][k][0]
    images = {k: torch.cat([r["prompt"][k] for r in rows]) for k in family.image_input_keys}
    return {"input_ids": ids, "attention_mask": attention, **aligned, **images}, target


def token_loss(logits: torch.Tensor, input_ids: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the target positions."""
    pred = logits[:, :-1].float()
    labels = input_ids[:, 1:]
    mask = target[:, 1:]
    nll = torch.nn.functional.cross_entropy(pred.reshape(-1, pred.shape[-1]), labels.reshape(-1), reduction="none")
    return (nll * mask.reshape(-1)).sum() / mask.sum().clamp(min=1)


COVER_CELLS = 4  # vision pre-training targets: 4 x 4 cells per vision token (7 px of a 28 px token)


def coverage_targets(sample: LesionSample, token_px: int) -> torch.Tensor:
    """[tokens, COVER_CELLS²]: the lesion fraction of each cell of each `token_px` vision token, raster order."""
    union = sample.union_mask().astype(np.float32)
    g, c = union.shape[0] // token_px, token_px // COVER_CELLS
    cells = union[:g * token_px, :g * token_px].reshape(g, token_px, g, token_px).transpose(0, 2, 1, 3)
    return torch.as_tensor(cells.reshape(g, g, COVER_CELLS, c, COVER_CELLS, c).mean(axis=(3, 5)).reshape(g * g, -1))


def stage_rows(processor, family: ModelFamily, spec: AlignSpec, seed: int):
    """(samples, their encoded rows): the stage's images, shared by the vision pre-training and the stage."""
    samples = alignment_samples(spec.samples, seed)
    return samples, encode_rows(processor, family, samples)


def place_loss(logits: torch.Tensor, token_counts: Sequence[int]) -> torch.Tensor:
    """Cross-entropy of each vision token's own row and column (square grids of `token_counts` tokens, raster
    order) from `logits` [tokens, 2 * max grid]: rows in the first half, columns in the second."""
    half = logits.shape[1] // 2
    grids = [round(math.sqrt(n)) for n in token_counts]
    rows = torch.cat([torch.arange(g * g) // g for g in grids])
    cols = torch.cat([torch.arange(g * g) % g for g in grids])
    ce = torch.nn.functional.cross_entropy
    return ce(logits[:, :half], rows) + ce(logits[:, half:], cols)


def pretrain_vision(model, family: ModelFamily, spec: AlignSpec, seed: int, samples: Sequence[LesionSample],
                    rows: Sequence[dict], log=None) -> dict:
    """Train the vision tower alone on the lesion coverage of the stage's images (`stage_rows`; see the module's
    text), then scale its output to a mean norm of 1. Returns the loss at the ends and the scale."""
    t0 = time.perf_counter()
    vision = model.config.vision_config
    token_px = vision.patch_size * vision.spatial_merge_size
    targets = [coverage_targets(s, token_px) for s in samples]
    hidden = model.config.get_text_config().hidden_size
    head = torch.nn.Linear(hidden, COVER_CELLS ** 2)
    params = list(model.model.visual.parameters()) + list(head.parameters())
    if spec.vision_position:
        place_head = torch.nn.Linear(hidden, 2 * max(round(math.sqrt(len(t))) for t in targets))
        params += list(place_head.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-3)
    rng = np.random.default_rng(ALIGN_SYNTH_SEED + seed)

    def features(pick):
        inputs = [{k: rows[i]["prompt"][k] for k in family.image_input_keys} for i in pick]
        return torch.cat(family.image_features(model, inputs))

    losses = []
    for step in range(spec.vision_steps):
        pick = rng.choice(len(rows), min(16, len(rows)), replace=False)
        feats = features(pick)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(feats), torch.cat([targets[i] for i in pick]))
        if spec.vision_position:
            loss = loss + place_loss(place_head(feats), [len(targets[i]) for i in pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if log is not None and (step % 200 == 0 or step == spec.vision_steps - 1):
            log(f"vision pre-training step {step}/{spec.vision_steps} loss {losses[-1]:.4f}")
    with torch.no_grad():
        scale = float(1.0 / features(range(min(64, len(rows)))).norm(dim=-1).mean())
        last = model.model.visual.merger.mlp[-1]
        last.weight.mul_(scale)
        last.bias.mul_(scale)
    tail = max(1, len(losses) // 10)
    return {"vision_first_loss": float(np.mean(losses[:tail])), "vision_last_loss": float(np.mean(losses[-tail:])),
            "vision_output_scale": scale, "vision_seconds": time.perf_counter() - t0}


def align(model, processor, family: ModelFamily, spec: AlignSpec, seed: int, rows: Sequence[dict], log=None) -> dict:
    """Train `model` in place on the stand-in task over `rows` (`stage_rows`): every parameter, or all but the
    vision tower's (spec.train_vision); returns the loss curve's ends and time."""
    t0 = time.perf_counter()
    pad_id = processor.tokenizer.pad_token_id
    model.train()
    vision = {id(p) for p in model.model.visual.parameters()}
    for p in model.parameters():
        p.requires_grad_(spec.train_vision or id(p) not in vision)
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=spec.lr, weight_decay=0.0)
    rng = np.random.default_rng(ALIGN_SYNTH_SEED + seed)
    order: List[int] = []
    losses = []
    for step in range(spec.steps):
        if len(order) < spec.batch_size:
            order += list(rng.permutation(len(rows)))
        pick, order = order[:spec.batch_size], order[spec.batch_size:]
        inputs, target = collate([rows[i] for i in pick], family, pad_id)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, spec)
        loss = token_loss(model(**inputs).logits, inputs["input_ids"], target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if log is not None and (step % 50 == 0 or step == spec.steps - 1):
            log(f"align step {step}/{spec.steps} loss {losses[-1]:.4f} ({time.perf_counter() - t0:.0f} s)")
    model.eval()
    tail = max(1, len(losses) // 10)
    return {"first_loss": float(np.mean(losses[:tail])), "last_loss": float(np.mean(losses[-tail:])),
            "seconds": time.perf_counter() - t0}
