"""Data parallelism: 2 LearnerWorkers (ZeRO-2, gloo) in local Ray end a step with identical LoRA weights,
equal to 1 learner on the same global batch."""
import numpy as np
import pytest
import torch

from common.config import load_config
from common.protocol import Completion, RolloutGroup
from learner.sft import sft_target_ids

pytestmark = pytest.mark.slow  # real stack: Ray, DeepSpeed, vLLM

OVERRIDES = ["learner.micro_batch_size=2", "learner.lr=1e-2", "learner.adapter_lr=1e-2", "learner.zero_stage=2",
             "learner.kl_beta=0.05", "learner.mask_loss_weight=0.5", "learner.grad_clip=1000.0",
             # Adam's first step is ~lr*sign(g): tiny gradients would flip with summation order. A large eps
             # makes the step linear in the gradient, so the comparison tests the data-parallel gradients.
             "learner.adam_eps=1.0"]


def _batch(processor, family, samples):
    from PIL import Image

    groups = []
    for s in samples:
        ids = sft_target_ids(processor.tokenizer, s, family)
        parts = [ids[:20], ids[20:32]]
        prompt = processor(text=[family.prompt(s.question)], images=[Image.fromarray(s.image)])["input_ids"][0]
        groups.append(RolloutGroup(s.id, [Completion("", list(prompt), p, [0.0] * len(p), "length", 0)
                                          for p in parts]))
    return groups


def _step(cfg, policy_dir, workers, samples, groups, local=False):
    from learner.group import LearnerGroup

    group = LearnerGroup(cfg, policy_dir, num_workers=workers, local=local)
    try:
        fwd = group.forward(groups, samples)
        adv = np.array([1.0, -1.0, -0.5, 0.5, 2.0, -2.0, 0.3, -0.3])
        stats = group.update(groups, samples, adv, fwd)
        bundles = group.pool.call_all("export_weights")
    finally:
        group.shutdown()
    return stats, bundles


def test_two_ranks_equal_one_rank(ray_session, tiny_policy_dir, synth_samples):
    from transformers import AutoProcessor

    from common.models.family import model_family

    cfg = load_config("tiny_cpu", OVERRIDES)
    samples = synth_samples[:4]
    groups = _batch(AutoProcessor.from_pretrained(str(tiny_policy_dir)), model_family(tiny_policy_dir), samples)
    stats1, (single,) = _step(cfg, tiny_policy_dir, 1, samples, groups)
    stats2, (rank0, rank1) = _step(cfg, tiny_policy_dir, 2, samples, groups)
    stats_local, (local,) = _step(cfg, tiny_policy_dir, 1, samples, groups, local=True)  # one rank, this process
    assert stats_local["tokens"] == stats1["tokens"]
    assert stats_local["pg_loss"] == pytest.approx(stats1["pg_loss"], abs=1e-5)
    assert stats1["tokens"] == stats2["tokens"] == 4 * 32
    assert stats2["pg_loss"] == pytest.approx(stats1["pg_loss"], abs=1e-5)
    changed = 0
    for part in ("lora", "adapter", "mask_decoder"):
        for k, v in getattr(single, part).items():
            assert torch.equal(getattr(rank0, part)[k], getattr(rank1, part)[k]), k
            assert torch.allclose(getattr(rank0, part)[k], v, atol=1e-5), k
            assert torch.allclose(getattr(local, part)[k], v, atol=1e-5), k
        changed += 1
    base = sum(float(v.abs().sum()) for k, v in single.lora.items() if "lora_B" in k)
    assert base > 0  # the update really moved the LoRA weights
