"""Stage: head ablation. The exact single-head matrix (every query head of every layer ablated alone at the input
of its layer's output projection: change of the mean cross-entropy over each sample's scored tokens) and
cumulative knockout curves (top-k by the matrix, optional greedy re-ranking, random-head control).

`python -m btp.ablation --source reference --num-samples 20 [--ablation mean] [--greedy]`
writes `results/<model-slug>/<dataset>/ablation/<name>.npz` (+ `<name>.json`) and `<name>_knockout.json`, where
<name> is the sample stem (`regular`, `chain_code-reference`, ...) plus `-mean` for mean ablation and `-layers..`
when `--layers` restricts the matrix.

The exact batched loss of head sets (one base pass per sample, prefix and attention reuse, one set per batch row,
logits at scored positions only) is the engine `btp.headsets`; this module holds the stage around it.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import cli, results
from .arch import adapter
from .cli import opt, parse_ks, parse_layers
from .heads import Head, frozen_weights, o_proj_input_grads
from .headsets import HeadSetScorer, check_sample, mean_o_proj_inputs
from .headsets import set_losses as eval_sets
from .results import ATP, KNOCKOUT, Stem, parse_stem, rank_heads, read_partial, write_partial
from .samples import SampleSet
from .scoring import final_hidden, token_ce
from .stats import CLUSTERED_CI, agreement, clustered_mean, draws_clustered_mean
from .store import UserError, read_npz, write_json, write_npz

STAGE = "ablation"
ABLATIONS = ("zero", "mean")
METHODS = ("exact", "atp", "atp+exact")
SampleRun = HeadSetScorer  # the engine's former name here (tests and scripts patch and call it)


@dataclass
class MatrixConfig:
    ablation: str = opt(
        "zero", "zero the head, or replace it by its mean o_proj-input slice over all sample tokens", choices=ABLATIONS
    )
    method: str = opt(
        "exact",
        "exact: every head's true delta; atp: attribution patching, a first-order estimate "
        "from one forward+backward per sample; atp+exact: atp, then the exact delta of the --verify "
        "top heads (and as many random ones)",
        choices=METHODS,
    )
    verify: int = opt(
        10,
        "atp+exact: heads (top by |estimate|, plus as many random) whose exact delta is computed",
        check=cli.at_least(1),
    )
    # None: every layer (the default; no shortcut to a subset)
    layers: list[int] | None = opt(
        None, "restrict the matrix to these layers, e.g. 0,5,10-12 (default: all)", parse=parse_layers
    )
    batch_rows: int | None = opt(
        None, "ablations per batched pass (default: from free memory and sequence length)", check=cli.at_least(1)
    )
    per_token: bool = opt(False, "also store per-token deltas")  # [tokens, L, Hmax]
    # reuse layer l's recorded o_proj input for layer-l ablations (exact)
    reuse_attention: bool = opt(
        True,
        "recompute layer l's attention for layer-l ablations (slower, same numbers)",
        flag="no-reuse-attention",
        invert=True,
    )
    n_boot: int = opt(1000, "bootstrap resamples over samples for CIs", check=cli.at_least(1))
    seed: int = 0
    # 0: after every (sample, layer)
    save_every: float = opt(60.0, "seconds between partial saves (resume)", check=cli.at_least(0))
    progress: bool = True

    def __post_init__(self) -> None:
        if self.ablation not in ABLATIONS:
            raise ValueError(f"ablation must be one of {ABLATIONS}, got {self.ablation!r}")
        if self.batch_rows is not None and self.batch_rows < 1:
            raise ValueError(f"batch_rows must be >= 1, got {self.batch_rows}")
        if self.n_boot < 1:
            raise ValueError(f"n_boot must be >= 1, got {self.n_boot}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.verify < 0 or (self.method == "atp+exact" and self.verify < 1):
            raise ValueError(f"verify must be >= 1 with atp+exact (>= 0 otherwise), got {self.verify}")


def parse_heldout(v: str | float | int) -> float | int:
    """`0.25` (a share of the problems), `8` (a count) or `0` (none: in-sample curves)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"--knockout-heldout must be a fraction (0.25), a count (8) or 0, got {v!r}") from None
    if f < 0 or (f >= 1 and f != int(f)):
        raise ValueError(f"--knockout-heldout must be a fraction in [0, 1) or a count, got {v!r}")
    return int(f) if f >= 1 or f == 0 else f


@dataclass
class KnockoutConfig:
    enabled: bool = opt(True, "matrix only", flag="no-knockout", invert=True)
    # None: 1, 2, 4, ... up to the number of ranked heads
    ks: list[int] | None = opt(
        None, "knockout counts, e.g. 1,2,4,8 (default: powers of 2)", flag="knockout-ks", parse=parse_ks
    )
    random_seeds: int = opt(
        10, "random-head control curves (their band resamples draws and problems)", check=cli.at_least(0)
    )
    heldout: float | int = opt(
        0.25,
        "problems held out for the curves: the ranking (and greedy choice) uses the "
        "others; a fraction, a count, or 0 for in-sample curves (labelled)",
        flag="knockout-heldout",
        parse=parse_heldout,
    )
    greedy: bool = opt(
        False, "also the greedy curve (re-rank remaining heads after each removal: one matrix-like pass per step)"
    )
    greedy_candidates: int | None = opt(
        None,
        "greedy picks among the top-N heads of the matrix (default: all; costly for big models)",
        check=cli.at_least(1),
    )
    batch_rows: int | None = None  # these as the matrix's (the stage passes them on)
    reuse_attention: bool = True
    n_boot: int = 1000
    seed: int = 0
    progress: bool = True


