"""GRPO math against hand-worked values and plain-numpy loop implementations (never the code under test)."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from coreseg.learner.grpo import LossNorm, combine_stats, group_advantages, grpo_loss, kl_penalty, loss_norm, partial_sum

MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def loss_cfg(clip_low=0.2, clip_high=0.28, agg="token_mean", kl_beta=0.0, kl_estimator="k3", mask_loss_weight=0.0,
             policy_loss="ppo_clip"):
    """The LearnerConfig fields grpo_loss reads."""
    return SimpleNamespace(clip_low=clip_low, clip_high=clip_high, loss_agg=agg, kl_beta=kl_beta,
                           kl_estimator=kl_estimator, mask_loss_weight=mask_loss_weight, policy_loss=policy_loss)


def policy_loss(logprobs, old, adv, mask, clip_low=0.2, clip_high=0.28, agg="token_mean", max_len=None):
    """The policy term alone: the learner's grpo_loss with no KL and no mask term, on one whole batch."""
    return grpo_loss(logprobs, old, None, adv, mask, cfg=loss_cfg(clip_low, clip_high, agg), max_len=max_len)


def aggregate(values, mask, mode="token_mean", max_len=None):
    numerator, units = partial_sum(values, mask, mode, max_len)
    return numerator / max(units, 1.0)


# ---- independent numpy references (loops, float64) ------------------------------------------------------
def np_aggregate(values, mask, mode, max_len=None):
    B, T = values.shape
    if mode == "token_mean":
        total, count = 0.0, 0
        for b in range(B):
            for t in range(T):
                if mask[b, t]:
                    total += values[b, t]
                    count += 1
        return total / max(count, 1)
    per_seq = []
    for b in range(B):
        toks = [values[b, t] for t in range(T) if mask[b, t]]
        if not toks:
            continue
        per_seq.append(sum(toks) / (len(toks) if mode == "seq_mean_token_mean" else (max_len or T)))
    return sum(per_seq) / len(per_seq) if per_seq else 0.0


def np_policy_terms(logp, old, adv, clip_low, clip_high):
    B, T = logp.shape
    loss, clipped = np.zeros((B, T)), np.zeros((B, T), bool)
    for b in range(B):
        for t in range(T):
            r = math.exp(logp[b, t] - old[b, t])
            plain, clip = r * adv[b], min(max(r, 1 - clip_low), 1 + clip_high) * adv[b]
            loss[b, t] = -min(plain, clip)
            clipped[b, t] = clip < plain
    return loss, clipped


def np_kl(logp, ref, estimator):
    d = logp - ref
    return {"k1": d, "k2": 0.5 * d ** 2, "k3": np.exp(-d) + d - 1}[estimator]


def random_batch(seed=0, B=4, T=6):
    rng = np.random.default_rng(seed)
    logp = -rng.random((B, T)) * 3
    old = logp + rng.normal(scale=0.3, size=(B, T))
    ref = logp + rng.normal(scale=0.5, size=(B, T))
    adv = rng.normal(size=B)
    lengths = [T, 1, 3, 0][:B] + [T] * max(0, B - 4)  # full, length-1, partial, all padding
    mask = np.zeros((B, T))
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    return logp, old, ref, adv, mask


# ---- advantages ----------------------------------------------------------------------------------------
def test_grpo_advantages_use_population_std():
    r = np.array([[1.0, 0.0, 0.0, 3.0], [0.0, 1.0, 1.0, 1.0]])
    adv, keep, dropped = group_advantages(r, "grpo", eps=0.0)
    # group 0: mean 1, deviations [0,-1,-1,2], population variance (0+1+1+4)/4 = 1.5
    assert np.allclose(adv[0].numpy(), np.array([0, -1, -1, 2]) / math.sqrt(1.5))
    # group 1: mean 0.75, deviations [-.75,.25,.25,.25], variance (.5625+3*.0625)/4 = 0.1875
    assert np.allclose(adv[1].numpy(), np.array([-0.75, 0.25, 0.25, 0.25]) / math.sqrt(0.1875))
    assert keep.tolist() == [True, True] and dropped == 0
    assert np.allclose((adv.numpy() ** 2).mean(1), 1.0)  # population std => unit RMS per group
    adv_eps, _, _ = group_advantages(r, "grpo", eps=0.5)
    assert np.allclose(adv_eps[0].numpy(), np.array([0, -1, -1, 2]) / (math.sqrt(1.5) + 0.5))


