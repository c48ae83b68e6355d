import numpy as np
import pytest
import torch

from learner.grpo import aggregate, group_advantages, grpo_loss, kl_penalty, pad_sequences, policy_loss
from learner.losses import dice_ce_loss, low_res_target


def test_group_advantages_hand_computed():
    r = np.array([[1.0, 0.0, 0.0, 3.0], [2.0, 2.0, 2.0, 2.0]])
    adv, keep, dropped = group_advantages(r, "grpo", eps=0.0)
    mean, std = 1.0, np.sqrt(((0) ** 2 + 1 + 1 + 4) / 4)  # population std of [1,0,0,3] = sqrt(1.5)
    assert np.allclose(adv[0].numpy(), (r[0] - mean) / std)
    assert np.allclose(adv[1].numpy(), 0) and keep.all() and dropped == 0
    adv, keep, dropped = group_advantages(r, "dr_grpo", drop_zero_variance=True)
    assert np.allclose(adv[0].numpy(), [0, -1, -1, 2]) and keep.tolist() == [True, False] and dropped == 1
    with pytest.raises(ValueError):
        group_advantages(np.zeros(4))


def test_aggregation_modes_with_padding():
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
    m = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])  # last row fully masked, 2nd length 1
    assert aggregate(v, m, "token_mean").item() == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert aggregate(v, m, "seq_mean_token_mean").item() == pytest.approx((2 + 4) / 2)
    assert aggregate(v, m, "seq_mean_token_sum_norm").item() == pytest.approx((6 / 3 + 4 / 3) / 2)
    assert aggregate(v, m, "seq_mean_token_sum_norm", max_len=6).item() == pytest.approx((1 + 4 / 6) / 2)


def test_clip_higher_only_clips_above_one_plus_clip_high():
    old = torch.zeros(1, 4)
    ratios = torch.tensor([[0.7, 1.1, 1.25, 1.5]])
    new = torch.log(ratios)
    mask = torch.ones(1, 4)
    loss, stats = policy_loss(new, old, torch.tensor([1.0]), mask, 0.2, 0.28, "token_mean")
    expected = -np.mean([0.7, 1.1, 1.25, 1.28])  # positive advantage: only the 1.5 ratio is clipped (to 1.28)
    assert loss.item() == pytest.approx(expected, rel=1e-6) and stats["clip_frac"] == pytest.approx(0.25)
    loss, stats = policy_loss(new, old, torch.tensor([-1.0]), mask, 0.2, 0.28, "token_mean")
    expected = np.mean([0.8, 1.1, 1.25, 1.5])  # negative advantage: only the 0.7 ratio is clipped (to 0.8)
    assert loss.item() == pytest.approx(expected, rel=1e-6) and stats["clip_frac"] == pytest.approx(0.25)


def test_kl_estimators_and_total_loss():
    lp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    d = np.array([0.5, -1.0])
    assert np.allclose(kl_penalty(lp, ref, "k1").numpy(), d)
    assert np.allclose(kl_penalty(lp, ref, "k2").numpy(), 0.5 * d ** 2)
    assert np.allclose(kl_penalty(lp, ref, "k3").numpy(), np.exp(-d) + d - 1)
    mask = torch.ones(1, 2)
    loss, stats = grpo_loss(lp, lp.detach(), ref, torch.tensor([2.0]), mask, clip_low=0.2, clip_high=0.2,
                            agg="token_mean", kl_beta=0.1, kl_estimator="k3")
    assert loss.item() == pytest.approx(-2.0 + 0.1 * np.mean(np.exp(-d) + d - 1), rel=1e-6)
    assert stats["kl"] == pytest.approx(np.mean(np.exp(-d) + d - 1), rel=1e-6)


def test_pad_sequences_length_one():
    x, m = pad_sequences([np.array([1.0]), np.array([2.0, 3.0])])
    assert x.tolist() == [[1.0, 0.0], [2.0, 3.0]] and m.tolist() == [[1, 0], [1, 1]]


def test_dice_ce_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 1, 4, 4))
    target = (rng.random((3, 1, 4, 4)) > 0.5).astype(np.float64)
    p = 1 / (1 + np.exp(-logits))
    dice = 1 - (2 * (p * target).sum((1, 2, 3)) + 1) / (p.sum((1, 2, 3)) + target.sum((1, 2, 3)) + 1)
    bce = -(target * np.log(p) + (1 - target) * np.log(1 - p)).mean((1, 2, 3))
    valid = torch.tensor([True, False, True])
    loss, parts = dice_ce_loss(torch.tensor(logits, requires_grad=True), torch.tensor(target), 1.0, 2.0, valid=valid)
    assert loss.item() == pytest.approx(dice[[0, 2]].mean() + 2 * bce[[0, 2]].mean(), rel=1e-5)
    zero, _ = dice_ce_loss(torch.tensor(logits), torch.tensor(target), valid=torch.zeros(3, dtype=torch.bool))
    assert zero.item() == 0.0


def test_low_res_target_geometry():
    mask = np.zeros((60, 120), bool)  # wide image: longest side 120 -> 128, height 60 -> 64
    mask[0:30, 60:120] = True  # top-right quarter
    t = low_res_target(mask, 128, 32)  # low-res covers the padded 128x128 square at 1/4
    assert t.shape == (32, 32)
    assert t[:8, 16:32].all() and t[8:16].sum() == 0 and t[:, :16].sum() == 0 and t[16:].sum() == 0