# ---------------------------------------------------------------- the matrix


def run_matrix(
    model: torch.nn.Module, sample_set: SampleSet, config: MatrixConfig, *, partial: Path | None = None, key: str = ""
) -> dict[str, np.ndarray]:
    """The single-head ablation matrix. Returns `delta` [S, L, Hmax] (mean CE change over scored tokens, NaN
    for padding heads and layers not computed), `delta_mean`, `delta_ci_low`/`_high` [L, Hmax], `base_ce` [S],
    `layer_num_heads` [L], per-token `token_delta`/`base_token_ce` if asked, and `replacement` for mean ablation.
    With `partial`, progress is saved there (tagged by `key`) and a rerun resumes from it."""
    st = matrix_state(model, sample_set, config, partial=partial, key=key)
    return matrix_result(st, sample_set.problem_ids, config, adapter(model).layer_num_heads)


def matrix_units(n_samples: int, layers: Sequence[int]) -> list[tuple[int, int]]:
    """The matrix's units of work, (sample, layer) in sample-major order: what `--shard i/N` splits."""
    return [(s, l) for s in range(n_samples) for l in layers]


def matrix_state(
    model: torch.nn.Module,
    sample_set: SampleSet,
    config: MatrixConfig,
    *,
    partial: Path | None = None,
    key: str = "",
    units: Sequence[tuple[int, int]] | None = None,
) -> dict[str, np.ndarray]:
    """The matrix's raw state: `delta`, `base_ce`, `done` [S, L], `noop_delta` (and per-token arrays,
    `replacement`) with the (sample, layer) `units` computed (default: all of the selected layers)."""
    ad = adapter(model)
    L, H, S = ad.n_layers, ad.max_heads, len(sample_set)
    layers = _check_layers(config.layers, L)
    mine = set(matrix_units(S, layers) if units is None else units)
    n_tok = [s.n_scored for s in sample_set.samples]
    off = np.concatenate([[0], np.cumsum(n_tok)]).astype(int)
    st = _load_partial(partial, key)
    if st is None:
        st = {
            "delta": np.full((S, L, H), np.nan, np.float32),
            "base_ce": np.full(S, np.nan, np.float32),
            "done": np.zeros((S, L), bool),
            "noop_delta": np.full(S, np.nan, np.float32),
        }
        if config.per_token:
            st["token_delta"] = np.full((off[-1], L, H), np.nan, np.float32)
            st["base_token_ce"] = np.full(off[-1], np.nan, np.float32)
        if config.ablation == "mean":
            st["replacement"] = mean_o_proj_inputs(model, sample_set).numpy()
    rep = torch.as_tensor(st["replacement"]) if config.ablation == "mean" else None
    last_save = time.time()
    with tqdm(
        total=len(mine),
        initial=sum(bool(st["done"][s, l]) for s, l in mine),
        desc="ablation matrix",
        unit="layer",
        disable=not config.progress,
        dynamic_ncols=True,
    ) as bar:
        for s, sample in enumerate(sample_set.samples):
            todo = [l for l in layers if (s, l) in mine and not st["done"][s, l]]
            if not todo:
                continue
            bar.set_postfix_str(f"sample {s + 1}/{S} ({len(sample.input_ids)} tok)")
            run = HeadSetScorer(
                model,
                sample,
                todo,
                replacement=rep,
                batch_rows=config.batch_rows,
                reuse_attention=config.reuse_attention,
                noop_row=True,
            )
            base = run.base.double()
            st["base_ce"][s] = base.mean().item()
            if config.per_token:
                st["base_token_ce"][off[s] : off[s + 1]] = run.base.cpu().numpy()
            for l in todo:
                n = ad.heads[l].n_heads
                d = run.ce([[(l, h)] for h in range(n)]).double() - base  # [n, P]
                st["delta"][s, l, :n] = d.mean(1).cpu().numpy()
                if config.per_token:
                    st["token_delta"][off[s] : off[s + 1], l, :n] = d.T.cpu().numpy()
                st["done"][s, l] = True
                st.setdefault("noop_delta", np.full(S, np.nan, np.float32))  # partials of older runs lack it
                st["noop_delta"][s] = np.fmax(st["noop_delta"][s], run.noop_delta)
                bar.update(1)
                if partial is not None and time.time() - last_save >= config.save_every:
                    write_partial(partial, key, st)
                    last_save = time.time()
            del run
    return st