def test_dr_grpo_advantages_are_centred_rewards():
    adv, keep, dropped = group_advantages([[1.0, 0.0, 0.0, 3.0], [2.0, 4.0, 0.0, 2.0]], "dr_grpo")
    assert np.allclose(adv.numpy(), [[0, -1, -1, 2], [0, 2, -2, 0]]) and keep.all() and dropped == 0


@pytest.mark.parametrize("mode", ["grpo", "dr_grpo"])
def test_all_equal_group_gets_zero_and_is_dropped_on_request(mode):
    r = np.array([[2.0, 2.0, 2.0], [0.1, 0.1, 0.1], [1.0, 0.0, 0.0]])  # 0.1*3/3 != 0.1 in float: still equal
    adv, keep, dropped = group_advantages(r, mode)
    assert np.all(adv[:2].numpy() == 0) and keep.all() and dropped == 0
    adv, keep, dropped = group_advantages(r, mode, drop_zero_variance=True)
    assert np.all(adv[:2].numpy() == 0) and keep.tolist() == [False, False, True] and dropped == 2
    assert adv[2].abs().sum() > 0


def test_advantages_accept_tensors_and_reject_bad_input():
    adv, keep, dropped = group_advantages(torch.tensor([[1.0, 3.0], [5.0, 5.0]]), "grpo", eps=0.0,
                                          drop_zero_variance=True)
    assert adv.dtype == torch.float64 and keep.dtype == torch.bool
    assert np.allclose(adv.numpy(), [[-1, 1], [0, 0]]) and dropped == 1
    single, keep, _ = group_advantages([[3.0], [1.0]], drop_zero_variance=True)  # G=1: nothing to compare
    assert np.all(single.numpy() == 0) and not keep.any()
    for bad in (np.zeros(4), np.zeros((2, 0)), [[1.0, float("nan")]], [[1.0, float("inf")]]):
        with pytest.raises(ValueError):
            group_advantages(bad)
    with pytest.raises(ValueError):
        group_advantages(np.zeros((2, 2)), mode="ppo")


# ---- aggregation ---------------------------------------------------------------------------------------
def test_aggregation_modes_hand_computed_with_padding():
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
    m = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])  # 2nd row length 1, last row fully padded
    assert aggregate(v, m, "token_mean").item() == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert aggregate(v, m, "seq_mean_token_mean").item() == pytest.approx((2 + 4) / 2)
    assert aggregate(v, m, "seq_mean_token_sum_norm").item() == pytest.approx((6 / 3 + 4 / 3) / 2)
    assert aggregate(v, m, "seq_mean_token_sum_norm", max_len=6).item() == pytest.approx((1 + 4 / 6) / 2)
    with pytest.raises(ValueError):
        aggregate(v, m, "sum")
    with pytest.raises(ValueError):
        aggregate(v, m[:2], "token_mean")


