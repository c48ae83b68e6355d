"""The step's batch bookkeeping (deploy/step.py) without Ray: which groups reach the learner and with what."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from coreseg.common.protocol import Completion, ForwardResult, RolloutGroup, Score
from coreseg.deploy.step import Answered, TrainBatch, logprob_diff, timed
from coreseg.learner.grpo import group_advantages, grpo_loss, loss_norm

G, H = 3, 4


def answered(rewards, lengths=5, seed=0):
    """P groups of G completions with the given rewards, random log-probs and `<seg>` states."""
    rng = np.random.default_rng(seed)
    P = len(rewards)
    samples = [SimpleNamespace(id=f"s{k}") for k in range(P)]
    groups = [RolloutGroup(f"s{k}", [Completion("", [], list(range(lengths)), list(-rng.random(lengths)), "stop", 0)
                                     for _ in range(G)]) for k in range(P)]
    forward = ForwardResult([-rng.random(lengths).astype(np.float32) for _ in range(P * G)], [],
                            rng.normal(size=(P * G, H)).astype(np.float32), rng.random(P * G) > 0.3)
    scores = [Score(float(r), {"format": 0.0}, [], 0.0, 0.0, True) for row in rewards for r in row]
    return Answered(samples, groups, forward, scores, [])


def test_flat_groups_are_removed_from_samples_forward_advantages_and_normaliser():
    rewards = [[1.0, 0.0, 2.0], [1.0, 1.0, 1.0], [0.5, 0.5, 0.5], [3.0, 1.0, 2.0]]
    ans = answered(rewards)
    adv, keep, dropped = group_advantages(rewards, drop_zero_variance=True)
    batch = TrainBatch()
    batch.add(ans, np.flatnonzero(keep.numpy()), adv.numpy())
    assert dropped == 2 and [s.id for s in batch.samples] == ["s0", "s3"]
    rows = [0, 1, 2, 9, 10, 11]
    np.testing.assert_array_equal(batch.forward.seg_states, ans.forward.seg_states[rows])
    np.testing.assert_array_equal(batch.forward.seg_found, ans.forward.seg_found[rows])
    assert all(np.array_equal(a, ans.forward.logprobs[r]) for a, r in zip(batch.forward.logprobs, rows))
    np.testing.assert_allclose(batch.advantages, adv.numpy()[[0, 3]].reshape(-1))


def test_filtering_doubles_the_gradient_when_half_the_groups_are_flat():
    """DAPO's filter: with 2 of 4 groups flat and equal lengths, the token-mean normaliser halves, so the
    gradient is 2x the unfiltered one (multiplying advantages by a keep mask would leave it unchanged)."""
    rewards = [[1.0, 0.0, 2.0], [1.0, 1.0, 1.0], [0.5, 0.5, 0.5], [3.0, 1.0, 2.0]]
    cfg = SimpleNamespace(clip_low=0.2, clip_high=0.28, loss_agg="token_mean", kl_beta=0.0, kl_estimator="k3",
                          mask_loss_weight=0.0, policy_loss="ppo_clip")

    def grad(batch):
        lp = torch.zeros(len(batch.advantages), 5, dtype=torch.float64, requires_grad=True)
        norm = loss_norm([5] * len(batch.advantages), 0, "token_mean")
        loss, _ = grpo_loss(lp, lp.detach(), None, torch.tensor(batch.advantages), torch.ones_like(lp), cfg=cfg,
                            norm=norm)
        loss.backward()
        return lp.grad

    ans = answered(rewards)
    full, kept = TrainBatch(), TrainBatch()
    adv, keep, _ = group_advantages(rewards, drop_zero_variance=True)
    full.add(ans, np.arange(4), adv.numpy())
    kept.add(ans, np.flatnonzero(keep.numpy()), adv.numpy())
    g_full, g_kept = grad(full), grad(kept)
    torch.testing.assert_close(g_kept, 2 * g_full[[0, 1, 2, 9, 10, 11]])
    assert torch.all(g_full[3:9] == 0)


def test_truncate_keeps_the_first_groups_of_an_overfull_batch():
    ans = answered([[1.0, 0.0, 2.0], [0.0, 1.0, 1.0], [3.0, 1.0, 2.0]])
    adv, _, _ = group_advantages([[1.0, 0.0, 2.0], [0.0, 1.0, 1.0], [3.0, 1.0, 2.0]])
    batch = TrainBatch()
    batch.add(ans, np.array([0, 1]), adv.numpy())
    batch.add(ans, np.array([2]), adv.numpy())
    batch.truncate(2)
    assert [s.id for s in batch.samples] == ["s0", "s1"] and len(batch.forward.logprobs) == 2 * G
    np.testing.assert_array_equal(batch.forward.seg_states, ans.forward.seg_states[:2 * G])
    np.testing.assert_allclose(batch.advantages, adv.numpy()[:2].reshape(-1))


def test_logprob_diff_and_timed_accumulate():
    groups = [RolloutGroup("a", [Completion("", [], [1, 2], [-1.0, -2.0], "stop", 0),
                                 Completion("", [], [3], [-0.5], "stop", 0)])]
    forward = ForwardResult([np.array([-1.5, -2.0]), np.array([-0.25])], [], np.zeros((2, 1)), np.zeros(2, bool))
    assert logprob_diff(groups, forward) == pytest.approx((0.5 + 0.0 + 0.25) / 3)
    timings = {}
    for _ in range(2):
        with timed(timings, "x"):
            pass
    assert set(timings) == {"time/x"} and timings["time/x"] >= 0


def test_a_torn_last_metrics_line_is_dropped_and_a_bad_middle_line_named(tmp_path):
    import json
    import warnings

    from coreseg.deploy.metrics_log import MetricsLogger, read_metrics

    log = MetricsLogger(tmp_path, tensorboard=False)
    for step in (1, 2, 3):
        log.log("grpo", step, {"reward/total": float(step)})
    path = tmp_path / "metrics.jsonl"
    with path.open("a") as f:
        f.write('{"phase": "grpo", "step": 4, "rew')  # a write cut by a full disk
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3] and "line 4 is a torn record" in str(caught[0].message)
    log.truncate_after("grpo", 2)  # resume from step 2: the torn line and step 3 go, whole lines stay
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    path.write_text('{"phase": "grpo", "step": 1}\nnot json\n{"phase": "grpo", "step": 2}\n')
    with pytest.raises(ValueError, match="metrics.jsonl: line 2"):
        read_metrics(path)
