"""Pure statistics: unbiased pass@k, bootstrap confidence intervals over problems (or samples), Wilson score
intervals, paired tests.

Every function takes arrays and returns numbers; nothing here reads files or runs code, so stages
(evaluate, ablation, taylor) share one implementation of each estimate and its interval.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

DEFAULT_KS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


def pass_at_k(n: int | np.ndarray, c: int | np.ndarray, k: int) -> np.ndarray:
    """Unbiased pass@k per problem (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), computed as a
    stable product. `n` samples, `c` of them correct; broadcasts. Problems with n = 0 count 0."""
    n, c = np.broadcast_arrays(np.asarray(n, dtype=np.int64), np.asarray(c, dtype=np.int64))
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if np.any(c < 0) or np.any(c > n):
        raise ValueError("need 0 <= c <= n for every problem")
    if np.any((n > 0) & (n < k)):
        raise ValueError(f"pass@{k} needs at least {k} samples per problem (min n = {int(n[n > 0].min())})")
    out = np.zeros(n.shape, dtype=np.float64)
    for idx in np.ndindex(n.shape):
        ni, ci = int(n[idx]), int(c[idx])
        if ni == 0 or ci == 0:
            continue
        out[idx] = 1.0 if ni - ci < k else 1.0 - float(np.prod(1.0 - k / np.arange(ni - ci + 1, ni + 1)))
    return out


def ks_up_to(n: int, ks: Sequence[int] = DEFAULT_KS) -> list[int]:
    """The k to report for n samples per problem: the standard ones up to n, and n itself."""
    out = [k for k in ks if k <= n]
    if n >= 1 and n not in out:
        out.append(n)
    return out


@dataclass(frozen=True)
class CI:
    estimate: np.ndarray | float
    low: np.ndarray | float
    high: np.ndarray | float
    alpha: float
    n_boot: int

    def as_dict(self) -> dict:
        f = lambda v: np.asarray(v).tolist()  # noqa: E731
        return {
            "estimate": f(self.estimate),
            "ci_low": f(self.low),
            "ci_high": f(self.high),
            "ci_level": 1 - self.alpha,
            "n_boot": self.n_boot,
        }


def _mean0(a: np.ndarray) -> np.ndarray:
    return a.mean(axis=0)


def _boot_stats(
    values: np.ndarray, stat: Callable | None, n_boot: int, rng: np.random.Generator, chunk_elems: int = 1 << 23
) -> np.ndarray:
    """[n_boot, ...] statistics of resamples (with replacement) of the rows of `values`."""
    n = values.shape[0]
    if stat is None:  # the mean: resample counts and a matrix product, no copies of the data
        flat = values.reshape(n, -1).astype(np.float64)
        out = np.empty((n_boot, flat.shape[1]))
        step = max(1, chunk_elems // max(n, 1))
        for s in range(0, n_boot, step):
            m = min(step, n_boot - s)
            counts = rng.multinomial(n, np.full(n, 1.0 / n), size=m)
            out[s : s + m] = counts @ flat / n
        return out.reshape((n_boot,) + values.shape[1:])
    return np.stack([np.asarray(stat(values[rng.integers(0, n, n)])) for _ in range(n_boot)])


def bootstrap_ci(
    values: Sequence | np.ndarray,
    stat: Callable[[np.ndarray], np.ndarray] | None = None,
    n_boot: int = 10000,
    alpha: float = 0.05,
    seed: int = 0,
) -> CI:
    """Percentile bootstrap CI of `stat` over the first axis of a [samples, ...] array (samples are
    resampled whole rows, e.g. problems). `stat` maps a [samples, ...] array to an array of the
    trailing shape; default the mean over axis 0 (vectorised)."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 0 or v.shape[0] == 0:
        raise ValueError("bootstrap_ci needs a non-empty [samples, ...] array")
    if not 0 < alpha < 1 or n_boot < 1:
        raise ValueError("need 0 < alpha < 1 and n_boot >= 1")
    f = stat or _mean0
    boots = _boot_stats(v, stat, n_boot, np.random.default_rng(seed))
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2], axis=0)
    est = np.asarray(f(v))
    scalar = est.ndim == 0
    return CI(float(est) if scalar else est, float(lo) if scalar else lo, float(hi) if scalar else hi, alpha, n_boot)


