"""A role's device comes from its configured GPUs and Ray's assignment, never from whatever the process can see:
Ray leaves CUDA_VISIBLE_DEVICES unset for an actor that asked for no GPU, so `torch.cuda.is_available()` there
is true on a GPU node and a CPU role would land on cuda:0 (another actor's GPU)."""
from __future__ import annotations

import os

# A CPU role's actors start with no visible GPU (set in their runtime env, before torch initialises CUDA).
CPU_ROLE_ENV = {"CUDA_VISIBLE_DEVICES": ""}


def role_device(gpus: float) -> str:
    """"cuda" for a role configured with GPUs (Ray then makes its assigned GPU cuda:0), else "cpu"."""
    return "cuda" if gpus > 0 else "cpu"


def role_runtime_env(gpus: float) -> dict:
    """Ray actor options for a role with `gpus` per actor: CPU roles see no GPU at all."""
    return {} if gpus > 0 else {"runtime_env": {"env_vars": dict(CPU_ROLE_ENV)}}


def check_device(role: str, device: str, config_key: str) -> str:
    """The device, or an error naming the role and key when a GPU role sees no GPU (a wrong Ray assignment)."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError(f"{role} is configured for a GPU ({config_key} > 0) but sees none "
                               f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    return device
