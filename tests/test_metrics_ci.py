"""Intervals of the eval metrics: bootstrap over samples (checked against scipy.stats.bootstrap and the normal
approximation) and Student t over seeds (checked against a hand-worked example)."""
import numpy as np
import pytest
from scipy import stats

from coreseg.common.metrics import (bootstrap_ci, markdown_deltas, markdown_table_ci, paired_delta_ci, paired_deltas,
                            summarize_ci, t_interval)


def test_bootstrap_ci_matches_scipy_percentile_bootstrap():
    x = np.random.default_rng(1).beta(2, 3, size=300)
    lo, hi = bootstrap_ci(x, n_boot=20000)
    ref = stats.bootstrap((x,), np.mean, n_resamples=20000, method="percentile", confidence_level=0.95,
                          random_state=np.random.default_rng(7)).confidence_interval
    assert abs(lo - ref.low) < 0.003 and abs(hi - ref.high) < 0.003
    # and the normal approximation mean +- 1.96 s / sqrt(n)
    half = 1.959964 * x.std(ddof=1) / np.sqrt(x.size)
    assert abs(lo - (x.mean() - half)) < 0.004 and abs(hi - (x.mean() + half)) < 0.004


def test_bootstrap_ci_degenerate_inputs():
    assert bootstrap_ci([0.3]) == (0.3, 0.3)
    assert all(np.isnan(bootstrap_ci([])))
    assert bootstrap_ci([0.5] * 10) == (0.5, 0.5)


def test_paired_delta_ci_narrower_than_unpaired_and_matches_scipy():
    rng = np.random.default_rng(2)
    difficulty = rng.random(400)
    before = np.clip(difficulty + rng.normal(0, 0.05, 400), 0, 1)
    after = np.clip(difficulty + 0.02 + rng.normal(0, 0.05, 400), 0, 1)
    mean, lo, hi = paired_delta_ci(before, after, n_boot=20000)
    diff = after - before
    assert np.isclose(mean, diff.mean())
    ref = stats.bootstrap((diff,), np.mean, n_resamples=20000, method="percentile",
                          random_state=np.random.default_rng(3)).confidence_interval
    assert abs(lo - ref.low) < 0.002 and abs(hi - ref.high) < 0.002
    assert lo > 0  # a 0.02 shift over 400 paired samples with per-sample noise 0.07 is resolved
    # unpaired, the between-sample spread (std ~0.29) swamps it
    ulo_a, uhi_a = bootstrap_ci(before)
    assert (uhi_a - ulo_a) > 3 * (hi - lo)  # widths scale with the std: ~0.29 vs ~0.07
    with pytest.raises(ValueError, match="same samples"):
        paired_delta_ci([1, 2], [1, 2, 3])


def test_t_interval_hand_worked():
    # values 0.40, 0.44, 0.48: mean 0.44, s = 0.04, t_{0.975, 2} = 4.302653 -> half-width 4.302653*0.04/sqrt(3)
    mean, lo, hi = t_interval([0.40, 0.44, 0.48])
    half = 4.302653 * 0.04 / np.sqrt(3)
    assert np.isclose(mean, 0.44) and np.isclose(lo, 0.44 - half, atol=1e-6) and np.isclose(hi, 0.44 + half, atol=1e-6)
    m1, lo1, hi1 = t_interval([0.5])
    assert m1 == 0.5 and np.isnan(lo1) and np.isnan(hi1)


def _records(dices, formats=None, prefix="s"):
    formats = formats or [True] * len(dices)
    return [{"id": f"{prefix}{i}", "dice": d, "iou": d / (2 - d), "format_ok": f, "modality": "ct"}
            for i, (d, f) in enumerate(zip(dices, formats))]


def test_summarize_ci_bounds_bracket_means_and_failure_flags():
    dices = list(np.random.default_rng(4).choice([0.0, 0.3, 0.6, 0.9], size=200))
    recs = _records(dices)
    out = summarize_ci(recs)
    fails = np.array([d == 0.0 for d in dices], float)
    assert np.isclose(out["failure_rate"], fails.mean())
    for k in ("mDice", "mIoU", "failure_rate"):
        assert out[f"{k}_lo"] < out[k] < out[f"{k}_hi"]
    # the failure-rate interval ~ the binomial normal approximation p +- 1.96 sqrt(p(1-p)/n)
    p = fails.mean()
    half = 1.96 * np.sqrt(p * (1 - p) / 200)
    assert abs(out["failure_rate_lo"] - (p - half)) < 0.01 and abs(out["failure_rate_hi"] - (p + half)) < 0.01
    table = markdown_table_ci({"val": out})
    assert f"| val | 200 | {out['mDice']:.4f} [{out['mDice_lo']:.3f}, {out['mDice_hi']:.3f}]" in table


def test_paired_deltas_match_samples_by_id():
    before = _records([0.2, 0.4, 0.0, 0.8])
    after = _records([0.3, 0.4, 0.5], prefix="s")[::-1]  # order differs, s3 missing after
    d = paired_deltas(before, after)
    assert d["n"] == 3
    assert np.isclose(d["d_mDice"], np.mean([0.1, 0.0, 0.5]))
    assert np.isclose(d["d_failure_rate"], -1 / 3)  # s2 failed before (Dice 0), not after
    assert "| val | 3 | +0.2000" in markdown_deltas({"val": d}, "step 0", "step 20")
    assert paired_deltas(before, _records([0.5], prefix="x")) == {"n": 0}