def matrix_result(
    st: dict[str, np.ndarray], problem_ids: Sequence[str], config: MatrixConfig, layer_num_heads: Sequence[int]
) -> dict[str, np.ndarray]:
    """`run_matrix`'s arrays from a finished raw state (`matrix_state`, or shards' states `merge_states`
    combined): the deltas with their means and CIs over problems."""
    out = {k: v for k, v in st.items() if k != "done"}
    cm = clustered_mean(st["delta"], problem_ids, config.n_boot, config.seed)
    out["delta_mean"], out["delta_ci_low"], out["delta_ci_high"] = (a.astype(np.float32) for a in cm[:3])
    out["delta_n_problems"] = cm.n
    out["layer_num_heads"] = np.array(layer_num_heads, dtype=np.int64)
    out["noop_delta"] = st.get("noop_delta", np.full(len(st["base_ce"]), np.nan, np.float32))
    return out


SHARD_STATE = ("delta", "base_ce", "done", "noop_delta", "token_delta", "base_token_ce", "replacement")


def merge_states(states: Sequence[dict[str, np.ndarray]], token_offsets: np.ndarray) -> dict[str, np.ndarray]:
    """One raw state from the shards' (each holds its own (sample, layer) units): every unit from the shard that
    computed it, a sample's base CE from any shard that ran the sample (the same pass), the batching noise floor
    as the largest any shard saw. The mean-ablation vectors, computed by every shard over all samples, must
    agree."""
    st = {k: np.array(v, copy=True) for k, v in states[0].items() if k in SHARD_STATE}
    off = np.asarray(token_offsets)  # [S + 1] offsets of each sample's scored tokens
    for o in states[1:]:
        d = np.asarray(o["done"], bool)
        st["delta"][d] = o["delta"][d]
        ran = d.any(1)
        st["base_ce"][ran] = o["base_ce"][ran]
        st["noop_delta"] = np.fmax(st["noop_delta"], o["noop_delta"])
        if "token_delta" in st:
            for s, l in zip(*np.nonzero(d)):
                st["token_delta"][off[s] : off[s + 1], l] = o["token_delta"][off[s] : off[s + 1], l]
            for s in np.nonzero(ran)[0]:
                st["base_token_ce"][off[s] : off[s + 1]] = o["base_token_ce"][off[s] : off[s + 1]]
        if "replacement" in st and not np.array_equal(st["replacement"], o["replacement"]):
            raise UserError("the shards' mean-ablation vectors differ (another dtype or machine?) — rerun them alike")
        st["done"] |= d
    return st


# ---------------------------------------------------------------- attribution patching (a screen)


def atp_sample(model: torch.nn.Module, sample, replacement: torch.Tensor | None = None) -> tuple[np.ndarray, float]:
    """Attribution patching (Nanda 2023; Kramar et al. 2024) of one sample: one forward and one backward pass.
    Returns ([L, Hmax] float64 first-order estimate of every head's ablation delta, NaN at padding heads; the base
    mean CE). delta_lh ~ sum_t <dL/da_lh,t, r_lh - a_lh,t>, a the head's o_proj-input slice at token t, r its
    replacement (0, or the mean for mean ablation), L the mean CE over scored tokens. Exact when the loss is linear
    in the head's slice; the dot products are fp32 (fp64 for an fp64 model) whatever the model dtype."""
    ad = adapter(model)
    dt = torch.promote_types(torch.float32, next(model.parameters()).dtype)
    est = torch.full((ad.n_layers, ad.max_heads), float("nan"), dtype=torch.float64)

    def on_grad(l: int, x: torch.Tensor, grad: torch.Tensor) -> None:
        lay = ad.heads[l]
        a = x.to(dt).view(*x.shape[:-1], lay.n_heads, lay.head_dim)
        r = 0 if replacement is None else replacement[l, : lay.n_heads].to(device=a.device, dtype=dt)
        g = grad.to(dt).view_as(a)
        est[l, : lay.n_heads] = ((r - a) * g).sum(dim=(0, 1, 3)).double().cpu()

    check_sample(sample)
    ids = torch.as_tensor(sample.input_ids, dtype=torch.long).view(1, -1).to(ad.device)
    pos, tgt = (torch.as_tensor(v, dtype=torch.long).to(ad.device) for v in (sample.positions, sample.targets))
    with frozen_weights(model), torch.enable_grad(), o_proj_input_grads(model, on_grad):
        loss = token_ce(model, final_hidden(model, ids), pos, tgt)[0].mean()
        loss.backward()
    return est.numpy(), float(loss.detach())


def _summary_arrays(out: dict, delta: np.ndarray, problem_ids, config: MatrixConfig, ad) -> dict:
    cm = clustered_mean(delta, problem_ids, config.n_boot, config.seed)
    out["delta_mean"], out["delta_ci_low"], out["delta_ci_high"] = (a.astype(np.float32) for a in cm[:3])
    out["delta_n_problems"] = cm.n
    out["layer_num_heads"] = np.array(ad.layer_num_heads, dtype=np.int64)
    return out


def verify_heads(estimate_mean: np.ndarray, k: int, seed: int) -> tuple[list[Head], list[Head]]:
    """(the k heads of largest |estimate|, k random others): the heads `atp+exact` computes exactly; the random
    ones say how good the screen is away from its top."""
    ranked = [tuple(int(i) for i in lh) for lh in np.argwhere(np.isfinite(estimate_mean))]
    ranked.sort(key=lambda lh: (-abs(float(estimate_mean[lh])), lh))
    top, rest = ranked[:k], ranked[k:]
    pick = np.random.default_rng([seed, 18]).permutation(len(rest))[:k]
    return top, sorted(rest[i] for i in pick)