class MeanCI(NamedTuple):
    """Elementwise mean over samples and its percentile bootstrap interval (`bootstrap_mean`)."""

    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray


def bootstrap_mean(x: np.ndarray, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> MeanCI:
    """Mean over axis 0 (samples) and a percentile bootstrap CI over samples (`bootstrap_ci`), elementwise over
    the other axes. Entries NaN in any sample (padding heads) stay NaN; no samples gives all NaN."""
    x = np.asarray(x, dtype=np.float64)
    S = x.shape[0]
    flat = x.reshape(S, math.prod(x.shape[1:]))  # not -1: it cannot be inferred for S = 0
    ok = np.isfinite(flat).all(0) if S else np.zeros(flat.shape[1], bool)
    mean, lo, hi = (np.full(flat.shape[1], np.nan) for _ in range(3))
    if S and ok.any():
        ci = bootstrap_ci(flat[:, ok], n_boot=n_boot, alpha=alpha, seed=seed)
        mean[ok], lo[ok], hi[ok] = ci.estimate, ci.low, ci.high
    shape = x.shape[1:]
    return MeanCI(mean.reshape(shape), lo.reshape(shape), hi.reshape(shape))


class ClusteredMean(NamedTuple):
    """Elementwise mean of cluster means, its percentile bootstrap interval over clusters, and the number of
    clusters behind each entry (`clustered_mean`)."""

    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray
    n: np.ndarray


CLUSTERED_CI = (
    "percentile bootstrap over problems: samples averaged within a problem first, problems resampled; "
    "NaN samples skipped per entry"
)


def cluster_means(x: np.ndarray, clusters: Sequence | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """([C, ...] NaN-aware mean of each cluster's rows of `x` [S, ...], [C, ...] finite rows behind it), clusters in
    order of first appearance. An entry with no finite row in a cluster is NaN with count 0."""
    x = np.asarray(x, dtype=np.float64)
    labels = np.asarray(clusters)
    if labels.shape[:1] != x.shape[:1]:
        raise ValueError(f"{labels.shape[0] if labels.ndim else 0} cluster labels for {x.shape[0]} rows")
    _, first, inv = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.argsort(np.argsort(first))  # cluster index by first appearance
    C = len(first)
    flat = x.reshape(x.shape[0], -1)
    fin = np.isfinite(flat)
    sums, cnt = np.zeros((C, flat.shape[1])), np.zeros((C, flat.shape[1]))
    np.add.at(sums, rank[inv.ravel()], np.where(fin, flat, 0.0))
    np.add.at(cnt, rank[inv.ravel()], fin)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / cnt
    shape = (C,) + x.shape[1:]
    return means.reshape(shape), cnt.astype(np.int64).reshape(shape)


def clustered_mean(
    x: np.ndarray,
    clusters: Sequence | np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    chunk_elems: int = 1 << 23,
) -> ClusteredMean:
    """Mean over clusters (problems) of the within-cluster means of `x` [S, ...], elementwise, with a percentile
    bootstrap CI that resamples clusters, not rows: samples of one problem are not independent, and averaging within
    a problem first weights every problem equally. NaN-aware per entry: a NaN row (a sample with nothing scored)
    drops out of that entry only; an entry with no finite value anywhere is NaN (`n` = 0). `clusters` None: every
    row its own cluster."""
    x = np.asarray(x, dtype=np.float64)
    if not 0 < alpha < 1 or n_boot < 1:
        raise ValueError("need 0 < alpha < 1 and n_boot >= 1")
    shape = x.shape[1:]
    clusters = np.arange(x.shape[0]) if clusters is None else clusters
    cm, cnt = cluster_means(x, clusters)
    C = cm.shape[0]
    cm, has = cm.reshape(C, -1), (cnt.reshape(C, -1) > 0)
    vals, w_has = np.where(has, cm, 0.0), has.astype(np.float64)
    n = has.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        est = vals.sum(0) / n
    lo, hi = np.full_like(est, np.nan), np.full_like(est, np.nan)
    if C and n.any():
        rng = np.random.default_rng(seed)
        boots = np.empty((n_boot, vals.shape[1]))
        step = max(1, chunk_elems // max(C, vals.shape[1], 1))
        for s in range(0, n_boot, step):
            m = min(step, n_boot - s)
            w = rng.multinomial(C, np.full(C, 1.0 / C), size=m).astype(np.float64)
            with np.errstate(invalid="ignore", divide="ignore"):
                boots[s : s + m] = (w @ vals) / (w @ w_has)
        ok = n > 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # resamples without any finite cluster of an entry
            lo[ok], hi[ok] = np.nanquantile(boots[:, ok], [alpha / 2, 1 - alpha / 2], axis=0)
    return ClusteredMean(est.reshape(shape), lo.reshape(shape), hi.reshape(shape), n.astype(np.int64).reshape(shape))


def draws_clustered_mean(
    x: np.ndarray, clusters: Sequence | np.ndarray, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> ClusteredMean:
    """Mean over random draws (e.g. random head sets) and problems of `x` [D, S, ...], with a percentile bootstrap
    that resamples draws and problems together (samples averaged within a problem first): the band of a random
    control then holds the spread between draws, not only between samples. `n`: the problems behind each entry."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError("draws_clustered_mean needs a [draws, samples, ...] array with at least one draw")
    shape = x.shape[2:]
    cm = np.stack([cluster_means(d, clusters)[0] for d in x])  # [D, C, ...]
    D, C = cm.shape[:2]
    flat = cm.reshape(D, C, -1)
    est = flat.mean((0, 1))
    rng = np.random.default_rng(seed)
    wd = rng.multinomial(D, np.full(D, 1.0 / D), size=n_boot) / D
    wc = rng.multinomial(C, np.full(C, 1.0 / C), size=n_boot) / C
    boots = np.einsum("bd,dck,bc->bk", wd, flat, wc)
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2], axis=0)
    return ClusteredMean(est.reshape(shape), lo.reshape(shape), hi.reshape(shape), np.full(shape, C, np.int64))


SMALL_N = 10  # below this many problems an interval rests on too few points to trust: figures and summaries say so
WILSON = (
    "Wilson score interval over problems: successes = estimate x problems (exact for pass@1 with one sample per "
    "problem; otherwise conservative, as a per-problem value in [0, 1] varies at most as a Bernoulli of its mean)"
)


def wilson_ci(successes: float, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson score interval of a proportion `successes / n`: unlike a bootstrap or the normal interval it does not
    collapse to a point at 0/n or n/n, and it stays inside [0, 1]. `successes` may be fractional (a mean of
    per-problem values times n). n = 0 gives (0, 1)."""
    if n < 0 or not 0 <= successes <= n or not 0 < alpha < 1:
        raise ValueError(f"need 0 <= successes <= n and 0 < alpha < 1, got {successes}/{n}, alpha {alpha}")
    if n == 0:
        return 0.0, 1.0
    z = statistics.NormalDist().inv_cdf(1 - alpha / 2)
    p, z2 = successes / n, z * z
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def pass_at_k_summary(
    n: Sequence[int], c: Sequence[int], ks: Sequence[int], n_boot: int = 10000, alpha: float = 0.05, seed: int = 0
) -> dict[str, dict]:
    """{"pass@k": {estimate, ci_low, ci_high (bootstrap), wilson_low, wilson_high, n_problems, ...}} over problems;
    one bootstrap draws all k at once. The bootstrap interval collapses to a point at 0% or 100% and is unreliable
    for few problems; the Wilson interval beside it (`WILSON`) does not."""
    n, c = np.asarray(n), np.asarray(c)
    table = np.stack([pass_at_k(n, c, k) for k in ks], axis=1)  # [problems, ks]
    ci = bootstrap_ci(table, n_boot=n_boot, alpha=alpha, seed=seed)
    P = len(n)
    out = {}
    for j, k in enumerate(ks):
        est = float(ci.estimate[j])
        lo, hi = wilson_ci(min(P, max(0.0, est * P)), P, alpha)
        out[f"pass@{k}"] = {
            "estimate": est,
            "ci_low": float(ci.low[j]),
            "ci_high": float(ci.high[j]),
            "ci_level": 1 - alpha,
            "n_boot": n_boot,
            "wilson_low": lo,
            "wilson_high": hi,
            "n_problems": P,
        }
    return out


@dataclass(frozen=True)
class PairedResult:
    diff: float | np.ndarray  # stat(a) - stat(b)
    low: float | np.ndarray
    high: float | np.ndarray
    p_value: float | np.ndarray  # two-sided, H0: no difference
    n_boot: int


def paired_bootstrap(
    a: Sequence | np.ndarray,
    b: Sequence | np.ndarray,
    stat: Callable[[np.ndarray], np.ndarray] | None = None,
    n_boot: int = 10000,
    alpha: float = 0.05,
    seed: int = 0,
) -> PairedResult:
    """Paired bootstrap of stat(a) - stat(b): rows of `a` and `b` belong together (the same problem
    under two runs) and are resampled together. p-value: twice the smaller tail of the bootstrap
    distribution of the difference at 0 (percentile method), capped at 1."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired arrays differ in shape: {a.shape} vs {b.shape}")
    boots = _boot_stats(a - b, stat, n_boot, np.random.default_rng(seed)) if stat is None else None
    if boots is None:  # a general stat is not linear: resample indices and apply it to each side
        rng, n = np.random.default_rng(seed), a.shape[0]
        boots = np.stack(
            [np.asarray(stat(a[i])) - np.asarray(stat(b[i])) for i in (rng.integers(0, n, n) for _ in range(n_boot))]
        )
    f = stat or _mean0
    d = np.asarray(f(a)) - np.asarray(f(b))
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2], axis=0)
    p = np.minimum(1.0, 2 * np.minimum((boots <= 0).mean(axis=0), (boots >= 0).mean(axis=0)))
    sc = d.ndim == 0
    return PairedResult(
        float(d) if sc else d, float(lo) if sc else lo, float(hi) if sc else hi, float(p) if sc else p, n_boot
    )


@dataclass(frozen=True)
class McNemar:
    only_a: int  # pairs where a passed and b did not
    only_b: int
    p_value: float  # exact two-sided binomial test on the discordant pairs


def mcnemar(a: Sequence[bool] | np.ndarray, b: Sequence[bool] | np.ndarray) -> McNemar:
    """Exact McNemar test for two paired pass/fail vectors (e.g. one sample per problem, two runs)."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired arrays differ in shape: {a.shape} vs {b.shape}")
    n01, n10 = int((a & ~b).sum()), int((~a & b).sum())
    m = n01 + n10
    if m == 0:
        return McNemar(n01, n10, 1.0)
    tail = sum(math.comb(m, i) for i in range(min(n01, n10) + 1)) / 2**m
    return McNemar(n01, n10, min(1.0, 2 * tail))


# ---------------------------------------------------------------- estimate vs exact


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 with ties given their average rank (as Spearman needs)."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    _, inv, cnt = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=r)
    return (sums / cnt)[inv]


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else float("nan")


def agreement(estimate: np.ndarray, exact: np.ndarray, ks: Sequence[int] = (10,), n_misses: int = 10) -> dict:
    """How far a screen (e.g. attribution patching) is from the exact values, over the entries finite in both
    (heads): Pearson and Spearman correlation; for each k, the share of the exact top-k (largest values) found in
    the estimate's top-k; and the largest misses (entries by |estimate - exact|) as (index, estimate, exact)."""
    est, ex = np.asarray(estimate, dtype=np.float64), np.asarray(exact, dtype=np.float64)
    if est.shape != ex.shape:
        raise ValueError(f"estimate {est.shape} and exact {ex.shape} differ in shape")
    ok = np.isfinite(est) & np.isfinite(ex)
    idx = np.argwhere(ok)
    e, x = est[ok], ex[ok]
    out: dict = {
        "n": int(ok.sum()),
        "pearson": _corr(e, x) if len(e) > 1 else float("nan"),
        "spearman": _corr(_ranks(e), _ranks(x)) if len(e) > 1 else float("nan"),
        "topk_recall": {},
    }
    for k in ks:
        k = min(int(k), len(e))
        if k:
            top_x = set(np.argsort(-x, kind="stable")[:k].tolist())
            top_e = set(np.argsort(-e, kind="stable")[:k].tolist())
            out["topk_recall"][str(k)] = len(top_x & top_e) / k
    miss = np.argsort(-np.abs(e - x), kind="stable")[:n_misses]
    out["largest_misses"] = [{"index": idx[i].tolist(), "estimate": float(e[i]), "exact": float(x[i])} for i in miss]
    return out
