"""pass@k against brute force, bootstrap intervals (incl. elementwise means with NaN padding), paired tests."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from btp.stats import (
    bootstrap_ci,
    bootstrap_mean,
    ks_up_to,
    mcnemar,
    paired_bootstrap,
    pass_at_k,
    pass_at_k_summary,
    wilson_ci,
)


def _brute(n: int, c: int, k: int) -> float:
    """Fraction of k-subsets of n samples (c correct) with at least one correct."""
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n,c,k", [(5, 0, 1), (5, 1, 1), (5, 2, 2), (6, 3, 4), (7, 1, 7), (8, 5, 3), (4, 4, 2)])
def test_pass_at_k_matches_brute_force(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(_brute(n, c, k), abs=1e-12)


def test_pass_at_k_vectorised_and_human_eval_formula():
    n = np.array([10, 10, 20, 0])
    c = np.array([0, 3, 20, 0])
    got = pass_at_k(n, c, 5)
    assert got[0] == 0 and got[2] == 1 and got[3] == 0  # no samples counts as failed
    assert got[1] == pytest.approx(1 - math.comb(7, 5) / math.comb(10, 5))
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)


def test_pass_at_k_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 5 samples"):
        pass_at_k([3], [1], 5)
    with pytest.raises(ValueError):
        pass_at_k([3], [4], 1)
    with pytest.raises(ValueError):
        pass_at_k([3], [1], 0)


def test_ks_up_to():
    assert ks_up_to(1) == [1]
    assert ks_up_to(3) == [1, 2, 3]
    assert ks_up_to(10) == [1, 2, 5, 10]
    assert ks_up_to(16) == [1, 2, 5, 10, 16]


def test_bootstrap_ci_mean_contains_truth_and_shrinks():
    rng = np.random.default_rng(1)
    small = rng.binomial(1, 0.3, 50).astype(float)
    big = rng.binomial(1, 0.3, 5000).astype(float)
    a, b = bootstrap_ci(small, n_boot=4000, seed=0), bootstrap_ci(big, n_boot=4000, seed=0)
    assert a.low <= a.estimate <= a.high and b.low <= b.estimate <= b.high
    assert b.low < 0.3 < b.high
    assert (b.high - b.low) < (a.high - a.low) / 5
    # the normal-approximation width for a proportion, as a sanity check of scale
    se = math.sqrt(0.3 * 0.7 / 5000)
    assert (b.high - b.low) == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert bootstrap_ci(small, n_boot=500, seed=3) == bootstrap_ci(small, n_boot=500, seed=3)  # seeded


def test_bootstrap_ci_is_generic_over_trailing_axes_and_stats():
    rng = np.random.default_rng(2)
    v = rng.normal(size=(200, 3, 4)) + np.arange(12).reshape(3, 4)
    ci = bootstrap_ci(v, n_boot=300, seed=0)
    assert ci.estimate.shape == ci.low.shape == ci.high.shape == (3, 4)
    assert np.all(ci.low < ci.estimate) and np.all(ci.estimate < ci.high)
    assert np.allclose(ci.estimate, v.mean(axis=0))
    med = bootstrap_ci(v, stat=lambda a: np.median(a, axis=0), n_boot=200, seed=0)
    assert med.estimate.shape == (3, 4) and np.allclose(med.estimate, np.median(v, axis=0))
    # mean via the vectorised path and via a generic callable agree in distribution
    gen = bootstrap_ci(v[:, 0, 0], stat=lambda a: a.mean(), n_boot=3000, seed=5)
    fast = bootstrap_ci(v[:, 0, 0], n_boot=3000, seed=5)
    assert gen.low == pytest.approx(fast.low, abs=0.05) and gen.high == pytest.approx(fast.high, abs=0.05)
    with pytest.raises(ValueError):
        bootstrap_ci([])


def test_pass_at_k_summary():
    n = np.full(100, 10)
    c = np.r_[np.zeros(50, int), np.full(50, 10)]
    s = pass_at_k_summary(n, c, [1, 5, 10], n_boot=500)
    assert s["pass@1"]["estimate"] == pytest.approx(0.5)
    assert s["pass@10"]["estimate"] == pytest.approx(0.5)
    assert s["pass@1"]["ci_low"] < 0.5 < s["pass@1"]["ci_high"]


def test_paired_bootstrap_and_mcnemar_detect_a_difference():
    rng = np.random.default_rng(3)
    base = rng.binomial(1, 0.5, 400).astype(float)
    better = np.maximum(base, rng.binomial(1, 0.3, 400))  # only ever flips fail -> pass
    r = paired_bootstrap(better, base, n_boot=2000)
    assert r.diff > 0 and r.low > 0 and r.p_value < 0.01
    same = paired_bootstrap(base, base[rng.permutation(400)], n_boot=2000)
    assert same.low < 0 < same.high and same.p_value > 0.05
    m = mcnemar(better.astype(bool), base.astype(bool))
    assert m.only_b == 0 and m.only_a > 10 and m.p_value < 1e-3
    # exact values: 10 discordant pairs all one way -> 2 * 0.5**10
    a = np.array([1] * 10 + [0] * 5, bool)
    b = np.array([0] * 10 + [0] * 5, bool)
    assert mcnemar(a, b).p_value == pytest.approx(2 * 0.5**10)
    assert mcnemar(a, a).p_value == 1.0
    # 3 vs 1 discordant: two-sided exact p = 2 * P(X <= 1 | n=4) = 2 * 5/16
    a2 = np.array([1, 1, 1, 0, 0], bool)
    b2 = np.array([0, 0, 0, 1, 0], bool)
    assert mcnemar(a2, b2).p_value == pytest.approx(0.625)


def test_paired_bootstrap_generic_stat_shapes():
    rng = np.random.default_rng(4)
    a, b = rng.normal(1, 1, (300, 2)), rng.normal(0, 1, (300, 2))
    r = paired_bootstrap(a, b, stat=lambda x: np.median(x, axis=0), n_boot=300)
    assert r.diff.shape == (2,) and np.all(r.low > 0)
    with pytest.raises(ValueError):
        paired_bootstrap(a, b[:10])


def test_bootstrap_mean_elementwise_with_nan_padding():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 3, 4))
    x[:, 1, 3] = np.nan  # a padding head: NaN in every sample
    x[5, 2, 0] = np.nan  # NaN in one sample only: the entry has no mean either
    r = bootstrap_mean(x, n_boot=300, seed=4)
    m, lo, hi = r  # unpacks as (mean, low, high)
    assert m.shape == lo.shape == hi.shape == (3, 4) and r.mean is m and r.high is hi
    ok = np.isfinite(x).all(0)
    assert ok.sum() == 10 and np.isnan(m[~ok]).all() and np.isnan(lo[~ok]).all() and np.isnan(hi[~ok]).all()
    ci = bootstrap_ci(x.reshape(12, -1)[:, ok.ravel()], n_boot=300, seed=4)
    np.testing.assert_array_equal(m[ok], ci.estimate)
    np.testing.assert_array_equal(lo[ok], ci.low)
    np.testing.assert_array_equal(hi[ok], ci.high)
    np.testing.assert_allclose(m[ok], x.mean(0)[ok])
    one = bootstrap_mean(x[:, 0, 0], n_boot=300, seed=4)  # one value per sample: 0-d arrays
    assert one.mean.shape == () and float(one.low) <= float(one.mean) <= float(one.high)
    empty = bootstrap_mean(np.zeros((0, 2)))
    assert np.isnan(empty.mean).all() and empty.mean.shape == (2,)


def test_clustered_mean_resamples_problems_and_skips_nan_samples():
    """Issue 12.7 / 12.3: samples of one problem are one cluster (averaged first, problems resampled), and a NaN
    sample drops out of its entry only instead of erasing it."""
    from btp.stats import cluster_means, clustered_mean

    rng = np.random.default_rng(0)
    level = rng.normal(0, 1, 20)  # problem difficulty
    pids = np.repeat([f"p{i}" for i in range(20)], 5)  # 5 near-identical samples per problem
    x = level[np.repeat(np.arange(20), 5)] + rng.normal(0, 0.01, 100)
    naive = bootstrap_mean(x, n_boot=2000, seed=1)
    cl = clustered_mean(x, pids, n_boot=2000, seed=1)
    assert (cl.high - cl.low) > 1.8 * (naive.high - naive.low)  # ~sqrt(5) wider: 20 problems, not 100 samples
    assert int(cl.n) == 20
    # uneven samples per problem: every problem weighs the same
    m = clustered_mean(np.array([1.0, 1.0, 1.0, 4.0]), ["a", "a", "a", "b"], n_boot=50)
    assert float(m.mean) == pytest.approx(2.5)
    cm, cnt = cluster_means(np.array([[1.0, np.nan], [3.0, 5.0], [7.0, 9.0]]), ["b", "b", "a"])
    np.testing.assert_allclose(cm, [[2.0, 5.0], [7.0, 9.0]]) and np.testing.assert_array_equal(cnt, [[2, 1], [1, 1]])
    # one NaN sample no longer erases an entry; an all-NaN entry (padding) stays NaN with n = 0
    y = rng.normal(size=(6, 3))
    y[2, 0] = np.nan
    y[:, 2] = np.nan
    r = clustered_mean(y, None, n_boot=200, seed=0)
    assert r.mean[0] == pytest.approx(np.nanmean(y[:, 0])) and r.low[0] <= r.mean[0] <= r.high[0]
    assert np.isnan(r.mean[2]) and np.isnan(r.low[2]) and r.n.tolist() == [5, 6, 0]


def test_random_control_band_holds_the_spread_between_draws():
    """Issue 12.8: a band over samples of the draw-averaged curve misses how much random draws differ; resampling
    draws and problems together does not."""
    from btp.stats import clustered_mean, draws_clustered_mean

    rng = np.random.default_rng(0)
    draws = rng.normal(0, 1, (5, 1)) + rng.normal(0, 0.01, (5, 40))  # 5 draws far apart, samples alike
    pids = [f"p{i}" for i in range(40)]
    naive = clustered_mean(draws.mean(0), pids, n_boot=500)
    both = draws_clustered_mean(draws, pids, n_boot=500)
    assert float(both.mean) == pytest.approx(draws.mean())
    assert (both.high - both.low) > 20 * (naive.high - naive.low)


# Wilson score 95% intervals as published (e.g. Newcombe 1998, Table I; Brown, Cai & DasGupta 2001), to 4 places
@pytest.mark.parametrize(
    "x,n,low,high",
    [(0, 5, 0.0, 0.4345), (5, 5, 0.5655, 1.0), (3, 10, 0.1078, 0.6032), (50, 100, 0.4038, 0.5962), (0, 1, 0.0, 0.7935)],
)
def test_wilson_known_values(x, n, low, high):
    lo, hi = wilson_ci(x, n)
    assert lo == pytest.approx(low, abs=5e-5) and hi == pytest.approx(high, abs=5e-5)


def test_pass_at_k_summary_boundaries_are_not_degenerate():
    for c, inside in ((0, 0.0), (1, 1.0)):  # 0/5 and 5/5 problems solved, one sample each
        s = pass_at_k_summary([1] * 5, [c] * 5, [1], n_boot=200)["pass@1"]
        assert s["ci_low"] == s["ci_high"] == inside  # the bootstrap has nothing to resample
        assert s["wilson_low"] < s["wilson_high"] and s["wilson_low"] <= inside <= s["wilson_high"]
        assert s["wilson_high"] - s["wilson_low"] == pytest.approx(0.4345, abs=5e-5) and s["n_problems"] == 5
    with pytest.raises(ValueError):
        wilson_ci(6, 5)
