"""A deterministic ComLesion-like synthetic set: three in-distribution modalities with distinct
textures, 1-3 lesions per image (small, low-contrast and multi-lesion cases included), a templated
chain of thought in the paper's style (normal appearance -> lesion characteristics -> how to find it),
and a `test_ood` split holding a modality and lesion type never seen in `train`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List

import numpy as np
from tqdm import tqdm

from coreseg.common.data import LesionSample, write_parquet
from coreseg.common.images import mask_to_box


@dataclass(frozen=True)
class Modality:
    name: str
    category: str
    normal: str  # normal appearance of the region
    find_hint: str  # how to find the lesion
    ood: bool = False


MODALITIES = (
    Modality("ct", "liver lesion", "the liver parenchyma is homogeneous soft tissue with smooth margins",
             "compare the attenuation of each region against the surrounding parenchyma"),
    Modality("dermoscopy", "skin lesion", "the surrounding skin has an even tone with a regular texture",
             "look for pigmented areas whose colour and border break the regular skin pattern"),
    Modality("endoscopy", "polyp", "the mucosa is pink with a smooth vascular pattern and specular glints",
             "look for raised areas whose colour and surface differ from the folds of the mucosa"),
    Modality("ultrasound", "thyroid nodule", "the gland shows a fine, uniform speckle echotexture",
             "look for regions whose echogenicity departs from the surrounding speckle", ood=True),
)


def _grid(size: int):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _background(mod: Modality, size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = _grid(size)
    c = (size - 1) / 2
    if mod.name == "ct":  # grey body ellipse on black, fine noise
        body = ((xx - c) / (0.46 * size)) ** 2 + ((yy - c) / (0.40 * size)) ** 2 < 1
        g = np.where(body, 110 + rng.normal(0, 6, (size, size)), 5 + rng.normal(0, 2, (size, size)))
        return np.repeat(g[..., None], 3, axis=2)
    if mod.name == "dermoscopy":  # skin tone with hair strokes
        base = np.array([222, 178, 150], np.float32) + rng.normal(0, 8, 3)
        img = base + rng.normal(0, 5, (size, size, 1))
        for _ in range(rng.integers(2, 6)):
            a, off = rng.uniform(0, np.pi), rng.uniform(-c, c)
            line = np.abs((xx - c) * np.sin(a) - (yy - c) * np.cos(a) - off) < 0.6
            img[line] = (60, 40, 30)
        return img
    if mod.name == "endoscopy":  # pink mucosa, vignette, folds, specular highlights
        r = np.sqrt((xx - c) ** 2 + (yy - c) ** 2) / (0.7 * size)
        folds = 12 * np.sin(xx / rng.uniform(5, 9) + rng.uniform(0, 6))
        img = np.stack([200 + folds, 100 + folds / 2, 95 + 0 * folds], axis=2) * (1 - 0.6 * r[..., None] ** 2)
        for _ in range(rng.integers(2, 5)):
            y, x = rng.integers(0, size, 2)
            img[(yy - y) ** 2 + (xx - x) ** 2 < 2] = 250
        return img
    # ultrasound: speckle in a fan
    fan = (np.abs(xx - c) < (yy + 5) * 0.6) & (yy > 2)
    g = np.where(fan, 90 * rng.rayleigh(0.8, (size, size)), 0)
    return np.repeat(g[..., None], 3, axis=2)


def _lesion_mask(size: int, cy: float, cx: float, radius: float, rng) -> np.ndarray:
    yy, xx = _grid(size)
    angle = np.arctan2(yy - cy, xx - cx)
    ecc, rot = rng.uniform(0.6, 1.0), rng.uniform(0, np.pi)
    wobble = 1 + rng.uniform(0, 0.25) * np.sin(rng.integers(2, 6) * angle + rng.uniform(0, 6))
    dx, dy = xx - cx, yy - cy
    u = dx * np.cos(rot) + dy * np.sin(rot)
    v = (-dx * np.sin(rot) + dy * np.cos(rot)) / ecc
    return np.sqrt(u ** 2 + v ** 2) < radius * wobble


def _paint(img: np.ndarray, mask: np.ndarray, mod: Modality, contrast: float, rng) -> None:
    sign = rng.choice([-1.0, 1.0]) if mod.name in ("ct", "ultrasound") else -1.0
    if mod.name == "dermoscopy":
        colour = np.array([90, 110, 100], np.float32)
    elif mod.name == "endoscopy":
        colour = np.array([25, 40, 30], np.float32)
        sign = 1.0
    else:
        colour = np.array([70, 70, 70], np.float32)
    img[mask] += sign * contrast * colour + rng.normal(0, 4, (int(mask.sum()), 3))


def _words_location(box: np.ndarray, size: int) -> str:
    cx, cy = (box[0] + box[2]) / 2 / size, (box[1] + box[3]) / 2 / size
    vert = "upper" if cy < 0.38 else "lower" if cy > 0.62 else "middle"
    horiz = "left" if cx < 0.38 else "right" if cx > 0.62 else "central"
    return "centre" if (vert, horiz) == ("middle", "central") else f"{vert} {horiz} part"


def _words_size(area_fraction: float) -> str:
    return "tiny" if area_fraction < 0.008 else "small" if area_fraction < 0.03 else \
        "medium-sized" if area_fraction < 0.08 else "large"


_NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
REASONING_STYLES = ("short", "detailed")


def _reasoning_short(mod: Modality, lesions: List[dict], size: int) -> str:
    """One sentence: modality, count, and size + place of each finding (about 15-30 tokens), short enough
    for the tiny demo policy to learn the whole template exactly."""
    n = len(lesions)
    where = "; ".join(f"{_words_size(les['area'])}, {_words_location(les['box'], size)}" for les in lesions)
    return f"{mod.name} image, {_NUMBER_WORDS[n]} {mod.category}{'' if n == 1 else 's'}: {where}."


def _reasoning_detailed(mod: Modality, lesions: List[dict], size: int) -> str:
    n = len(lesions)
    parts = [f"In this {mod.name} image {mod.normal}."]
    desc = []
    for les in lesions:
        contrast = "subtle, low-contrast" if les["contrast"] < 0.45 else "well-defined"
        shape = "irregular" if les["wobble"] else "rounded"
        desc.append(f"a {_words_size(les['area'])} {contrast} {shape} region in the "
                    f"{_words_location(les['box'], size)} of the image")
    count = "is one suspicious finding" if n == 1 else f"are {_NUMBER_WORDS[n]} separate suspicious findings"
    parts.append(f"There {count}: " + "; ".join(desc) + ".")
    parts.append(f"To find {'it' if n == 1 else 'them'}, {mod.find_hint}; each {mod.category} is "
                 f"marked below and one mask covers {'it' if n == 1 else 'all of them'}.")
    return " ".join(parts)


def _reasoning(mod: Modality, lesions: List[dict], size: int, style: str) -> str:
    return (_reasoning_short if style == "short" else _reasoning_detailed)(mod, lesions, size)


TASKS = ("lesions", "referring")


def _place_lesion(img, taken, mod: Modality, size: int, radius_fn, contrast_fn, rng):
    """Paint one lesion clear of those already placed (`taken`, grown by 4 px); None after 20 failed tries.
    radius_fn(rng) (a fraction of the side) is drawn at each try, contrast_fn(rng) once placed."""
    for _try in range(20):
        radius = radius_fn(rng) * size
        cy, cx = rng.uniform(radius + 4, size - radius - 4, 2)
        mask = _lesion_mask(size, cy, cx, radius, rng)
        grown = np.zeros_like(taken)
        grown[max(0, int(cy - radius - 4)):int(cy + radius + 5), max(0, int(cx - radius - 4)):int(cx + radius + 5)] = True
        if mask.sum() >= 6 and not (taken & grown).any():
            break
    else:
        return None
    taken |= mask
    contrast = contrast_fn(rng)
    _paint(img, mask, mod, contrast, rng)
    return mask, {"box": mask_to_box(mask), "area": mask.mean(), "contrast": contrast, "wobble": rng.random() < 0.5}


def _lesions_case(img, mod: Modality, size: int, rng, style: str):
    """The ComLesion-like case: 1 lesion, or (35%) 2-3 with small and low-contrast ones; every one is the target.
    Returns (masks, lesion records, question, reasoning)."""
    complex_case = rng.random() < 0.35
    n = int(rng.integers(2, 4)) if complex_case else 1
    masks, lesions, taken = [], [], np.zeros((size, size), bool)

    def radius(r):
        return r.uniform(0.03, 0.06) if (complex_case and r.random() < 0.5) else r.uniform(0.07, 0.2)

    def contrast(r):
        return r.uniform(0.25, 0.45) if (complex_case and r.random() < 0.5) else r.uniform(0.6, 1.0)

    for _ in range(n):
        placed = _place_lesion(img, taken, mod, size, radius, contrast, rng)
        if placed is not None:
            masks.append(placed[0])
            lesions.append(placed[1])
    question = rng.choice([f"Locate and segment the {mod.category}.",
                           f"Where is the {mod.category} in this image? Segment it.",
                           f"Find every {mod.category} and segment it."])
    return masks, lesions, str(question), _reasoning(mod, lesions, size, style)


def _referring_case(img, mod: Modality, size: int, rng, style: str):
    """Two lesions of one look, one clearly larger (radius 0.15-0.22 vs 0.08-0.11 of the side); the question asks for
    the larger or the smaller, so the image alone does not say which mask is wanted: the question does. Returns
    (the target's mask, its record, question, reasoning listing both lesions in random order)."""
    def clear(r):
        return r.uniform(0.6, 1.0)

    taken = np.zeros((size, size), bool)
    for _try in range(20):
        taken[:] = False
        work = img.copy()
        large = _place_lesion(work, taken, mod, size, lambda r: r.uniform(0.15, 0.22), clear, rng)
        small = _place_lesion(work, taken, mod, size, lambda r: r.uniform(0.08, 0.11), clear, rng)
        if large is not None and small is not None:
            break
    else:
        raise RuntimeError(f"synth: no room for two {mod.category}s in a {size} px image")
    img[...] = work
    want_large = bool(rng.random() < 0.5)
    target = large if want_large else small
    which = "larger" if want_large else "smaller"
    question = f"Segment the {which} of the two {mod.category}s."
    seen = [large[1], small[1]] if rng.random() < 0.5 else [small[1], large[1]]
    return [target[0]], [target[1]], question, _reasoning_referring(mod, seen, target[1], which, size, style)


def _reasoning_referring(mod: Modality, seen: List[dict], target: dict, which: str, size: int, style: str) -> str:
    where = _words_location(target["box"], size)
    if style == "short":
        found = "; ".join(f"{_words_size(les['area'])}, {_words_location(les['box'], size)}" for les in seen)
        return f"{mod.name} image, two {mod.category}s: {found}. The {which}: {where}."
    desc = "; ".join(f"a {_words_size(les['area'])} region in the {_words_location(les['box'], size)} of the image"
                     for les in seen)
    return (f"In this {mod.name} image {mod.normal}. There are two suspicious findings: {desc}. "
            f"The question asks for the {which} one, the region in the {where}; it alone is marked below.")


def make_sample(index: int, mod: Modality, size: int, seed: int, split: str,
                reasoning: str = "short", task: str = "lesions") -> LesionSample:
    """One sample. task 'lesions': every lesion is the target; 'referring': two lesions, the question names one."""
    if task not in TASKS:
        raise ValueError(f"synthetic task {task!r}: must be one of {TASKS}")
    if reasoning not in REASONING_STYLES:
        raise ValueError(f"reasoning style {reasoning!r}: must be one of {REASONING_STYLES}")
    rng = np.random.default_rng([seed, index])
    img = _background(mod, size, rng).astype(np.float32)
    case = _lesions_case if task == "lesions" else _referring_case
    masks, lesions, question, text = case(img, mod, size, rng, reasoning)
    image = np.clip(img, 0, 255).astype(np.uint8)
    return LesionSample(id=f"synth-{mod.name}-{index:05d}", image=image, masks=masks,
                        boxes=np.stack([l["box"] for l in lesions]), question=question,
                        reasoning=text, source="synth", modality=mod.name, split=split, category=mod.category)


def split_for(index: int, mod: Modality, seed: int) -> str:
    if mod.ood:
        return "test_ood"
    u = np.random.default_rng([seed, index, 7]).random()
    return "train" if u < 0.7 else "val" if u < 0.8 else "test_id"


def generate(num_samples: int, image_size: int = 112, seed: int = 0,
             progress: Callable | None = None, reasoning: str = "short", task: str = "lesions") -> List[LesionSample]:
    """`num_samples` samples cycling through the modalities (the OOD one every fourth); `reasoning` is the
    chain-of-thought style ('short' for the tiny demo policy, 'detailed' for larger ones); `task` is `TASKS`'s."""
    samples = []
    for i in tqdm(range(num_samples), desc="synth", disable=progress is False, leave=False):
        mod = MODALITIES[i % len(MODALITIES)]
        samples.append(make_sample(i, mod, image_size, seed, split_for(i, mod, seed), reasoning, task))
    return samples


def write_synth(out_dir: str | Path, num_samples: int, image_size: int = 112, seed: int = 0,
                reasoning: str = "short", task: str = "lesions") -> Path:
    samples = generate(num_samples, image_size, seed, reasoning=reasoning, task=task)
    return write_parquet(samples, Path(out_dir) / "synth.parquet")
