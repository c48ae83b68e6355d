"""Registries of the learner's algorithm parts, chosen by name in config (as verl's core algorithms are):

- `advantage` (`learner.advantage`): rewards [P, G] float64 tensor, eps -> advantages [P, G];
- `policy_loss` (`learner.policy_loss`): (logprobs [B, T], old_logprobs [B, T], advantages [B] or [B, T],
  cfg: LearnerConfig) -> (per-token loss [B, T], clipped [B, T] bool, ratio [B, T]).

A config value is a registered name or an import path `package.module:function`, so a new estimator or loss is
one new file plus a config value; the file may also `register` it under a short name.
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict

KINDS = ("advantage", "policy_loss")
_REGISTRY: Dict[str, Dict[str, Callable]] = {kind: {} for kind in KINDS}


def register(kind: str, name: str):
    """Decorator: `@register("policy_loss", "my_loss")`. A name can be registered once."""
    if kind not in _REGISTRY:
        raise ValueError(f"unknown registry {kind!r}; expected one of {KINDS}")

    def add(fn: Callable) -> Callable:
        if name in _REGISTRY[kind] and _REGISTRY[kind][name] is not fn:
            raise ValueError(f"{kind} {name!r} is registered twice")
        _REGISTRY[kind][name] = fn
        return fn
    return add


def names(kind: str) -> list:
    _load_builtins()
    return sorted(_REGISTRY[kind])


def resolve(kind: str, name: str) -> Callable:
    """The function for a registered name or a `package.module:function` import path; ValueError naming both
    the value and what is known when neither works."""
    _load_builtins()
    if name in _REGISTRY[kind]:
        return _REGISTRY[kind][name]
    if ":" not in name:
        raise ValueError(f"unknown {kind} {name!r}: registered are {names(kind)}, or give an import path "
                         f"'package.module:function'")
    module_name, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{kind} {name!r} cannot be imported: {err}") from None
    if not callable(fn):
        raise ValueError(f"{kind} {name!r} is not callable")
    return fn


def _load_builtins() -> None:
    importlib.import_module("coreseg.learner.grpo")  # registers grpo, dr_grpo and ppo_clip