def run_atp(model: torch.nn.Module, sample_set: SampleSet, config: MatrixConfig) -> dict[str, np.ndarray]:
    """Attribution-patching screen of every head (`atp_sample` per sample), in the exact matrix's format:
    `delta` [S, L, Hmax] estimates, `delta_mean`/CIs, `base_ce`, `layer_num_heads`, `noop_delta` (NaN: no
    batched passes), `replacement` for mean ablation. method `atp+exact` adds the exact deltas of `verify_heads`
    (`delta_exact` [S, L, Hmax], NaN elsewhere; `verified` [L, Hmax] 1 top, 2 random, 0 not), keeps the estimates
    in `delta_atp`, and `delta` holds the exact value wherever one exists: the ranking of the heads that matter is
    exact."""
    ad = adapter(model)
    L, H, S = ad.n_layers, ad.max_heads, len(sample_set)
    layers = _check_layers(config.layers, L)
    rep = mean_o_proj_inputs(model, sample_set) if config.ablation == "mean" else None
    est = np.full((S, L, H), np.nan, np.float32)
    base = np.full(S, np.nan, np.float32)
    for s, sample in enumerate(
        tqdm(sample_set.samples, desc="atp", unit="sample", disable=not config.progress, dynamic_ncols=True)
    ):
        e, base[s] = atp_sample(model, sample, rep)
        est[s, layers] = e[layers]
    out: dict = {"delta": est, "base_ce": base, "noop_delta": np.full(S, np.nan, np.float32)}
    if rep is not None:
        out["replacement"] = rep.numpy()
    if config.method == "atp+exact" and config.verify:
        pids = sample_set.problem_ids
        top, rnd = verify_heads(clustered_mean(est, pids, 1, config.seed).mean, config.verify, config.seed)
        res = eval_sets(
            model,
            sample_set,
            [[h] for h in top + rnd],
            replacement=rep,
            batch_rows=config.batch_rows,
            reuse_attention=config.reuse_attention,
            progress=config.progress,
            desc="exact deltas of the verified heads",
        )
        exact = np.full((S, L, H), np.nan, np.float32)
        verified = np.zeros((L, H), np.int8)
        for i, (l, h) in enumerate(top + rnd):
            exact[:, l, h] = res.delta[i]
            verified[l, h] = 1 if i < len(top) else 2
        out.update(
            delta_atp=est,
            delta_exact=exact,
            verified=verified,
            delta=np.where(np.isfinite(exact), exact, est).astype(np.float32),
        )
    return _summary_arrays(out, out["delta"], sample_set.problem_ids, config, ad)


def _finite_max(x: np.ndarray) -> float | None:
    x = np.asarray(x, dtype=float)
    return float(np.nanmax(x)) if np.isfinite(x).any() else None


