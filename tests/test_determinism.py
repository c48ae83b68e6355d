"""`learner.deterministic`: two learner processes of one seed end SFT with the same weights, bit for bit, even when
their tensors sit at different addresses (without it, on CPU, they part in the last digits: RESULTS.md)."""
from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # real stack: DeepSpeed learner processes

SCRIPT = """
import hashlib, sys, torch
from coreseg.common.config import load_config
from coreseg.common.models.policy import ensure_policy_dir
from coreseg.common.synth import generate
from coreseg.learner.worker import LearnerCore, free_port
shift = [torch.empty(int(sys.argv[2]) * 17 + 3) for _ in range(5)]  # moves where the allocator puts what follows
cfg = load_config("tiny_cpu", ["learner.micro_batch_size=4", "learner.deterministic=" + sys.argv[3]])
core = LearnerCore(cfg, str(ensure_policy_dir("tiny", sys.argv[1])), master_port=free_port())
samples = generate(24, seed=0, progress=False)
for step in range(6):
    batch = samples[4 * step:4 * step + 4]
    core.sft_step(batch, core.sft_norm(batch))
digest = hashlib.sha256()
for module in (core.module.policy, core.module.adapter, core.module.sam.mask_decoder):
    for name, p in sorted(module.named_parameters()):
        if p.requires_grad:
            digest.update(p.detach().numpy().tobytes())
print("DIGEST", digest.hexdigest())
"""


def _digest(assets, shift: int, deterministic: bool) -> str:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(assets), str(shift), str(deterministic).lower()],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return [line for line in out.stdout.splitlines() if line.startswith("DIGEST")][-1]


def test_deterministic_learner_processes_end_sft_with_identical_weights(tiny_policy_dir):
    assets = tiny_policy_dir.parent
    assert _digest(assets, 1, True) == _digest(assets, 3, True)
