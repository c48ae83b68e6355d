"""ZeRO-3 export: parameters are partitioned over the ranks, so every rank gathers them for an export or a
checkpoint. Two ranks (gloo, CPU) after the same SFT and GRPO steps export the same bundle under ZeRO-3 as
under ZeRO-2, where every rank holds whole parameters."""
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from common.config import load_config
from tests.test_learner_dist import OVERRIDES, Batches

pytestmark = pytest.mark.slow  # real stack: Ray, DeepSpeed

PARTS = ("lora", "adapter", "mask_decoder", "token_rows")


def _run(stage, policy_dir, samples, tmp_path):
    from learner.group import LearnerGroup

    cfg = load_config("tiny_cpu", OVERRIDES + [f"learner.zero_stage={stage}", "learner.reference=base"])
    group = LearnerGroup(cfg, policy_dir, num_workers=2)
    try:
        maker = Batches(policy_dir, samples)
        before = group.export_weights()
        group.sft_step(maker.samples[:3])
        groups, batch_samples = maker.batch([("seg", 20), (16, "seg")], group.version)
        group.update(groups, batch_samples, np.array([1.0, -1.0, 0.5, -0.5]), group.forward(groups, batch_samples))
        ranks = group.pool.call_all("export_weights")
        group.save_checkpoint(str(tmp_path / f"zero{stage}"))
        return before, ranks
    finally:
        group.shutdown()


def test_zero3_exports_the_zero2_bundle(ray_session, tiny_policy_dir, synth_samples, tmp_path):
    samples = synth_samples[:4]
    before, (z2, _) = _run(2, tiny_policy_dir, samples, tmp_path)
    _, (z3_rank0, z3_rank1) = _run(3, tiny_policy_dir, samples, tmp_path)
    for part in PARTS:
        want = getattr(z2, part)
        for bundle in (z3_rank0, z3_rank1):
            got = getattr(bundle, part)
            assert set(got) == set(want), part
            for k, v in want.items():
                assert got[k].shape == v.shape and got[k].numel() > 0, (part, k)  # whole, not a rank's partition
                torch.testing.assert_close(got[k], v, rtol=0, atol=1e-5, msg=f"{part} {k}")
        if part != "token_rows":  # ids do not move
            assert max(float((v - getattr(before, part)[k]).abs().max()) for k, v in want.items()) > 1e-4, part
    # the checkpoint's rank-0 files hold the gathered weights too
    saved = load_file(str(tmp_path / "zero3" / "peft" / "adapter_model.safetensors"))
    for k, v in saved.items():
        full = next(t for name, t in z3_rank0.lora.items() if name.replace(".default", "") == k)
        torch.testing.assert_close(v, full, rtol=0, atol=0)
    torch.testing.assert_close(load_file(str(tmp_path / "zero3" / "token_rows.safetensors"))["output"],
                               z3_rank0.token_rows["output"], rtol=0, atol=0)