@pytest.mark.parametrize("mode", MODES)
def test_aggregation_matches_numpy_and_ignores_garbage_in_padding(mode):
    logp, _, _, _, mask = random_batch(1)
    values = logp.copy()
    values[mask == 0] = np.nan  # padding may hold anything; it must not leak into the result
    got = aggregate(torch.tensor(values), torch.tensor(mask), mode, max_len=8).item()
    assert got == pytest.approx(np_aggregate(values, mask, mode, max_len=8), rel=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_all_padding_aggregates_to_connected_zero(mode):
    x = torch.randn(2, 3, requires_grad=True)
    out = aggregate(x, torch.zeros(2, 3), mode)
    out.backward()
    assert out.item() == 0.0 and torch.all(x.grad == 0)


@pytest.mark.parametrize("mode", MODES)
def test_partial_sums_of_shards_combine_to_the_full_batch_value(mode):
    logp, _, _, _, mask = random_batch(2, B=6)
    v, m = torch.tensor(logp), torch.tensor(mask)
    parts = [partial_sum(v[a:b], m[a:b], mode, max_len=6) for a, b in ((0, 1), (1, 4), (4, 6))]
    combined = sum(float(n) for n, _ in parts) / sum(u for _, u in parts)
    assert combined == pytest.approx(np_aggregate(logp, mask, mode, max_len=6), rel=1e-12)


# ---- policy loss ---------------------------------------------------------------------------------------
def test_clip_higher_clips_above_one_plus_clip_high_for_positive_advantage():
    ratios = np.array([[0.5, 0.79, 1.1, 1.27, 1.5, 3.0]])
    new, old, mask = torch.tensor(np.log(ratios)), torch.zeros(1, 6, dtype=torch.float64), torch.ones(1, 6)
    loss, stats = policy_loss(new, old, torch.tensor([2.0]), mask, clip_low=0.2, clip_high=0.28)
    # A > 0: min(rA, clip(r)A) only differs when r > 1.28 (ratios below 0.8 keep their own, smaller, term)
    assert loss.item() == pytest.approx(-2.0 * np.mean([0.5, 0.79, 1.1, 1.27, 1.28, 1.28]), rel=1e-9)
    assert stats["clip_frac"] == pytest.approx(2 / 6)
    assert stats["ratio_mean"] == pytest.approx(ratios.mean()) and stats["ratio_max"] == pytest.approx(3.0)


def test_clip_low_clips_below_one_minus_clip_low_for_negative_advantage():
    ratios = np.array([[0.5, 0.79, 0.81, 1.1, 1.5, 3.0]])
    new, old, mask = torch.tensor(np.log(ratios)), torch.zeros(1, 6, dtype=torch.float64), torch.ones(1, 6)
    loss, stats = policy_loss(new, old, torch.tensor([-1.0]), mask, clip_low=0.2, clip_high=0.28)
    # A < 0: loss = max(r, clip(r)) -> only r < 0.8 is raised to 0.8; large ratios are never clipped
    assert loss.item() == pytest.approx(np.mean([0.8, 0.8, 0.81, 1.1, 1.5, 3.0]), rel=1e-9)
    assert stats["clip_frac"] == pytest.approx(2 / 6)


def test_gradient_vanishes_exactly_on_clipped_tokens():
    ratios = np.array([[0.5, 1.0, 1.2, 1.5], [0.5, 1.0, 1.2, 1.5]])
    new = torch.tensor(np.log(ratios), requires_grad=True)
    adv = torch.tensor([1.0, -1.0])
    loss, _ = policy_loss(new, torch.zeros(2, 4, dtype=torch.float64), adv, torch.ones(2, 4), 0.2, 0.28)
    loss.backward()
    # d/dlogp of -r*A is -r*A (dr/dlogp = r); token_mean over 8 tokens
    expected = np.array([[-0.5, -1.0, -1.2, 0.0], [0.0, 1.0, 1.2, 1.5]]) / 8
    assert np.allclose(new.grad.numpy(), expected)


def test_zero_advantage_gives_zero_loss_and_no_clipping():
    new = torch.log(torch.tensor([[0.1, 5.0]]))
    loss, stats = policy_loss(new, torch.zeros(1, 2), torch.zeros(1), torch.ones(1, 2))
    assert loss.item() == 0.0 and stats["clip_frac"] == 0.0


@pytest.mark.parametrize("mode", MODES)
def test_policy_loss_matches_numpy_per_aggregation(mode):
    logp, old, _, adv, mask = random_batch(3)
    loss, stats = policy_loss(torch.tensor(logp), torch.tensor(old), torch.tensor(adv), torch.tensor(mask),
                              0.2, 0.28, agg=mode, max_len=10)
    per_tok, clipped = np_policy_terms(logp, old, adv, 0.2, 0.28)
    assert loss.item() == pytest.approx(np_aggregate(per_tok, mask, mode, max_len=10), rel=1e-9)
    assert stats["clip_frac"] == pytest.approx(clipped[mask == 1].mean())
    ratio = np.exp(logp - old)[mask == 1]
    assert stats["ratio_mean"] == pytest.approx(ratio.mean()) and stats["ratio_max"] == pytest.approx(ratio.max())


def test_policy_loss_length_one_completion():
    loss, stats = policy_loss(torch.tensor([[math.log(1.5)]]), torch.zeros(1, 1), torch.tensor([1.0]),
                              torch.ones(1, 1), 0.2, 0.28, agg="seq_mean_token_sum_norm")
    assert loss.item() == pytest.approx(-1.28) and stats["clip_frac"] == 1.0


def test_policy_loss_per_token_advantages_and_shape_errors():
    logp, old, _, adv, mask = random_batch(4)
    per_token_adv = np.repeat(adv[:, None], logp.shape[1], axis=1)
    a, _ = policy_loss(torch.tensor(logp), torch.tensor(old), torch.tensor(adv), torch.tensor(mask))
    b, _ = policy_loss(torch.tensor(logp), torch.tensor(old), torch.tensor(per_token_adv), torch.tensor(mask))
    assert a.item() == pytest.approx(b.item(), rel=1e-12)
    with pytest.raises(ValueError):
        policy_loss(torch.tensor(logp), torch.tensor(old), torch.tensor(adv[:2]), torch.tensor(mask))
    with pytest.raises(ValueError):
        policy_loss(torch.tensor(logp), torch.tensor(old[:, :2]), torch.tensor(adv), torch.tensor(mask))


def test_bf16_logprobs_are_upcast():
    lp = torch.tensor([[-1.0, -2.0]], dtype=torch.bfloat16, requires_grad=True)
    loss, _ = policy_loss(lp, lp.detach(), torch.tensor([1.0]), torch.ones(1, 2))
    loss.backward()
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(-1.0)
    assert lp.grad.dtype == torch.bfloat16 and torch.isfinite(lp.grad).all()


# ---- KL ------------------------------------------------------------------------------------------------
def test_kl_estimators_hand_computed():
    lp, ref = torch.tensor([[-1.0, -2.0, -0.5]]), torch.tensor([[-1.5, -1.0, -0.5]])
    # logp - ref = [0.5, -1, 0]
    assert np.allclose(kl_penalty(lp, ref, "k1").numpy(), [[0.5, -1.0, 0.0]])
    assert np.allclose(kl_penalty(lp, ref, "k2").numpy(), [[0.125, 0.5, 0.0]])
    k3 = [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1 - 1, 0.0]  # exp(ref-lp) - (ref-lp) - 1
    assert np.allclose(kl_penalty(lp, ref, "k3").numpy(), [k3])
    with pytest.raises(ValueError):
        kl_penalty(lp, ref, "k4")


def test_kl_estimators_average_to_the_true_kl():
    # pi = softmax(a), ref = softmax(b) over 3 tokens; E_{x~pi}[k] computed exactly by summing over x
    pi, ref = np.array([0.6, 0.3, 0.1]), np.array([0.2, 0.5, 0.3])
    true_kl = float(np.sum(pi * np.log(pi / ref)))
    lp, lr = torch.tensor(np.log(pi))[None], torch.tensor(np.log(ref))[None]
    for est in ("k1", "k3"):  # unbiased estimators
        assert float((kl_penalty(lp, lr, est)[0].numpy() * pi).sum()) == pytest.approx(true_kl, rel=1e-9)
    assert torch.all(kl_penalty(lp, lr, "k3") >= 0) and torch.all(kl_penalty(lp, lr, "k2") >= 0)


def test_k3_gradient_and_reference_is_constant():
    lp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0]], requires_grad=True)
    kl_penalty(lp, ref, "k3").sum().backward()
    # d/dlogp [exp(ref - lp) + lp - ref - 1] = 1 - exp(ref - lp)
    assert np.allclose(lp.grad.numpy(), [[1 - math.exp(-0.5), 1 - math.exp(1.0)]], rtol=1e-6)
    assert ref.grad is None