def _check_layers(layers: Sequence[int] | None, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad or not layers:
        raise UserError(f"--layers {bad or '[]'} out of range — the model has layers 0..{n_layers - 1}")
    return sorted(set(int(l) for l in layers))


def _load_partial(path: Path | None, key: str) -> dict | None:
    st = read_partial(path, key)
    if st is not None:
        print(f"[btp.ablation] resuming from {path}: {int(st['done'].sum())} (sample, layer) units done")
    return st


# ---------------------------------------------------------------- knockout


def default_ks(n: int) -> list[int]:
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    return ks


def knockout_split(
    sample_set: SampleSet, delta: np.ndarray, heldout: float | int, seed: int
) -> tuple[SampleSet, SampleSet, np.ndarray, str]:
    """(samples the curves are reported on, samples the ranking and greedy choice use, the ranking's delta_mean,
    selection label): the matrix's per-sample `delta` [S, L, H] averaged over the scoring problems only, the curves
    on held-out problems (no winner's curse). heldout 0, or too few problems to split: in-sample, labelled so."""
    pids = sample_set.problem_ids
    if heldout:
        try:
            scoring, held = sample_set.split(heldout, seed)
        except ValueError:
            scoring = held = None
        if scoring is not None:
            rows = [i for i, p in enumerate(pids) if p in set(scoring.problem_ids)]
            dm = clustered_mean(np.asarray(delta)[rows], [pids[i] for i in rows], 1, seed).mean
            return (
                held,
                scoring,
                dm,
                (
                    f"held-out: ranked on {len(set(scoring.problem_ids))} problems, curves on "
                    f"{len(set(held.problem_ids))} other problems"
                ),
            )
    dm = clustered_mean(np.asarray(delta), pids, 1, seed).mean
    return sample_set, sample_set, dm, "in-sample: ranked and reported on the same samples (optimistic)"


def _curve(
    ks: Sequence[int], sets: Sequence[Sequence[Head]], ce: np.ndarray, n_boot: int, seed: int, problems: Sequence[str]
) -> list[dict]:
    m, lo, hi, _ = clustered_mean(ce.T, problems, n_boot, seed)
    return [
        {
            "k": int(k),
            "heads": [list(h) for h in hs],
            "mean_ce": float(m[i]),
            "ci_low": float(lo[i]),
            "ci_high": float(hi[i]),
            "per_sample_ce": ce[i].tolist(),
        }
        for i, (k, hs) in enumerate(zip(ks, sets))
    ]


def run_knockout(
    model: torch.nn.Module,
    sample_set: SampleSet,
    delta_mean: np.ndarray,
    config: KnockoutConfig,
    *,
    replacement: torch.Tensor | None = None,
    partial: Path | None = None,
    key: str = "",
    select_on: SampleSet | None = None,
    selection: str = "in-sample",
) -> dict:
    """Cumulative knockout curves: `top` (heads by the matrix ranking, largest mean delta first), `random`
    (nested random orders of the same ranked heads, one per seed, and their seed average), and `greedy` if asked
    (each step adds the remaining candidate that raises the mean CE most, on these same samples). Each point:
    k, heads removed, mean CE over problems with a bootstrap CI over problems; the random control's average over
    draws has a band that resamples draws and problems. `delta_mean` ranks (from the scoring problems, see
    `knockout_split`); the curves are on `sample_set`; greedy chooses on `select_on` (default: `sample_set`, in
    sample); `selection` says which. With `partial`, finished parts and greedy steps are saved there and a rerun
    resumes."""
    ranked = rank_heads(delta_mean)
    n = len(ranked)
    ks = sorted(set(config.ks)) if config.ks else default_ks(n)
    if not ks or ks[0] < 1 or ks[-1] > n:
        raise ValueError(f"knockout ks must lie in 1..{n} (the ranked heads), got {ks}")
    kw = dict(
        replacement=replacement,
        batch_rows=config.batch_rows,
        reuse_attention=config.reuse_attention,
        progress=config.progress,
    )
    st = _load_json_partial(partial, key) or {}
    if "top" not in st:
        rand_sets = []
        for i in range(config.random_seeds):
            perm = np.random.default_rng([config.seed, i]).permutation(n)
            rand_sets += [[ranked[j] for j in perm[:k]] for k in ks]
        top_sets = [ranked[:k] for k in ks]
        ce, base = eval_sets(model, sample_set, top_sets + rand_sets, desc="knockout top/random", **kw)
        st.update(
            base=base.tolist(),
            top={"sets": top_sets, "ce": ce[: len(ks)].tolist()},
            random={"sets": rand_sets, "ce": ce[len(ks) :].tolist()},
        )
        write_partial(partial, key, st)
    base = np.array(st["base"])
    pids = sample_set.problem_ids
    bm, blo, bhi, _ = clustered_mean(base, pids, config.n_boot, config.seed)
    out: dict = {
        "ks": ks,
        "n_ranked": n,
        "ranking": "matrix delta_mean, largest first",
        "ci": CLUSTERED_CI,
        "n_problems": len(set(pids)),
        "selection": selection,
        "curve_problems": sorted(set(pids)),
        "base": {
            "k": 0,
            "heads": [],
            "mean_ce": float(bm),
            "ci_low": float(blo),
            "ci_high": float(bhi),
            "per_sample_ce": base.tolist(),
        },
        "top": _curve(ks, st["top"]["sets"], np.array(st["top"]["ce"]), config.n_boot, config.seed, pids),
    }
    rce = (
        np.array(st["random"]["ce"]).reshape(config.random_seeds, len(ks), len(sample_set))
        if config.random_seeds
        else np.zeros((0, len(ks), len(sample_set)))
    )
    rsets = st["random"]["sets"]
    out["random"] = {
        "seeds": [[config.seed, i] for i in range(config.random_seeds)],
        "per_seed": [
            _curve(ks, rsets[i * len(ks) : (i + 1) * len(ks)], rce[i], config.n_boot, config.seed, pids)
            for i in range(config.random_seeds)
        ],
    }
    if config.random_seeds:
        avg = _curve(ks, [[] for _ in ks], rce.mean(0), config.n_boot, config.seed, pids)
        band = draws_clustered_mean(rce.transpose(0, 2, 1), pids, config.n_boot, config.seed)  # [draws, S, ks]
        for i, p in enumerate(avg):
            del p["heads"]
            p["ci_low"], p["ci_high"] = float(band.low[i]), float(band.high[i])
        out["random"]["band"] = "percentile bootstrap over draws and problems together"
        out["random"]["mean_over_seeds"] = avg
    if config.greedy:
        out["greedy"] = _greedy(model, sample_set, ranked, ks, config, st, partial, key, kw, select_on, selection)
    return out


def _greedy(
    model,
    sample_set,
    ranked,
    ks,
    config: KnockoutConfig,
    st: dict,
    partial,
    key,
    kw,
    select_on: SampleSet | None = None,
    selection: str = "in-sample",
) -> dict:
    choose_on = select_on if select_on is not None else sample_set
    cands = ranked[: config.greedy_candidates] if config.greedy_candidates else list(ranked)
    if ks[-1] > len(cands):
        raise ValueError(
            f"greedy knockout to k={ks[-1]} needs at least that many candidates, got {len(cands)} (--greedy-candidates)"
        )
    g = st.setdefault("greedy", {"chosen": [], "ce": []})
    chosen = [tuple(h) for h in g["chosen"]]
    if chosen:
        print(f"[btp.ablation] greedy: resuming after {len(chosen)} steps")
    for step in range(len(chosen), ks[-1]):
        rest = [c for c in cands if c not in chosen]
        ce, _ = eval_sets(
            model,
            choose_on,
            [chosen + [c] for c in rest],
            desc=f"greedy step {step + 1}/{ks[-1]} ({len(rest)} candidates)",
            **kw,
        )
        best = int(np.argmax(ce.mean(1)))
        chosen.append(rest[best])
        g["chosen"].append(list(rest[best]))
        g["ce"].append(ce[best].tolist())
        write_partial(partial, key, st)
    sets = [chosen[:k] for k in ks]
    if choose_on is sample_set:
        ce = np.array([g["ce"][k - 1] for k in ks])
    else:  # chosen on the scoring problems: report the choice on the held-out ones
        ce = eval_sets(model, sample_set, sets, desc="greedy on held-out", **kw).ce
    return {
        "candidates": len(cands),
        "candidate_rule": "top-N of the matrix ranking" if config.greedy_candidates else "all ranked heads",
        "selection": selection,
        "order": [list(h) for h in chosen],
        "curve": _curve(ks, sets, ce, config.n_boot, config.seed, sample_set.problem_ids),
    }


def _load_json_partial(path: Path | None, key: str) -> dict | None:
    st = read_partial(path, key)
    if st is None:
        return None
    for part in ("top", "random"):
        if part in st:
            st[part]["sets"] = [[tuple(h) for h in hs] for hs in st[part]["sets"]]
    return st


# ---------------------------------------------------------------- CLI

SPEC = cli.StageSpec(
    STAGE,
    "Exact single-head ablation matrix and cumulative knockout curves",
    configs=(MatrixConfig, KnockoutConfig),
    device_map=True,
    shard="(sample, layer) units of the exact matrix; knockout curves are computed when the shards are merged",
)
MATRIX_FILES = ("npz", "json")


def build_parser() -> argparse.ArgumentParser:
    return cli.stage_parser(SPEC)


def output_stem(stem: Stem, ablation: str, layers: list[int] | None, method: str = "exact", verify: int = 0) -> Stem:
    """The samples' stem plus `mean` for mean ablation, `layers..` when the matrix is restricted, `atp` for the
    attribution-patching screen and `verify<K>` for atp+exact."""
    return stem.with_variant(
        "mean" if ablation == "mean" else None,
        "layers" + "_".join(map(str, layers)) if layers is not None else None,
        ATP if method != "exact" else None,
        f"verify{verify}" if method == "atp+exact" else None,
    )


def output_name(stem: str, ablation: str, layers: list[int] | None, method: str = "exact", verify: int = 0) -> str:
    return str(output_stem(parse_stem(stem), ablation, layers, method, verify))


def agreement_report(res: dict, exact: dict | None, ks: Sequence[int] = (10, 20)) -> dict:
    """The screen against exact values on the same samples: over all heads against the exact matrix `exact`
    (arrays of its npz) when there is one; over the verified heads (atp+exact) against their exact deltas."""
    out = {}
    est = res.get("delta_atp", res["delta"])
    if exact is not None:
        out["vs_exact_matrix"] = agreement(np.mean(est, 0), np.mean(exact["delta"], 0), ks)
    if "delta_exact" in res:
        out["verified_heads"] = agreement(np.mean(est, 0), np.mean(res["delta_exact"], 0), ks)
    return out


@cli.each_dataset
def main(argv: Sequence[str] | None = None) -> Path:
    run = cli.prepare(SPEC, argv)
    mcfg, ss = run.config(MatrixConfig), run.samples
    kcfg = run.config(
        KnockoutConfig, batch_rows=mcfg.batch_rows, reuse_attention=mcfg.reuse_attention, n_boot=mcfg.n_boot
    )
    out = run.output(output_stem(run.sample_config.output_stem, mcfg.ablation, mcfg.layers, mcfg.method, mcfg.verify))
    npz_path, json_path, ko_path = out.path("npz"), out.path("json"), out.path("json", KNOCKOUT)
    # batch_rows, reuse_attention and save_every change speed and memory, not numbers: not part of the identity
    screen = {} if mcfg.method == "exact" else {"method": mcfg.method, "verify": mcfg.verify}
    if screen and mcfg.per_token:
        run.parser.error("--per-token needs --method exact (atp has no per-token deltas)")
    if screen and (run.shard or run.merging):
        run.parser.error("--shard splits the exact matrix; the atp screen (one pass per sample) runs whole")
    mid = run.identity(
        ablation=mcfg.ablation,
        layers=mcfg.layers,
        per_token=mcfg.per_token,
        n_boot=mcfg.n_boot,
        seed=mcfg.seed,
        **screen,
    )
    m_claim = run.claim(out, mid, files=MATRIX_FILES, partials=("npz",))
    kid = {
        "matrix": m_claim.key,
        "ks": kcfg.ks,
        "random_seeds": kcfg.random_seeds,
        "heldout": kcfg.heldout,
        "greedy": kcfg.greedy,
        "greedy_candidates": kcfg.greedy_candidates,
        "n_boot": kcfg.n_boot,
        "seed": kcfg.seed,
    }
    # a shard has no curves: they rank heads by the whole matrix (computed when the shards are merged)
    knockout = kcfg.enabled and not run.shard
    k_claim = run.claim(out, kid, files=("json",), part=KNOCKOUT, partials=("json",)) if knockout else None
    k_done = k_claim is None or (k_claim.done and m_claim.done)  # curves of a recomputed matrix are redone
    if m_claim.done and k_done:
        print(f"[btp.ablation] {npz_path} exists for this configuration; skipping (use --force to recompute)")
        return npz_path
    if run.shard:
        return _matrix_shard(run, out, mcfg, m_claim)
    shards = run.shards(out, mid, MATRIX_FILES) if run.merging and not m_claim.done else None
    lm = cli.shard_stamp(shards)[0] if shards else run.load()
    stamp = dict(
        dtype=str(lm.dtype),
        device=str(lm.device),
        stem=str(run.sample_config.output_stem),
        ablation=mcfg.ablation,
        **({"estimate": True, **screen} if screen else {}),
    )
    t0 = time.time()
    if m_claim.done:
        res = read_npz(npz_path)
        print(f"[btp.ablation] matrix {npz_path} exists for this configuration; knockout only")
    else:
        mpart = out.partial("npz")
        if shards:  # the shards' units in place; means and CIs by this stage's own code
            tok_off = np.concatenate([[0], np.cumsum([s.n_scored for s in ss.samples])]).astype(int)
            st = merge_states([z for z, _ in shards], tok_off)
            res = matrix_result(st, ss.problem_ids, mcfg, shards[0][0]["layer_num_heads"])
            _check_complete(st["done"], mcfg.layers, out)
        elif not screen:
            res = run_matrix(lm.model, ss, mcfg, partial=mpart, key=m_claim.key)
        else:
            res = run_atp(lm.model, ss, mcfg)
        secs = time.time() - t0
        rep = res.pop("replacement", None)
        arrays = {
            k: res[k]
            for k in (
                "delta",
                "delta_mean",
                "delta_ci_low",
                "delta_ci_high",
                "delta_n_problems",
                "base_ce",
                "layer_num_heads",
                "noop_delta",
                "delta_atp",
                "delta_exact",
                "verified",
            )
            if k in res
        }
        if mcfg.per_token:
            arrays.update(token_delta=res["token_delta"], base_token_ce=res["base_token_ce"])
        if shards:
            book = cli.shard_stamp(shards)[1]
            secs, stamp["shards"] = sum(b or 0 for b in book["seconds"]), book
        full = run.stamp(lm, **stamp, seconds=round(secs, 2), **m_claim.stamp)
        # json first: a kill between the two writes leaves no npz, so the rerun redoes it (from the partial)
        agree = {}
        if screen:
            ex = out.path("npz").parent / results.file_name(results.exact_counterpart(out.path("npz").stem), "npz")
            exact = read_npz(ex) if ex.exists() else None
            if exact is not None and any(
                not np.array_equal(exact.get(k), v) for k, v in ss.fields().items() if k in results.SAMPLE_FIELDS
            ):
                exact = None  # another sample set: no comparison
            agree = {
                "agreement": agreement_report(res, exact),
                "agreement_exact": ex.name if exact is not None else None,
            }
        write_json(
            json_path,
            {
                # exact outputs keep their former keys (readers treat a missing "estimate" as exact)
                **full,
                "npz": npz_path.name,
                **({"method": mcfg.method, "estimate": True} if screen else {}),
                **(
                    {"verify": mcfg.verify, "verified": "1: top |estimate|, 2: random; delta holds their exact value"}
                    if mcfg.method == "atp+exact"
                    else {}
                ),
                **agree,
                "layers": mcfg.layers or list(range(len(res["layer_num_heads"]))),
                "n_boot": mcfg.n_boot,
                "ci": CLUSTERED_CI,
                "n_problems": len(set(ss.problem_ids)),
                "delta_mean": "mean over problems of the mean over a problem's samples (NaN samples skipped)",
                "delta": "mean over scored tokens of CE(ablated) - CE(base), nats; NaN: padding or not computed"
                + (
                    "; atp: first-order estimate sum_t <dL/da_t, r - a_t> (an estimate, not the exact delta)"
                    if screen
                    else ""
                ),
                "mean_ablation": "each head's mean o_proj-input slice over all tokens of all samples"
                if mcfg.ablation == "mean"
                else None,
                "base_ce_mean": float(np.nanmean(res["base_ce"])),
                "noop_max_abs_delta": _finite_max(res["noop_delta"]),
                "noop": "largest |CE - base CE| of the no-op row (no head removed) every batched pass carries, nats: "
                "the noise floor of batching",
                "top_heads": _top(res, 20),
            },
        )
        write_npz(npz_path, provenance=full, **arrays, **ss.fields())
        mpart.unlink(missing_ok=True)
        res["replacement"] = rep
        n_heads = int(np.isfinite(res["delta_mean"]).sum())
        print(
            f"[btp.ablation] {'matrix' if not screen else mcfg.method + ' screen'}: {len(ss)} samples x {n_heads} "
            f"heads in {secs:.1f}s -> {npz_path}{ss.left_out()}"
        )
        for what, a in agree.get("agreement", {}).items():
            print(
                f"  agreement ({what}, {a['n']} heads): Spearman {a['spearman']:.3f}, Pearson {a['pearson']:.3f}, "
                "top-k recall " + ", ".join(f"{k}: {v:.2f}" for k, v in a["topk_recall"].items())
            )
    _print_top(res)
    if not k_done:
        if shards:  # merged: the curves need the model
            lm = run.load()
            stamp.update(dtype=str(lm.dtype), device=str(lm.device))
            stamp.pop("shards", None)
        rep = res.get("replacement") if mcfg.ablation == "mean" else None
        if mcfg.ablation == "mean" and rep is None:
            rep = mean_o_proj_inputs(lm.model, ss)
        t1 = time.time()
        kpart = out.partial("json", KNOCKOUT)
        ko_ss, select_ss, rank_dm, selection = knockout_split(ss, res["delta"], kcfg.heldout, kcfg.seed)
        ko = run_knockout(
            lm.model,
            ko_ss,
            rank_dm,
            kcfg,
            replacement=None if rep is None else torch.as_tensor(rep),
            partial=kpart,
            key=k_claim.key,
            select_on=select_ss,
            selection=selection,
        )
        write_json(
            ko_path,
            {
                **run.stamp(lm, **stamp, seconds=round(time.time() - t1, 2), **k_claim.stamp),
                "matrix": npz_path.name,
                **ko,
            },
        )
        kpart.unlink(missing_ok=True)
        _print_knockout(ko, ko_path)
    return npz_path


def _matrix_shard(run: cli.Run, out: results.Output, mcfg: MatrixConfig, claim: results.Claim) -> Path:
    """`--shard i/N`: this shard's (sample, layer) units, resumable from its own progress file; written as the raw
    state `btp.merge` combines (`<name>-shard<i>of<N>.npz` + `.json`)."""
    lm = run.load()
    ad = adapter(lm.model)
    units = matrix_units(len(run.samples), _check_layers(mcfg.layers, ad.n_layers))
    mine = [units[k] for k in run.shard.take(len(units))]
    t0 = time.time()
    st = matrix_state(lm.model, run.samples, mcfg, partial=out.partial("npz"), key=claim.key, units=mine)
    stamp = {
        **run.stamp(lm, dtype=str(lm.dtype), device=str(lm.device), seconds=round(time.time() - t0, 2)),
        **claim.stamp,
    }
    write_json(out.path("json"), {**stamp, "units": [list(u) for u in mine]})  # json first: npz marks it done
    write_npz(out.path("npz"), provenance=stamp, layer_num_heads=np.array(ad.layer_num_heads, np.int64), **st)
    out.partial("npz").unlink(missing_ok=True)
    print(f"[btp.ablation] shard {run.shard.label}: {len(mine)} of {len(units)} (sample, layer) units -> {out.dir}")
    return out.path("npz")


def _check_complete(done: np.ndarray, layers: list[int] | None, out: results.Output) -> None:
    want = done[:, layers] if layers is not None else done
    if not want.all():
        raise UserError(f"{out.dir / out.name}: the shards leave {int((~want).sum())} (sample, layer) units undone")


def _top(res: dict, n: int) -> list[dict]:
    dm = np.asarray(res["delta_mean"])
    return [
        {
            "head": [l, h],
            "delta_mean": float(dm[l, h]),
            "ci_low": float(res["delta_ci_low"][l, h]),
            "ci_high": float(res["delta_ci_high"][l, h]),
        }
        for l, h in rank_heads(dm)[:n]
    ]


def _print_top(res: dict) -> None:
    print(f"  base CE {float(np.mean(res['base_ce'])):.4f} nats; largest mean deltas:")
    for t in _top(res, 8):
        print(
            f"    L{t['head'][0]:>2}H{t['head'][1]:<2} {t['delta_mean']:+.4f}  "
            f"[{t['ci_low']:+.4f}, {t['ci_high']:+.4f}]"
        )


def _print_knockout(ko: dict, path: Path) -> None:
    rnd = {p["k"]: p["mean_ce"] for p in ko["random"].get("mean_over_seeds", [])}
    gr = {p["k"]: p["mean_ce"] for p in ko.get("greedy", {}).get("curve", [])}
    print(
        f"[btp.ablation] knockout ({ko.get('selection', 'in-sample')}) -> {path}\n  k   top-k CE   random CE"
        + ("   greedy CE" if gr else "")
    )
    print(f"  0   {ko['base']['mean_ce']:8.4f}")
    for p in ko["top"]:
        k = p["k"]
        print(f"  {k:<3} {p['mean_ce']:8.4f}   {rnd.get(k, float('nan')):9.4f}" + (f"   {gr[k]:9.4f}" if gr else ""))


if __name__ == "__main__":
    cli.entry("ablation", main)
