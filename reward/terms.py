"""Reward terms: named functions that each score one completion, and `score_completion`, which sums them.

A term takes a `TermInput` and returns (value, reason): reason is "" or a short stable string saying why bad
output forced the value (counted in metrics as `<term>:<reason>`). The paper's three terms are registered here
as `format`, `box` and `mask`. `reward.terms` lists the terms a run uses, each a registered name or an import
path `package.module:function` (its name in `Score.components` and the logs is then `function`).

    total = sum over terms of weight(term) * value(term)

with weight `reward.w_format` / `w_box` / `w_mask` for the paper's terms and `reward.term_weights.<name>`
(default 1) for any other. A term that raises scores 0 with the reason `<term>:error:<ExceptionType>`
(one bad completion must not end a run); so does a term whose value is not a finite number.
"""
from __future__ import annotations

import functools
import importlib
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple, Union

import numpy as np

from coreseg.common.images import union_mask
from coreseg.common.prompts import ParsedCompletion, parse_completion
from coreseg.common.protocol import Score
from coreseg.reward.rewards import box_reward, dice, format_reward, iou, mask_reward

PAPER_TERMS = ("format", "box", "mask")  # weighted by reward.w_format / w_box / w_mask


@dataclass(frozen=True)
class TermInput:
    """What a term sees of one completion."""
    text: str  # the completion as generated
    parsed: ParsedCompletion  # `parse_completion(text)`
    pred: Union[np.ndarray, str]  # the predicted HxW bool mask, or why none could be drawn (e.g. "no_seg_token")
    gt_mask: np.ndarray  # HxW bool: the union of the lesion masks
    gt_boxes: np.ndarray  # [N, 4] ground-truth boxes, pixels
    image_size: Tuple[int, int]  # (width, height)
    cfg: object  # the run's `RewardConfig` (thresholds and constants)


TermFn = Callable[[TermInput], Tuple[float, str]]
_REGISTRY: Dict[str, TermFn] = {}


class TermError(ValueError):
    """A reward term name or import path that does not resolve, or a term list/weight that is inconsistent."""


def register_term(name: str) -> Callable[[TermFn], TermFn]:
    """Decorator: make `fn` available in `reward.terms` as `name`."""
    def add(fn: TermFn) -> TermFn:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise TermError(f"reward term {name!r} is already registered ({_REGISTRY[name].__module__})")
        _REGISTRY[name] = fn
        return fn
    return add


def term_name(spec: str) -> str:
    """The component name of a `reward.terms` entry: the function name of an import path, else the entry."""
    return spec.rpartition(":")[2] if ":" in spec else spec


@functools.lru_cache(maxsize=None)
def resolve_term(spec: str) -> TermFn:
    """A registered name, or `package.module:function` (imported). Raises TermError saying what is wrong."""
    if ":" not in spec:
        if spec not in _REGISTRY:
            raise TermError(f"unknown reward term {spec!r}: registered are {sorted(_REGISTRY)}, "
                            "or give an import path 'package.module:function'")
        return _REGISTRY[spec]
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - any failure while importing user code is a config error
        raise TermError(f"reward term {spec!r}: cannot import {module_name!r} ({type(err).__name__}: {err})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise TermError(f"reward term {spec!r}: module {module_name!r} has no function {attr!r}")
    return fn


def term_weight(cfg, name: str) -> float:
    return float(getattr(cfg, f"w_{name}")) if name in PAPER_TERMS else float(cfg.term_weights.get(name, 1.0))


def check_terms(cfg) -> None:
    """Validate `reward.terms` / `reward.term_weights` (RewardConfig); raises TermError naming the key."""
    if not cfg.terms:
        raise TermError("config key 'reward.terms' must name at least one term")
    names: List[str] = []
    for k, spec in enumerate(cfg.terms):
        try:
            resolve_term(spec)
        except TermError as err:
            raise TermError(f"config key 'reward.terms[{k}]': {err}") from None
        name = term_name(spec)
        if name in names:
            raise TermError(f"config key 'reward.terms[{k}]': a second term named {name!r}")
        names.append(name)
    for name, weight in cfg.term_weights.items():
        if name in PAPER_TERMS:
            raise TermError(f"config key 'reward.term_weights.{name}': the paper's terms use reward.w_{name}")
        if name not in names:
            raise TermError(f"config key 'reward.term_weights.{name}': no such term in reward.terms {names}")
        if not math.isfinite(weight):
            raise TermError(f"config key 'reward.term_weights.{name}' must be finite")


@register_term("format")
def format_term(inp: TermInput) -> Tuple[float, str]:
    return format_reward(inp.parsed)


@register_term("box")
def box_term(inp: TermInput) -> Tuple[float, str]:
    if not inp.parsed.boxes_ok:  # boxes salvaged from an otherwise malformed answer still earn box reward
        return 0.0, inp.parsed.reason
    value, reason, _ = box_reward(inp.parsed.boxes, inp.gt_boxes, inp.cfg.iou_threshold, inp.image_size)
    return value, reason


@register_term("mask")
def mask_term(inp: TermInput) -> Tuple[float, str]:
    if isinstance(inp.pred, str):
        return 0.0, inp.pred
    value, reason, _ = mask_reward(inp.pred, inp.gt_mask, inp.cfg)
    return value, reason


def run_term(name: str, fn: TermFn, inp: TermInput) -> Tuple[float, str]:
    """(value, reason) of one term; a term that raises or returns a non-finite value scores 0 with a reason."""
    try:
        value, reason = fn(inp)
        value = float(value)
    except Exception as err:  # noqa: BLE001 - user terms may fail on odd completions; the run goes on
        return 0.0, f"error:{type(err).__name__}"
    if not math.isfinite(value):
        return 0.0, "error:non_finite_value"
    return value, str(reason) if reason else ""


def score_completion(text: str, pred: Union[np.ndarray, str], gt_masks: Sequence[np.ndarray], gt_boxes,
                     image_hw: Tuple[int, int], cfg) -> Score:
    """One completion -> Score, summing the terms of `cfg.terms` (cfg: RewardConfig). pred: the predicted HxW
    mask, or a reason string when none could be drawn (missing `<seg>`, non-finite state). Components are the
    unweighted values; reasons are prefixed by their term."""
    parsed = parse_completion(text)
    h, w = image_hw
    gt = union_mask(gt_masks, h, w)
    inp = TermInput(text=text, parsed=parsed, pred=pred, gt_mask=gt,
                    gt_boxes=np.asarray(gt_boxes, float).reshape(-1, 4), image_size=(w, h), cfg=cfg)
    total, components, reasons = 0.0, {}, []
    for spec in cfg.terms:
        name = term_name(spec)
        value, reason = run_term(name, resolve_term(spec), inp)
        components[name] = value
        total += term_weight(cfg, name) * value
        if reason:
            reasons.append(f"{name}:{reason}")
    if isinstance(pred, str) or np.shape(pred) != gt.shape:  # metrics: no mask, or not the image's shape
        d = j = 0.0
    else:
        d, j = dice(pred, gt), iou(pred, gt)
    return Score(total=float(total), components=components, reasons=reasons, dice=float(d), iou=float(j),
                 format_ok=bool(parsed.ok))