# ---- total loss ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_grpo_loss_matches_numpy_and_has_finite_gradients(mode, estimator):
    logp, old, ref, adv, mask = random_batch(5)
    lp = torch.tensor(logp, requires_grad=True)
    old_t, ref_t = torch.tensor(old, requires_grad=True), torch.tensor(ref, requires_grad=True)
    loss, stats = grpo_loss(lp, old_t, ref_t, torch.tensor(adv), torch.tensor(mask), max_len=7,
                            cfg=loss_cfg(agg=mode, kl_beta=0.05, kl_estimator=estimator))
    per_tok, _ = np_policy_terms(logp, old, adv, 0.2, 0.28)
    pg = np_aggregate(per_tok, mask, mode, max_len=7)
    kl = np_aggregate(np_kl(logp, ref, estimator), mask, mode, max_len=7)
    assert loss.item() == pytest.approx(pg + 0.05 * kl, rel=1e-9)
    assert stats["pg_loss"] == pytest.approx(pg, rel=1e-9) and stats["kl"] == pytest.approx(kl, rel=1e-9)
    assert {"clip_frac", "ratio_mean", "ratio_max"} <= set(stats)
    loss.backward()
    assert torch.isfinite(lp.grad).all() and torch.all(lp.grad[torch.tensor(mask) == 0] == 0)
    assert old_t.grad is None and ref_t.grad is None  # behaviour and reference log-probs are constants


