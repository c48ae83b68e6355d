"""LR schedules against hand-worked values."""
import math

import pytest

from coreseg.learner.schedule import lr_factor


def test_constant_with_and_without_warmup():
    assert [lr_factor(s, 10) for s in range(12)] == [1.0] * 12
    assert [lr_factor(s, 10, "constant", warmup=4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_linear_decay_after_warmup_to_min_ratio():
    # warmup 2 of 10 steps: 0.5, 1; then 8 decay steps: 1 - k/8 scaled into [0.2, 1]
    got = [lr_factor(s, 10, "linear", warmup=2, min_ratio=0.2) for s in range(12)]
    want = [0.5, 1.0] + [0.2 + 0.8 * (1 - k / 8) for k in range(8)] + [0.2, 0.2]
    assert got == pytest.approx(want)
    assert lr_factor(9, 10, "linear") == pytest.approx(0.1)  # 1 - 9/10


def test_cosine_hand_values():
    # no warmup, 4 steps: 0.5 * (1 + cos(pi * k / 4))
    assert [lr_factor(s, 4, "cosine") for s in range(5)] == pytest.approx(
        [1.0, (1 + math.sqrt(0.5)) / 2, 0.5, (1 - math.sqrt(0.5)) / 2, 0.0])
    # min_ratio 0.1, warmup 1 of 5: step 0 = 1/1, then progress k/4; halfway = 0.1 + 0.9 * 0.5
    assert lr_factor(0, 5, "cosine", warmup=1, min_ratio=0.1) == 1.0
    assert lr_factor(3, 5, "cosine", warmup=1, min_ratio=0.1) == pytest.approx(0.55)
    assert lr_factor(5, 5, "cosine", warmup=1, min_ratio=0.1) == pytest.approx(0.1)


def test_warmup_longer_than_the_stage_and_bad_values():
    assert lr_factor(2, 3, "cosine", warmup=10) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="unknown lr schedule"):
        lr_factor(0, 10, "step")
    with pytest.raises(ValueError, match="min_ratio"):
        lr_factor(0, 10, "linear", min_ratio=1.5)


def test_the_heads_do_not_move_without_a_mask_loss():
    from types import SimpleNamespace

    from coreseg.learner.schedule import heads_lr

    assert heads_lr(SimpleNamespace(mask_loss_weight=1.0, adapter_lr=3e-4)) == 3e-4
    assert heads_lr(SimpleNamespace(mask_loss_weight=0.0, adapter_lr=3e-4)) == 0.0
    # what 0 buys: an AdamW step with a restored first moment and no gradient still moves a parameter at the
    # adapter's rate, and leaves it exactly as it was at rate 0
    import torch

    for lr, moved in ((3e-4, True), (0.0, False)):
        p = torch.nn.Parameter(torch.ones(3))
        opt = torch.optim.AdamW([p], lr=lr, weight_decay=0.01)
        p.grad = torch.full((3,), 0.5)
        opt.step()  # the moments a checkpoint would restore
        before = p.detach().clone()
        p.grad = torch.zeros(3)  # no mask loss: a zero gradient
        opt.step()
        assert (not torch.equal(p.detach(), before)) == moved