def test_grpo_loss_on_policy_first_step():
    # old == logp: ratio 1, no clipping; loss = -token_mean(A) + beta * KL
    lp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    d = np.array([0.5, -1.0])
    loss, stats = grpo_loss(lp, lp, ref, torch.tensor([2.0]), torch.ones(1, 2),
                            cfg=loss_cfg(clip_high=0.2, kl_beta=0.1))
    assert loss.item() == pytest.approx(-2.0 + 0.1 * np.mean(np.exp(-d) + d - 1), rel=1e-6)
    assert stats["clip_frac"] == 0.0 and stats["ratio_mean"] == pytest.approx(1.0)


# ---- the learner's loss over shards, normalisers, registries ---------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_shard_losses_with_global_normalisers_add_up_to_the_whole_batch(mode):
    logp, old, ref, adv, mask = random_batch(7, B=6)
    lengths = mask.sum(1).astype(int).tolist()
    dice = np.array([0.7, 0.0, 1.3, 0.4, 0.0, 0.9])  # per-completion DiceCE; 0 = no <seg> in that completion
    found = [True, False, True, True, False, True]
    cfg = loss_cfg(agg=mode, kl_beta=0.05, mask_loss_weight=0.5)
    norm = loss_norm(lengths, sum(found), mode)
    units = sum(lengths) if mode == "token_mean" else sum(1 for n in lengths if n)
    assert norm == LossNorm(float(units), float(sum(lengths)), 4.0)
    shards = []
    for a, b in ((0, 1), (1, 4), (4, 6)):
        t = lambda x: torch.tensor(x[a:b])  # noqa: E731
        loss, stats = grpo_loss(t(logp), t(old), t(ref), t(adv), t(mask), cfg=cfg, max_len=7,
                                dice_sum=torch.tensor(dice[a:b].sum()), norm=norm)
        assert stats["loss"] == pytest.approx(loss.item())
        shards.append(stats)
    total = combine_stats(shards)
    per_tok, clipped = np_policy_terms(logp, old, adv, 0.2, 0.28)
    pg = np_aggregate(per_tok, mask, mode, max_len=7)
    kl = np_aggregate(np_kl(logp, ref, "k3"), mask, mode, max_len=7)
    assert total["pg_loss"] == pytest.approx(pg, rel=1e-9) and total["kl"] == pytest.approx(kl, rel=1e-9)
    assert total["dice_ce"] == pytest.approx(dice.sum() / 4, rel=1e-12)
    assert total["loss"] == pytest.approx(pg + 0.05 * kl + 0.5 * dice.sum() / 4, rel=1e-9)
    assert total["clip_frac"] == pytest.approx(clipped[mask == 1].mean()) and total["tokens"] == sum(lengths)
    ratio = np.exp(logp - old)[mask == 1]
    assert total["ratio_mean"] == pytest.approx(ratio.mean()) and total["ratio_max"] == pytest.approx(ratio.max())


def vanilla_pg(logprobs, old_logprobs, advantages, cfg):
    """A policy loss given by import path in a test: -A * logp (REINFORCE), nothing clipped."""
    per_token = -torch.as_tensor(advantages, dtype=logprobs.dtype)[:, None] * logprobs
    return per_token, torch.zeros_like(per_token, dtype=torch.bool), torch.exp(logprobs - old_logprobs)


def median_baseline(rewards, eps):
    """An advantage estimator given by import path in a test: reward minus the group's median."""
    return rewards - rewards.median(dim=1, keepdim=True).values


def test_policy_loss_and_advantage_by_import_path():
    from coreseg.common.config import ConfigError, load_config

    logp, old, _, adv, mask = random_batch(8)
    loss, _ = grpo_loss(torch.tensor(logp), torch.tensor(old), None, torch.tensor(adv), torch.tensor(mask),
                        cfg=loss_cfg(policy_loss="tests.test_grpo:vanilla_pg"))
    expected = sum(-adv[b] * logp[b, t] for b in range(4) for t in range(6) if mask[b, t]) / mask.sum()
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    got, _, _ = group_advantages([[1.0, 5.0, 2.0], [3.0, 3.0, 3.0]], mode="tests.test_grpo:median_baseline")
    assert got.tolist() == [[-1.0, 3.0, 0.0], [0.0, 0.0, 0.0]]
    cfg = load_config("tiny_cpu", ["learner.policy_loss=tests.test_grpo:vanilla_pg",
                                   "learner.advantage=tests.test_grpo:median_baseline"])
    assert cfg.learner.policy_loss == "tests.test_grpo:vanilla_pg"
    for key, value in (("learner.policy_loss", "ppo_clipx"), ("learner.advantage", "tests.test_grpo:missing"),
                       ("learner.advantage", "no_such_module:fn")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config("tiny_cpu", [f"{key}={value}"])
