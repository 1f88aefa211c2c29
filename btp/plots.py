"""Figures of btp results: loaders that read a results tree (never compute anything), pure plotting functions
that take loaded data and return matplotlib Figures, and `python -m btp.plots` that writes a PNG (and with
`--pdf` a PDF) for everything present:

`python -m btp.plots --results-dir results --model smollm2-135m --out figures [--dataset humaneval] [--pdf]`

Figures are built as `matplotlib.figure.Figure` objects (no pyplot state, nothing shown); the CLI uses the Agg
backend. Every analysis figure names its population (source/select of the analysis samples) in its title.
"""

from __future__ import annotations

import io
import math
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import BoundaryNorm, ListedColormap, TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.text import Text

from . import benchmarks, cli, results
from .results import (
    EVALUATIONS,
    GENERATIONS,
    LAYER_AXIS,
    LENS_AXIS,
    SUMMARY,
    find_model_dir,
    importance_matrix,
    parse_stem,
    rank_heads,
    repo_path,  # noqa: F401  (for notebooks: `RESULTS_DIR = bp.repo_path(RESULTS_DIR)`)
)
from .stats import SMALL_N, agreement
from .store import MalformedFileError, iter_jsonl, read_json

MODES = results.MODES
MODE_LABEL = {"regular": "regular (reasoning + code)", "chain_code": "chain_code (code only)"}
STATUS_COLORS = {
    "passed": "#2a9d8f",
    "failed": "#e76f51",
    "timeout": "#f4a261",
    "error": "#9b2226",
    "no_code": "#8d99ae",
}


# ================================================================ locating results

SKIPPED: list[str] = []  # broken files the figures skipped, "path: why" (write_figures resets it and reports them)


def _read(load: Any, *args: Any) -> Any:
    """`load(*args)`, or None after naming the broken file: one unreadable file costs its figures, not the run."""
    try:
        return load(*args)
    except (MalformedFileError, OSError, UnicodeDecodeError) as e:
        SKIPPED.append(str(e))
        print(f"[btp.plots] skipped a broken file: {e}", file=sys.stderr)
        return None


def model_dir(results_dir: str | Path, model: str | None) -> Path:
    """`results/<slug>` of `model` (a slug, an HF id, or a name btp.models resolves, e.g. `smollm2-135m`);
    with `model=None` the only model under `results_dir`."""
    return find_model_dir(results_dir, model)


def datasets(results_dir: str | Path, model: str | None) -> list[str]:
    md = model_dir(results_dir, model)
    return sorted(
        (p.name for p in md.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda d: (benchmarks.get(d).order if d in benchmarks.NAMES else 9, d),
    )


def stems(results_dir: str | Path, model: str | None, dataset: str, stage: str) -> list[str]:
    """Finished outputs of a stage dir (`entropy`, `ablation`, `taylor`): their names without suffix."""
    return results.list_outputs(model_dir(results_dir, model) / dataset / stage, stage)


# ================================================================ loaded analyses


@dataclass
class Analysis:
    """One analysis output: its arrays (npz) or records (Taylor), and its JSON metadata."""

    stage: str
    dataset: str
    name: str  # file stem, e.g. `chain_code-reference`
    data: Any  # dict of arrays, or a list of records for Taylor
    meta: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # e.g. ablation knockout curves
    model: str = ""  # the model's folder name (slug) under the results dir; titles name it

    @property
    def mode(self) -> str:
        return self.meta.get("mode") or parse_stem(self.name).mode

    @property
    def population(self) -> str:
        """`source/select` of the analysis samples, from the output's provenance when present."""
        s = self.meta.get("samples") or {}
        cfg = s.get("config") or {}
        if cfg.get("source"):
            return f"{cfg['source']}/{cfg.get('select', '?')}"
        if s.get("population"):
            return str(s["population"]).replace(":", "/")
        return parse_stem(self.name).population

    @property
    def n_samples(self) -> int | None:
        s = self.meta.get("samples") or {}
        return s.get("used") or (len(s["samples"]) if "samples" in s else None)

    @property
    def n_problems(self) -> int | None:
        """Problems behind the samples: the unit every CI resamples."""
        pids = (self.meta.get("samples") or {}).get("problem_ids") or self.meta.get("problem_ids")
        return self.meta.get("n_problems") or (len(set(pids)) if pids else None)

    @property
    def label(self) -> str:
        extra = parse_stem(self.name).extra
        return f"{self.dataset} · {self.mode} · {self.population}" + (f" · {extra}" if extra else "")

    @property
    def heading(self) -> str:
        """The label with the model in front (when known)."""
        return (f"{self.model} · " if self.model else "") + self.label

    def title(self, what: str) -> str:
        n, p = self.n_samples, self.n_problems
        count = f"n={n} samples" + (f", {p} problems" if p else "") if n else ""
        return f"{what}\n{self.heading}" + (f" ({count})" if count else "") + small_n_caveat(p)


def small_n_caveat(n: int | None, unit: str = "problems") -> str:
    """A visible warning for titles when a CI rests on fewer than stats.SMALL_N problems ('' otherwise)."""
    return f"\ncaveat: n = {n} {unit} < {SMALL_N}: intervals are rough" if n is not None and n < SMALL_N else ""


def load_entropy(results_dir: str | Path, model: str | None, dataset: str, name: str) -> Analysis:
    md = model_dir(results_dir, model)
    arrays, meta = results.read_analysis(md / dataset / "entropy", name)
    return Analysis("entropy", dataset, name, arrays, meta, model=md.name)


def load_ablation(results_dir: str | Path, model: str | None, dataset: str, name: str) -> Analysis:
    md = model_dir(results_dir, model)
    d = md / dataset / "ablation"
    arrays, meta = results.read_analysis(d, name)
    return Analysis("ablation", dataset, name, arrays, meta, {"knockout": results.read_knockout(d, name)}, md.name)


def load_taylor(results_dir: str | Path, model: str | None, dataset: str, name: str) -> Analysis:
    """Taylor pruning records (one per iteration, in order) and the provenance of the run that wrote the last
    of them (`<name>.runs.json`; else the `<name>.samples.npz` stamp)."""
    md = model_dir(results_dir, model)
    recs, meta = results.read_taylor(md / dataset / "taylor", name)
    return Analysis("taylor", dataset, name, recs, meta, model=md.name)


def load_cmaes(results_dir: str | Path, model: str | None, dataset: str, name: str) -> Analysis:
    """CMA-ES records (one per generation) with the final `<name>.json` (`extra["final"]`, None until a run
    finished); metadata from the final file, else the runs file of the last run."""
    md = model_dir(results_dir, model)
    recs, final, meta = results.read_cmaes(md / dataset / "cmaes", name)
    return Analysis("cmaes", dataset, name, recs, final or meta, {"final": final}, md.name)


def load_generations(results_dir: str | Path, model: str | None, dataset: str) -> list[dict]:
    """Light generation records: problem_id, sample, finish_reason, output/prompt token counts, has_code."""
    p = model_dir(results_dir, model) / dataset / GENERATIONS
    if not p.exists():
        return []
    return [
        {
            "problem_id": r["problem_id"],
            "sample": r["sample"],
            "finish_reason": r.get("finish_reason"),
            "n_output_tokens": len(r.get("output_token_ids") or ()),
            "n_prompt_tokens": len(r.get("prompt_token_ids") or ()),
            "has_code": bool(r.get("code")),
        }
        for r in iter_jsonl(p)
    ]


def load_evaluations(results_dir: str | Path, model: str | None, dataset: str) -> list[dict]:
    p = model_dir(results_dir, model) / dataset / EVALUATIONS
    if not p.exists():
        return []
    return [{k: r.get(k) for k in ("problem_id", "sample", "passed", "status", "duration")} for r in iter_jsonl(p)]


def load_summary(results_dir: str | Path, model: str | None, dataset: str) -> dict | None:
    p = model_dir(results_dir, model) / dataset / SUMMARY
    return read_json(p) if p.exists() else None


# ================================================================ helpers


def new_figure(w: float = 7.0, h: float = 4.0, **kw: Any) -> Figure:
    return Figure(figsize=(w, h), layout="constrained", **kw)


def to_png(fig: Figure, dpi: int = 110) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def show(fig: Figure, dpi: int = 90) -> None:
    """Display a Figure in a notebook as a PNG (independent of the notebook's matplotlib backend)."""
    from IPython.display import Image, display

    display(Image(data=to_png(fig, dpi)))


_FACETS = (
    ("dataset", lambda a: a.dataset),
    ("mode", lambda a: a.mode),
    ("population", lambda a: a.population),
    ("extra", lambda a: parse_stem(a.name).extra),
)


def _common_title(items: Sequence[Analysis], what: str) -> str:
    """A title naming what all `items` share (dataset, mode, population, variant) so that legends name the rest."""
    parts = []
    for _, f in _FACETS:
        vals = {f(a) for a in items}
        if len(vals) == 1 and (v := vals.pop()):
            parts.append(v)
    return what + ("\n" + " · ".join(parts) if parts else "")


def _legend_label(a: Analysis, items: Sequence[Analysis]) -> str:
    parts = [f(a) for _, f in _FACETS if len({f(b) for b in items}) > 1]
    return " · ".join(p or "-" for p in parts) or a.name


def _heat_cmap(name: str = "RdBu_r"):
    return colormaps[name].with_extremes(bad=(1, 1, 1, 0))  # NaN (padding heads, layers not computed): blank


def _head_axes(ax, L: int, H: int) -> None:
    ax.set_xlabel("head")
    ax.set_ylabel(LAYER_AXIS)
    ax.set_xticks(range(0, H, max(1, H // 16)))
    ax.set_yticks(range(0, L, max(1, L // 16)))


# ================================================================ entropy lens

METRIC_LABEL = {
    "entropy": "entropy H (nats)",
    "ce": "cross-entropy of next token (nats)",
    "kl": "KL(final || layer) (nats)",
}


def _band(a: Analysis, metric: str, band: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = a.data
    mean = np.asarray(d[f"{metric}_mean"], dtype=float) if f"{metric}_mean" in d else np.asarray(d[metric]).mean(0)
    if band == "sd":
        sd = np.asarray(d[f"{metric}_std"], dtype=float) if f"{metric}_std" in d else np.asarray(d[metric]).std(0)
        return mean, np.maximum(mean - sd, 0), mean + sd
    if band == "iqr":
        q = np.quantile(np.asarray(d[metric], dtype=float), [0.25, 0.75], axis=0)
        return mean, q[0], q[1]
    if band == "ci" and f"{metric}_ci_low" in d:  # stored: sample-weighted mean, CI over problems
        return tuple(np.asarray(d[f"{metric}_{k}"], dtype=float) for k in ("sample_mean", "ci_low", "ci_high"))
    if band == "ci":  # older outputs: bootstrap over samples of the per-sample means, weighted by their token counts
        x = np.asarray(d[f"sample_{metric}_mean"], dtype=float)
        w = np.asarray(d.get("sample_n_tokens", np.ones(len(x))), dtype=float)
        rng = np.random.default_rng(0)
        idx = rng.integers(0, len(x), size=(1000, len(x)))
        boots = np.einsum("bs,bsl->bl", w[idx], x[idx]) / w[idx].sum(1, keepdims=True)
        lo, hi = np.quantile(boots, [0.025, 0.975], axis=0)
        return mean, lo, hi
    raise ValueError(f"band must be sd, iqr or ci, got {band!r}")


BAND_LABEL = {
    "sd": "token-weighted mean, band: ±1 sd over tokens",
    "iqr": "token-weighted mean, band: interquartile range over tokens",
    "ci": "sample-weighted mean, band: 95% bootstrap CI over problems",
}


def entropy_by_layer(
    items: Analysis | Sequence[Analysis], metrics: Sequence[str] = ("entropy", "ce"), band: str = "ci"
) -> Figure:
    """Mean (line) and band of each metric vs layer, one panel per metric, one line per analysis. Default: the
    sample-weighted mean and its CI over problems (a spread over tokens is no uncertainty of a mean, and a token
    weighting lets long outputs dominate)."""
    items = [items] if isinstance(items, Analysis) else list(items)
    fig = new_figure(4.2 * len(metrics) + 0.6, 3.8)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        for i, a in enumerate(items):
            layer = np.asarray(a.data.get("layer", np.arange(len(a.data[f"{metric}_mean"]))))  # block indices
            mean, lo, hi = _band(a, metric, band)
            c = f"C{i}"
            ax.plot(layer, mean, color=c, lw=1.8, label=_legend_label(a, items) if len(items) > 1 else "mean")
            ax.fill_between(layer, lo, hi, color=c, alpha=0.18, lw=0)
        ax.set_xlabel(LENS_AXIS)
        ax.set_ylabel(METRIC_LABEL.get(metric, metric))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, title=BAND_LABEL[band], title_fontsize=7)
    what = " and ".join({"entropy": "Entropy", "ce": "CE", "kl": "KL"}.get(m, m) for m in metrics) + " vs layer"
    fig.suptitle(items[0].title(what) if len(items) == 1 else _common_title(items, what), fontsize=10)
    return fig


def entropy_histograms(
    items: Analysis | Sequence[Analysis], metric: str = "entropy", layers: Sequence[int] | None = None, bins: int = 40
) -> Figure:
    """Per-layer histograms of a per-token metric (density), analyses overlaid; `layers` are block indices (0-based:
    the residual after that block)."""
    items = [items] if isinstance(items, Analysis) else list(items)
    L = int(np.asarray(items[0].data[metric]).shape[1])
    if layers is None:
        layers = sorted({int(round(x)) for x in np.linspace(0, L - 1, min(L, 8))})
    n = len(layers)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig = new_figure(3.0 * cols, 2.3 * rows + 0.7)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    vals = [np.asarray(a.data[metric], dtype=float) for a in items]
    hi = max(float(np.nanmax(v[:, list(layers)])) if v.size else 1.0 for v in vals)
    edges = np.linspace(0, hi if hi > 0 else 1.0, bins + 1)
    for ax, l in zip(axes, layers):
        for i, (a, v) in enumerate(zip(items, vals)):
            ax.hist(
                v[:, l],
                bins=edges,
                density=True,
                histtype="stepfilled",
                alpha=0.35,
                color=f"C{i}",
                label=_legend_label(a, items) if len(items) > 1 else None,
            )
            ax.axvline(np.mean(v[:, l]), color=f"C{i}", lw=1)
        ax.set_title(f"residual after block {l}", fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in axes[n:]:
        ax.set_visible(False)
    for ax in axes[(rows - 1) * cols : n]:
        ax.set_xlabel(METRIC_LABEL.get(metric, metric), fontsize=8)
    for ax in axes[::cols]:
        ax.set_ylabel("density", fontsize=8)
    if len(items) > 1:
        axes[0].legend(fontsize=7)
    what = f"Per-layer histograms of {metric} over scored tokens (vertical line: mean)"
    fig.suptitle(items[0].title(what) if len(items) == 1 else _common_title(items, what), fontsize=10)
    return fig


# ================================================================ head ablation


def head_heatmap(matrix: np.ndarray, title: str, label: str = "mean ΔCE (nats)", cmap: str = "RdBu_r") -> Figure:
    """Layer x head map with a diverging colour scale centred at zero; NaN (padding heads) left blank."""
    m = np.asarray(matrix, dtype=float)
    L, H = m.shape
    fig = new_figure(min(max(6.0, 2.5 + 0.32 * H), 14), min(max(3.5, 1.6 + 0.2 * L), 14))
    ax = fig.subplots()
    lim = float(np.nanmax(np.abs(m))) if np.isfinite(m).any() else 1.0
    lim = lim if lim > 0 else 1.0
    im = ax.imshow(
        np.ma.masked_invalid(m),
        cmap=_heat_cmap(cmap),
        norm=TwoSlopeNorm(0.0, -lim, lim),
        aspect="auto",
        interpolation="nearest",
        origin="lower",
    )
    _head_axes(ax, L, H)
    fig.colorbar(im, ax=ax, label=label, shrink=0.9)
    ax.set_title(title, fontsize=10)
    return fig


def ablation_heatmap(a: Analysis) -> Figure:
    kind = a.meta.get("ablation") or ("mean" if "mean" in parse_stem(a.name).variant else "zero")
    return head_heatmap(
        a.data["delta_mean"],
        a.title(f"Single-head {kind} ablation: mean ΔCE over samples"),
        label="ΔCE (nats): ablated − base",
    )


def atp_vs_exact(
    est: dict, exact: dict, title: str = "Attribution patching vs exact single-head ΔCE", k: int = 10
) -> Figure:
    """Each head's atp estimate against its exact ΔCE (mean over samples; arrays of the two ablation npz files,
    `results.ablation_pair`), the diagonal, the exact top-k in red; the agreement report in the corner."""
    e = np.mean(est.get("delta_atp", est["delta"]), 0)
    x = np.mean(exact["delta"], 0)
    rep = agreement(e, x, (k,))
    ok = np.isfinite(e) & np.isfinite(x)
    fig = new_figure(5.5, 5.0)
    ax = fig.subplots()
    top = np.zeros_like(ok)
    for l, h in rank_heads(np.where(ok, x, np.nan))[:k]:
        top[l, h] = True
    ax.scatter(x[ok & ~top], e[ok & ~top], s=9, alpha=0.6, color="C0", label="heads")
    ax.scatter(x[top], e[top], s=16, color="C3", label=f"exact top-{k}")
    lo, hi = (
        (float(np.min([x[ok].min(), e[ok].min()])), float(np.max([x[ok].max(), e[ok].max()])))
        if ok.any()
        else (0.0, 1.0)
    )
    ax.plot([lo, hi], [lo, hi], color="0.5", lw=0.8, ls="--", label="estimate = exact")
    ax.set_xlabel("exact ΔCE (nats)")
    ax.set_ylabel("atp estimate (nats)")
    ax.text(
        0.02,
        0.98,
        f"{rep['n']} heads\nSpearman {rep['spearman']:.3f}\nPearson {rep['pearson']:.3f}\n"
        f"top-{k} recall {rep['topk_recall'].get(str(k), float('nan')):.2f}",
        transform=ax.transAxes,
        va="top",
        fontsize=8,
    )
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title, fontsize=10)
    return fig


def top_heads(matrix: np.ndarray, k: int) -> set[tuple[int, int]]:
    """The k heads with the largest finite values (the ablation ranking)."""
    return set(rank_heads(matrix)[:k])


def jaccard_matrix(matrices: Sequence[np.ndarray], k: int) -> np.ndarray:
    sets = [top_heads(m, k) for m in matrices]
    out = np.ones((len(sets), len(sets)))
    for i, a in enumerate(sets):
        for j, b in enumerate(sets):
            out[i, j] = len(a & b) / len(a | b) if a | b else np.nan
    return out


def top_head_overlap(items: Sequence[Analysis], k: int = 10) -> Figure:
    """Jaccard overlap of the top-k heads (largest mean ΔCE) across datasets / modes / populations."""
    labels = [_legend_label(a, items) for a in items]
    J = jaccard_matrix([a.data["delta_mean"] for a in items], k)
    n = len(items)
    w = max(5.5, 2.2 + 0.8 * n + 0.06 * max(map(len, labels)))
    fig = new_figure(w, max(3.5, 1.6 + 0.6 * n + 0.05 * max(map(len, labels))))
    ax = fig.subplots()
    im = ax.imshow(J, cmap="viridis", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(
                j,
                i,
                f"{J[i, j]:.2f}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if J[i, j] < 0.6 else "black",
            )
    ax.set_xticks(range(n), labels, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    fig.colorbar(im, ax=ax, label="Jaccard |A∩B| / |A∪B|", shrink=0.8)
    fig.suptitle(_common_title(items, f"Overlap of the top-{k} heads by mean ΔCE"), fontsize=10)
    return fig


def knockout_curves(ko: dict, title: str = "Cumulative head knockout") -> Figure:
    """Mean CE vs heads removed: matrix ranking, greedy (if run) and random controls, with bootstrap CIs."""
    fig = new_figure(6.5, 4.2)
    ax = fig.subplots()
    base = ko.get("base") or {}

    def curve(points: list[dict], color: str, label: str, band: bool = True, **kw: Any) -> None:
        pts = ([{"k": 0, **base}] if base else []) + list(points)
        k = np.array([p["k"] for p in pts], dtype=float)
        m = np.array([p["mean_ce"] for p in pts], dtype=float)
        ax.plot(k, m, color=color, label=label, marker="o", ms=3, **kw)
        if band and all("ci_low" in p for p in pts):
            ax.fill_between(k, [p["ci_low"] for p in pts], [p["ci_high"] for p in pts], color=color, alpha=0.18, lw=0)

    curve(ko.get("top", []), "C3", "top-k by ablation matrix")
    if ko.get("greedy"):
        curve(ko["greedy"]["curve"], "C1", "greedy (re-ranked each step)")
    rnd = ko.get("random") or {}
    for i, ps in enumerate(rnd.get("per_seed", [])):
        curve(ps, "0.6", "random heads (per seed)" if i == 0 else None, band=False, lw=0.8, alpha=0.7)
    if rnd.get("mean_over_seeds"):
        curve(rnd["mean_over_seeds"], "C0", f"random control (mean of {len(rnd.get('per_seed', []))} seeds)")
    if base:
        ax.axhline(base["mean_ce"], color="k", lw=0.8, ls=":", label="no heads removed")
    ks = [0] + [p["k"] for p in ko.get("top", [])]
    if max(ks) >= 8:
        ax.set_xscale("symlog", linthresh=1)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("heads removed (k)")
    ax.set_ylabel("mean CE over scored tokens (nats)")
    ax.grid(alpha=0.3)
    sel = ko.get("selection", "in-sample: ranked and reported on the same samples")
    band = "95% bootstrap CI over problems" if "ci" in ko else "95% bootstrap CI over samples"
    ax.legend(
        fontsize=8,
        title=f"bands: {band}; random: over draws too" if rnd.get("band") else f"bands: {band}",
        title_fontsize=7,
    )
    ax.set_title(f"{title}\n{sel.split(':')[0]} curves ({sel.split(':', 1)[-1].strip()})", fontsize=9)
    return fig


def ablation_knockout(a: Analysis) -> Figure:
    return knockout_curves(a.extra["knockout"], a.title("Cumulative head knockout"))


def layer_importance(matrix: np.ndarray, title: str, label: str = "mean ΔCE (nats)") -> Figure:
    """Per layer: mean over its heads (bar) and the largest head (dot); NaN heads ignored."""
    m = np.asarray(matrix, dtype=float)
    ok = np.isfinite(m).any(1)
    L = m.shape[0]
    mean = np.full(L, np.nan)
    mx = np.full(L, np.nan)
    mean[ok] = np.nanmean(m[ok], 1)
    mx[ok] = np.nanmax(m[ok], 1)
    fig = new_figure(max(5.0, 0.18 * L + 2), 3.6)
    ax = fig.subplots()
    x = np.arange(L)
    ax.bar(x[ok], mean[ok], color="C0", alpha=0.8, label="mean over heads")
    ax.plot(x[ok], mx[ok], "o", color="C3", ms=3.5, label="largest head")
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xlabel(LAYER_AXIS)
    ax.set_ylabel(label)
    ax.set_xticks(range(0, L, max(1, L // 16)))
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return fig


def ablation_layers(a: Analysis) -> Figure:
    return layer_importance(a.data["delta_mean"], a.title("Ablation importance by layer"))


# ================================================================ Taylor pruning


def taylor_title(a: Analysis, what: str) -> str:
    r = a.data[0] if a.data else {}
    n_s, n_h = len(r.get("scoring_samples") or ()), len(r.get("heldout_samples") or ())
    split = f" ({n_s} scoring / {n_h} held-out samples)" if n_s or n_h else ""
    return f"{what}\n{a.heading}{split}"


def taylor_loss(a: Analysis) -> Figure:
    """Scoring and held-out loss vs pruning iterations applied and vs alive heads. The scoring loss of
    iteration i comes from its scoring pass (heads pruned before i); the held-out loss after its pruning."""
    from matplotlib.ticker import MaxNLocator

    recs = a.data
    fig = new_figure(10, 3.8)
    ax1, ax2 = fig.subplots(1, 2)
    it = np.array([r["iteration"] for r in recs])
    s_loss = np.array([r["scoring_loss_before"] for r in recs])
    h_loss = np.array([recs[0]["base_heldout_loss"]] + [r["heldout_loss_after"] for r in recs])
    before = np.array([r["n_alive_before"] for r in recs])
    after = np.array([recs[0]["n_alive_before"]] + [r["n_alive_after"] for r in recs])
    kw = dict(marker="o", ms=3.5)
    ax1.plot(it - 1, s_loss, color="C0", label="scoring samples", **kw)
    ax1.plot(np.concatenate([[0], it]), h_loss, color="C3", label="held-out samples", **kw)
    ax2.plot(before, s_loss, color="C0", label="scoring samples", **kw)
    ax2.plot(after, h_loss, color="C3", label="held-out samples", **kw)
    ax1.set_xlabel("pruning iterations applied")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.set_xlabel("alive heads")
    ax2.invert_xaxis()
    for ax in (ax1, ax2):
        ax.set_ylabel("mean CE over scored tokens (nats)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    stop = recs[-1].get("stop_reason")
    fig.suptitle(
        taylor_title(a, "Iterative Taylor pruning: loss" + (f" (stopped: {stop})" if stop else "")), fontsize=10
    )
    return fig


def pruned_at(recs: Sequence[dict], shape: tuple[int, int]) -> np.ndarray:
    """[L, Hmax]: the iteration (1-based) that pruned each head; 0 for survivors."""
    out = np.zeros(shape, dtype=int)
    for r in recs:
        for l, h in r["pruned"]:
            out[l, h] = r["iteration"]
    return out


def taylor_heads(a: Analysis) -> Figure:
    """Surviving heads after the last iteration (dark green); pruned heads shaded by the iteration that pruned
    them; padding heads of narrower layers blank."""
    recs = a.data
    first = importance_matrix(recs[0])  # all heads alive: NaN only at padding
    L, H = first.shape
    P = pruned_at(recs, (L, H)).astype(float)
    P[np.isnan(first)] = np.nan
    n_it = int(recs[-1]["iteration"])
    shades = colormaps["YlOrBr"](np.linspace(0.15, 0.85, n_it))
    cmap = ListedColormap([(0.1, 0.45, 0.2, 1.0)] + [tuple(c) for c in shades]).with_extremes(bad=(1, 1, 1, 0))
    fig = new_figure(min(max(6.5, 2.8 + 0.32 * H), 14), min(max(3.5, 1.6 + 0.2 * L), 14))
    ax = fig.subplots()
    im = ax.imshow(
        np.ma.masked_invalid(P),
        cmap=cmap,
        norm=BoundaryNorm(np.arange(n_it + 2) - 0.5, n_it + 1),
        aspect="auto",
        interpolation="nearest",
        origin="lower",
    )
    _head_axes(ax, L, H)
    cb = fig.colorbar(im, ax=ax, shrink=0.9)
    ticks = [0] + list(range(1, n_it + 1, max(1, n_it // 8)))
    cb.set_ticks(ticks, labels=["alive"] + [f"pruned at {t}" for t in ticks[1:]])
    alive = int((P == 0).sum())
    ax.set_title(
        taylor_title(a, f"Taylor pruning: surviving heads after {n_it} iterations ({alive} alive)"), fontsize=10
    )
    return fig


def taylor_layers(a: Analysis) -> Figure:
    """Importance by layer from the first iteration's (all heads alive) importance matrix."""
    r = a.data[0]
    s = r.get("settings") or {}
    what = (
        ("-Σ ∂L/∂m (signed)" if s.get("signed") else "Σ|∂L/∂m|")
        if s.get("estimator", "gate") == "gate"
        else "Σ|<∂L/∂a, a>|"
    )
    return layer_importance(
        importance_matrix(r),
        taylor_title(a, "Taylor importance by layer (first iteration, all heads alive)"),
        label=f"importance {what}" + (" (L2-normalised per layer)" if s.get("normalize") else ""),
    )


# ================================================================ CMA-ES search


def cmaes_metric(a: Analysis) -> str:
    """What a CMA-ES output's fitness and held-out figures measure: `CE` (nats) or `1 - pass@1` (--fitness pass1)."""
    return "1 - pass@1" if (a.meta.get("search") or {}).get("fitness") == "pass1" else "CE"


def cmaes_title(a: Analysis, what: str) -> str:
    ident = a.meta.get("identity") or {}
    n_s, n_h = len(ident.get("scoring_samples") or ()), len(ident.get("heldout_samples") or ())
    unit = "samples"
    if ident.get("pass1"):  # the fitness and held-out figures are on problems of the dataset
        n_s, n_h, unit = len(ident["pass1"]["dev"]), len(ident["pass1"]["heldout"]), "problems, pass@1"
    r = a.data[-1] if a.data else {}
    n = a.meta.get("n_heads")
    keep = f", keep {r.get('budget')}" + (f" of {n}" if n else "") + " heads" if r.get("budget") else ""
    split = f" ({n_s} {'dev' if unit != 'samples' else 'scoring'} / {n_h} held-out {unit}{keep})" if n_s or n_h else ""
    # CIs resample held-out problems
    held = (n_h if ident.get("pass1") else len({str(p) for p, _ in ident.get("heldout_samples") or ()})) or None
    return f"{what}\n{a.heading}{split}" + small_n_caveat(held, "held-out problems")


def _heldout_band(ax, gens: np.ndarray, pts: Sequence[dict | None], color: str, label: str, **kw: Any) -> None:
    ok = [i for i, p in enumerate(pts) if p]
    if not ok:
        return
    m = np.array([pts[i]["mean"] for i in ok])
    lo, hi = np.array([pts[i]["ci_low"] for i in ok]), np.array([pts[i]["ci_high"] for i in ok])
    ax.plot(gens[ok], m, color=color, label=label, **kw)
    ax.fill_between(gens[ok], lo, hi, color=color, alpha=0.15, lw=0)


def cmaes_fitness(a: Analysis) -> Figure:
    """Scoring fitness per generation (best, median, worst of the population; best so far) and the held-out CE of
    each generation's best and of the best so far, with 95% bootstrap CIs over held-out problems."""
    from matplotlib.ticker import MaxNLocator

    recs = a.data
    g = np.array([r["generation"] for r in recs])
    fig = new_figure(8, 4.2)
    ax = fig.subplots()
    ax.fill_between(
        g,
        [r["best_fitness"] for r in recs],
        [r["worst_fitness"] for r in recs],
        color="C0",
        alpha=0.12,
        lw=0,
        label="population best..worst",
    )
    ax.plot(g, [r["median_fitness"] for r in recs], color="C0", ls=":", label="population median")
    ax.plot(g, [r["best_fitness"] for r in recs], color="C0", marker="o", ms=3, label="generation best")
    ax.step(g, [r["best_so_far_fitness"] for r in recs], where="post", color="k", lw=1.2, label="best so far")
    _heldout_band(
        ax, g, [r.get("best_heldout") for r in recs], "C3", "held-out: generation best (95% CI)", marker="s", ms=3
    )
    _heldout_band(ax, g, [r.get("best_so_far_heldout") for r in recs], "C1", "held-out: best so far (95% CI)", ls="--")
    ax.set_xlabel("generation")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    pen = (a.meta.get("search") or {}).get("encoding") == "threshold"
    metric = "1 - pass@1 over problems" if cmaes_metric(a) != "CE" else "mean CE over scored tokens (nats)"
    ax.set_ylabel(metric + (" + size penalty" if pen else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    stop = (a.extra.get("final") or {}).get("stop_reason")
    ax.set_title(
        cmaes_title(a, "CMA-ES head search: fitness per generation" + (f" (stop: {stop})" if stop else "")), fontsize=10
    )
    return fig


def cmaes_sigma(a: Analysis) -> Figure:
    """pycma's step size per generation, and the evaluations it used (all candidates; those not in the cache)."""
    from matplotlib.ticker import MaxNLocator

    recs = a.data
    g = np.array([r["generation"] for r in recs])
    fig = new_figure(8, 3.4)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(g, [r["sigma"] for r in recs], marker="o", ms=3)
    ax1.set_yscale("log")
    ax1.set_ylabel("sigma (step size)")
    ax2.plot(g, [r["evals"] for r in recs], label="candidates")
    ax2.plot(g, [r.get("evals_computed", r["evals"]) for r in recs], ls="--", label="computed (cache misses)")
    ax2.set_ylabel("fitness evaluations")
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.set_xlabel("generation")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.suptitle(cmaes_title(a, "CMA-ES head search: step size and evaluations"), fontsize=10)
    return fig


def cmaes_best_mask(a: Analysis) -> np.ndarray:
    """The final mask ([L, Hmax]: 1 kept, 0 removed, NaN padding), else the best so far of the last generation."""
    final = a.extra.get("final")
    return results.mask_from_rows(final["final"]["mask"] if final else a.data[-1]["best_so_far_mask"])


def cmaes_mask(a: Analysis) -> Figure:
    """The best mask as a layer x head map: kept heads dark, removed light, padding blank."""
    m = cmaes_best_mask(a)
    L, H = m.shape
    fig = new_figure(min(max(6.0, 2.5 + 0.32 * H), 14), min(max(3.5, 1.6 + 0.2 * L), 14))
    ax = fig.subplots()
    cmap = ListedColormap([(0.93, 0.87, 0.75, 1.0), (0.1, 0.45, 0.2, 1.0)]).with_extremes(bad=(1, 1, 1, 0))
    im = ax.imshow(
        np.ma.masked_invalid(m),
        cmap=cmap,
        norm=BoundaryNorm([-0.5, 0.5, 1.5], 2),
        aspect="auto",
        interpolation="nearest",
        origin="lower",
    )
    _head_axes(ax, L, H)
    fig.colorbar(im, ax=ax, shrink=0.9, ticks=[0, 1]).set_ticklabels(["removed", "kept"])
    final = a.extra.get("final")
    what = f"CMA-ES best mask: {int(np.nansum(m))} heads kept"
    if final:
        h = final["final"]["heldout"]
        what += (
            f"; held-out {cmaes_metric(a)} {h['mean']:.3f} [{h['ci_low']:.3f}, {h['ci_high']:.3f}] "
            "(95% CI over problems)"
        )
    ax.set_title(cmaes_title(a, what), fontsize=10)
    return fig


def cmaes_mask_changes(a: Analysis) -> Figure:
    """How the best mask so far changed: its heads per generation (kept dark), and how many heads changed from the
    previous generation."""
    recs = a.data
    M = np.stack([results.mask_from_rows(r["best_so_far_mask"]) for r in recs])  # [G, L, Hmax]
    exists = np.isfinite(M[0])
    flat = M[:, exists]  # [G, heads]
    g = np.array([r["generation"] for r in recs])
    fig = new_figure(10, 3.8)
    ax1, ax2 = fig.subplots(1, 2, width_ratios=[3, 1])
    cmap = ListedColormap([(0.93, 0.87, 0.75, 1.0), (0.1, 0.45, 0.2, 1.0)])
    ax1.imshow(
        flat,
        cmap=cmap,
        vmin=0,
        vmax=1,
        aspect="auto",
        interpolation="nearest",
        origin="lower",
        extent=(-0.5, flat.shape[1] - 0.5, g[0] - 0.5, g[-1] + 0.5),
    )
    starts = np.concatenate([[0], np.cumsum(exists.sum(1))[:-1]])
    step = max(1, len(starts) // 10)
    ax1.set_xticks(starts[::step], [str(l) for l in range(0, len(starts), step)])
    ax1.set_xlabel(f"head, grouped by {LAYER_AXIS} (tick: the layer's first head)")
    ax1.set_ylabel("generation")
    ax1.set_title("best mask so far (dark: kept)", fontsize=9)
    changed = np.concatenate([[0], (np.diff(flat, axis=0) != 0).sum(1)])
    ax2.plot(changed, g, marker="o", ms=3)
    ax2.set_xlabel("heads changed")
    ax2.set_ylim(g[0] - 0.5, g[-1] + 0.5)
    ax2.grid(alpha=0.3)
    fig.suptitle(cmaes_title(a, "CMA-ES head search: how the best mask changed"), fontsize=10)
    return fig


CONTROL_LABEL = {
    "cmaes": "CMA-ES",
    "random": "random (same heads per layer)",
    "taylor": "Taylor-pruned",
    "ablation_topk": "ablation top-k",
    "unpruned": "unpruned",
}


def cmaes_controls(a: Analysis) -> Figure:
    """Held-out CE of the final mask against controls of the same size (random masks with the same heads per layer,
    each draw a dot; the Taylor-pruned set; the ablation top-k set) and the unpruned model, 95% CI over problems."""
    final = a.extra["final"]
    sets = final["controls"]["sets"]
    names = [n for n in ("unpruned", "cmaes", "ablation_topk", "taylor", "random") if n in sets]
    fig = new_figure(8, 1.4 + 0.55 * len(names))
    ax = fig.subplots()
    y = np.arange(len(names))[::-1]
    for yi, n in zip(y, names):
        h = sets[n]["heldout"]
        color = "C2" if n == "cmaes" else "0.5" if n == "unpruned" else "C0"
        ax.barh(yi, h["mean"], color=color, alpha=0.7)
        ax.errorbar(h["mean"], yi, xerr=[[h["mean"] - h["ci_low"]], [h["ci_high"] - h["mean"]]], color="k", capsize=3)
        if n == "random":
            draws = [sets[k]["heldout"]["mean"] for k in sets if k.startswith("random_")]
            ax.plot(draws, [yi] * len(draws), "o", color="k", ms=3, alpha=0.6)
        d = sets[n].get("diff_vs_cmaes")
        if d:
            ax.annotate(
                f"Δ vs CMA-ES {d['mean']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]",
                (h["ci_high"], yi),
                xytext=(4, 0),
                textcoords="offset points",
                va="center",
                fontsize=7,
            )
    ax.set_yticks(y, [CONTROL_LABEL.get(n, n) for n in names])
    metric = "1 - pass@1" if cmaes_metric(a) != "CE" else "mean CE over scored tokens (nats)"
    ax.set_xlabel(f"held-out {metric}, 95% CI over problems")
    ax.grid(alpha=0.3, axis="x")
    ax.set_title(
        cmaes_title(a, f"CMA-ES mask vs controls of the same size ({final['final']['n_kept']} heads kept)"), fontsize=10
    )
    return fig


# ================================================================ generation and evaluation


def pass_at_k_points(summary: dict) -> list[tuple[int, float, float, float]]:
    """[(k, estimate, ci_low, ci_high)] from summary.json's `pass_at_k` ({"pass@k": {estimate, ci_low, ...}})."""
    pk = summary.get("pass_at_k") or {}
    return sorted((int(k.split("@")[1]), v["estimate"], v["ci_low"], v["ci_high"]) for k, v in pk.items())


def pass_at_k(summaries: dict[str, dict], title: str = "pass@k, 95% CIs over problems") -> Figure:
    """pass@k per dataset with its bootstrap CI (solid caps) and the Wilson interval beside it (dashed; honest at 0%
    and 100% and for few problems); n (problems) in the legend, a caveat when n < stats.SMALL_N. With one k per
    dataset (n = 1 sample each) a point per dataset, not a line through one point."""
    fig = new_figure(6.0, 3.8)
    ax = fig.subplots()
    single = all(len(pass_at_k_points(s)) <= 1 for s in summaries.values())
    small = []
    for i, (ds, s) in enumerate(summaries.items()):
        pts = pass_at_k_points(s)
        if not pts:
            continue
        k = np.array([p[0] for p in pts], dtype=float)
        est = np.array([p[1] for p in pts]) * 100
        lo = np.array([p[2] for p in pts], dtype=float) * 100
        hi = np.array([p[3] for p in pts], dtype=float) * 100
        n = s.get("n_problems")
        if n is not None and n < SMALL_N:
            small.append(f"{ds} n={n}")
        x = np.full(len(k), float(i)) if single else k + 0.04 * i
        lab = ds + (f" (n={n} problems)" if n else "")
        ax.errorbar(
            x,
            est,
            yerr=np.vstack([est - lo, hi - est]),
            marker="o",
            ms=5,
            capsize=4,
            color=f"C{i}",
            label=lab,
            ls="none" if single else "-",
        )
        wil = [(v.get("wilson_low"), v.get("wilson_high")) for v in (s["pass_at_k"][f"pass@{int(kk)}"] for kk in k)]
        if all(w[0] is not None for w in wil):
            wl, wh = (np.array(w, dtype=float) * 100 for w in zip(*wil))
            eb = ax.errorbar(
                x + (0.12 if single else 0.02 * max(1.0, float(k.max()))),
                est,
                yerr=np.vstack([est - wl, wh - est]),
                fmt="none",
                capsize=3,
                color=f"C{i}",
                alpha=0.7,
                label="Wilson interval" if i == 0 else None,
            )
            eb.lines[2][0].set_linestyle("--")
    tops = [v.get("wilson_high", v["ci_high"]) for s in summaries.values() for v in (s.get("pass_at_k") or {}).values()]
    if single:
        ax.set_xticks(range(len(summaries)), list(summaries))
        ax.set_xlim(-0.6, len(summaries) - 0.4)
        ks = {p[0] for s in summaries.values() for p in pass_at_k_points(s)}
        ax.set_xlabel("dataset" + (f" (pass@{ks.pop()})" if len(ks) == 1 else ""))
    else:
        ax.set_xlabel("k")
    ax.set_ylabel("pass@k (%)")
    ax.set_ylim(0, min(100, max(5, 115 * max(tops or [0]))))  # a 0% result sits on a readable 0-5% axis
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="solid: bootstrap; dashed: Wilson", title_fontsize=7)
    if small:
        ax.text(
            0.5,
            0.97,
            f"caveat: n < {SMALL_N} problems ({', '.join(small)}): intervals are rough",
            transform=ax.transAxes,
            ha="center",
            va="top",
            fontsize=8,
            color="C3",
        )
    ax.set_title(title, fontsize=10)
    return fig


def _stacked(ax, rows: dict[str, dict[str, int]], order: Sequence[str], colors: dict[str, str]) -> None:
    names = list(rows)
    cats = [c for c in order if any(c in r for r in rows.values())] + sorted(
        {c for r in rows.values() for c in r} - set(order)
    )
    left = np.zeros(len(names))
    for j, c in enumerate(cats):
        tot = np.array([max(sum(rows[n].values()), 1) for n in names], dtype=float)
        v = np.array([rows[n].get(c, 0) for n in names], dtype=float)
        ax.barh(names, v / tot * 100, left=left, color=colors.get(c, f"C{j + 4}"), label=c)
        for y, (x0, vv, t) in enumerate(zip(left, v, tot)):
            if vv / t > 0.06:
                ax.text(x0 + vv / t * 50, y, f"{int(vv)}", ha="center", va="center", fontsize=8, color="white")
        left += v / tot * 100
    ax.set_xlim(0, 100)
    ax.set_xlabel("% of samples")
    ax.invert_yaxis()
    ax.legend(fontsize=8, ncols=min(len(cats), 5), loc="upper center", bbox_to_anchor=(0.5, -0.25))


def statuses(evals: dict[str, list[dict]]) -> Figure:
    """Evaluation statuses per dataset (share of samples; counts inside the bars)."""
    rows = {ds: _count(r["status"] for r in recs) for ds, recs in evals.items() if recs}
    fig = new_figure(6.5, 1.6 + 0.5 * len(rows))
    _stacked(fig.subplots(), rows, list(STATUS_COLORS), STATUS_COLORS)
    fig.suptitle("Evaluation statuses (every generated sample; no code counts as failed)", fontsize=10)
    return fig


def finish_reasons(gens: dict[str, list[dict]]) -> Figure:
    rows = {ds: _count(r["finish_reason"] for r in recs) for ds, recs in gens.items() if recs}
    fig = new_figure(6.5, 1.6 + 0.5 * len(rows))
    _stacked(fig.subplots(), rows, ["stop", "length"], {"stop": "#2a9d8f", "length": "#e76f51"})
    fig.suptitle("Finish reasons (length: cut at --max-tokens)", fontsize=10)
    return fig


def output_lengths(gens: dict[str, list[dict]], bins: int = 30) -> Figure:
    """Output token counts per dataset, split by finish reason."""
    items = [(ds, recs) for ds, recs in gens.items() if recs]
    fig = new_figure(4.0 * len(items) + 0.5, 3.4)
    axes = fig.subplots(1, len(items), squeeze=False)[0]
    for ax, (ds, recs) in zip(axes, items):
        n = np.array([r["n_output_tokens"] for r in recs])
        edges = np.histogram_bin_edges(n, bins=bins)
        for reason, c in (("stop", "#2a9d8f"), ("length", "#e76f51")):
            sel = [r["n_output_tokens"] for r in recs if r["finish_reason"] == reason]
            if sel:
                ax.hist(sel, bins=edges, color=c, alpha=0.7, label=f"{reason} ({len(sel)})")
        ax.set_title(f"{ds}: median {int(np.median(n))} tokens", fontsize=9)
        ax.set_xlabel("output tokens")
        ax.set_ylabel("samples")
        ax.legend(fontsize=8)
    fig.suptitle("Output lengths", fontsize=10)
    return fig


def _count(vals: Iterable[Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in vals:
        out[str(v)] = out.get(str(v), 0) + 1
    return out


# ================================================================ everything present

LOADERS = {"entropy": load_entropy, "ablation": load_ablation, "taylor": load_taylor, "cmaes": load_cmaes}


def load_all(
    results_dir: str | Path, model: str | None, stage: str, only: Sequence[str] | None = None
) -> list[Analysis]:
    """Every finished output of a stage (`entropy`, `ablation`, `taylor`, `cmaes`) over the datasets (or `only`
    these)."""
    out = []
    for d in datasets(results_dir, model):
        if not only or d in only:
            for name in stems(results_dir, model, d, stage):
                a = _read(LOADERS[stage], results_dir, model, d, name)
                if a is not None and (stage not in results.JSONL_STAGES or a.data):
                    out.append(a)
    return out


def facet(a: Analysis, name: str) -> str:
    return dict(_FACETS)[name](a)


def compare(items: Sequence[Analysis], vary: str) -> list[list[Analysis]]:
    """Groups of analyses equal in every facet (dataset, mode, population, extra) but `vary`, with at least two
    values of `vary`: regular vs chain_code (`mode`), correct vs incorrect (`population`), across `dataset`."""
    groups: dict[tuple, list[Analysis]] = {}
    for a in items:
        groups.setdefault(tuple(f(a) for n, f in _FACETS if n != vary), []).append(a)
    return [g for g in groups.values() if len({facet(a, vary) for a in g}) > 1]


def paired(items: Sequence[Analysis]) -> list[list[Analysis]]:
    """Correct vs incorrect generations on the same problems (`--select correct_paired` / `incorrect_paired`), equal
    in every other facet: the comparison without the difficulty confound of correct vs incorrect."""
    out = []
    for g in compare(items, "population"):
        pair = sorted((a for a in g if a.population in PAIRED_POPULATIONS), key=lambda a: a.population)
        if {a.population for a in pair} == set(PAIRED_POPULATIONS):
            out.append(pair)
    return out


PAIRED_POPULATIONS = tuple(f"generations/{s}" for s in results.PAIRED)


def _group_name(g: Sequence[Analysis], vary: str) -> str:
    keep = [f(g[0]) for n, f in _FACETS if n != vary and f(g[0])]
    return "_".join(k.replace("/", "-") for k in keep)


def generation_figures(
    results_dir: str | Path, model: str | None, only: Sequence[str] | None = None
) -> Iterator[tuple[str, Figure]]:
    dss = [d for d in datasets(results_dir, model) if not only or d in only]
    summ = {d: s for d in dss if (s := _read(load_summary, results_dir, model, d)) and pass_at_k_points(s)}
    if summ:
        yield "generation_pass_at_k", pass_at_k(summ)
    ev = {d: e for d in dss if (e := _read(load_evaluations, results_dir, model, d))}
    if ev:
        yield "generation_statuses", statuses(ev)
    gens = {d: g for d in dss if (g := _read(load_generations, results_dir, model, d))}
    if gens:
        yield "generation_finish_reasons", finish_reasons(gens)
        yield "generation_output_lengths", output_lengths(gens)


def entropy_figures(
    results_dir: str | Path, model: str | None, only: Sequence[str] | None = None
) -> Iterator[tuple[str, Figure]]:
    """Per output: entropy/CE vs layer and per-layer histograms; then regular vs chain_code, populations
    against each other (CE histograms too), correct vs incorrect on the same problems (paired) and datasets against
    each other wherever the results allow."""
    items = load_all(results_dir, model, "entropy", only)
    for a in items:
        yield f"entropy_{a.dataset}_{a.name}_layers", entropy_by_layer(a)
        yield f"entropy_{a.dataset}_{a.name}_histograms", entropy_histograms(a)
    for g in compare(items, "mode"):
        yield f"entropy_modes_{_group_name(g, 'mode')}", entropy_by_layer(g)
    for g in compare(items, "population"):
        yield f"entropy_populations_{_group_name(g, 'population')}", entropy_by_layer(g)
        yield f"entropy_populations_{_group_name(g, 'population')}_histograms", entropy_histograms(g, metric="ce")
    for g in paired(items):
        yield f"entropy_paired_{_group_name(g, 'population')}", entropy_by_layer(g)
    for g in compare(items, "dataset"):
        yield f"entropy_datasets_{_group_name(g, 'dataset')}", entropy_by_layer(g)


def ablation_figures(
    results_dir: str | Path, model: str | None, only: Sequence[str] | None = None, k: int = 10
) -> Iterator[tuple[str, Figure]]:
    items = load_all(results_dir, model, "ablation", only)
    for a in items:
        yield f"ablation_{a.dataset}_{a.name}_heatmap", ablation_heatmap(a)
        yield f"ablation_{a.dataset}_{a.name}_layers", ablation_layers(a)
        if a.extra.get("knockout"):
            yield f"ablation_{a.dataset}_{a.name}_knockout", ablation_knockout(a)
        pair = _read(results.ablation_pair, model_dir(results_dir, model) / a.dataset / "ablation", a.name)
        if pair is not None:
            yield (
                f"ablation_{a.dataset}_{a.name}_vs_exact",
                atp_vs_exact(*pair, a.title("Attribution patching vs exact single-head ΔCE"), k),
            )
    by_shape: dict[tuple, list[Analysis]] = {}
    for a in items:
        by_shape.setdefault(np.shape(a.data["delta_mean"]), []).append(a)
    groups = [g for g in by_shape.values() if len(g) > 1]  # one per model shape (always one for a model)
    for i, g in enumerate(groups):
        yield "ablation_top_head_overlap" + (f"_{i}" if i else ""), top_head_overlap(g, k=k)


def taylor_figures(
    results_dir: str | Path, model: str | None, only: Sequence[str] | None = None
) -> Iterator[tuple[str, Figure]]:
    for a in load_all(results_dir, model, "taylor", only):
        yield f"taylor_{a.dataset}_{a.name}_loss", taylor_loss(a)
        yield f"taylor_{a.dataset}_{a.name}_heads", taylor_heads(a)
        yield f"taylor_{a.dataset}_{a.name}_layers", taylor_layers(a)


def cmaes_figures(
    results_dir: str | Path, model: str | None, only: Sequence[str] | None = None
) -> Iterator[tuple[str, Figure]]:
    for a in load_all(results_dir, model, "cmaes", only):
        yield f"cmaes_{a.dataset}_{a.name}_fitness", cmaes_fitness(a)
        yield f"cmaes_{a.dataset}_{a.name}_sigma", cmaes_sigma(a)
        yield f"cmaes_{a.dataset}_{a.name}_mask", cmaes_mask(a)
        yield f"cmaes_{a.dataset}_{a.name}_mask_changes", cmaes_mask_changes(a)
        if a.extra.get("final"):
            yield f"cmaes_{a.dataset}_{a.name}_controls", cmaes_controls(a)


# ================================================================ pruned inference (btp.pruned outputs)


def load_pruned(results_dir: str | Path, model: str | None, dataset: str) -> dict | None:
    """`pruned/comparison.json` of a model x dataset; None when there is none."""
    p = model_dir(results_dir, model) / dataset / results.PRUNED / results.COMPARISON
    return read_json(p) if p.exists() else None


def pruned_points(comp: dict, k: str = "pass@1") -> dict[str, list[tuple[float, float, float, float]]]:
    """method -> [(fraction removed, pass@k of the setting, controls' min, controls' max)] by fraction; the base
    is every method's point at fraction 0 (its band is itself)."""
    b = comp["base"]["pass_at_k"][k]
    out: dict[str, list] = {}
    for s in comp.get("settings", []):
        band = s.get("controls_pass_at_k", {}).get(k)
        lo, hi = (band["min"], band["max"]) if band else (np.nan, np.nan)
        out.setdefault(s.get("method") or "heads", [(0.0, b, b, b)]).append((s["fraction"], s["pass_at_k"][k], lo, hi))
    return {m: sorted(v) for m, v in out.items()}


def pruned_curve(comp: dict, k: str = "pass@1", title: str | None = None) -> Figure:
    """pass@k against the fraction of heads removed, one line per selection method, each with the band of its
    random controls (same per-layer counts); right: pass@k against the held-out CE of the same head sets (how
    well the cheap loss predicts the solve rate)."""
    fig = new_figure(10.5, 4.0)
    ax, bx = fig.subplots(1, 2)
    for i, (method, pts) in enumerate(pruned_points(comp, k).items()):
        f, y, lo, hi = (np.array(v, dtype=float) for v in zip(*pts))
        ax.plot(f, y, marker="o", color=f"C{i}", label=method)
        ok = np.isfinite(lo)
        if ok.sum() > 0:
            ax.fill_between(
                f[ok], lo[ok], hi[ok], color=f"C{i}", alpha=0.15, lw=0, label=f"{method}: random controls (min-max)"
            )
            ax.scatter(f[ok], lo[ok], marker="_", color=f"C{i}", alpha=0.6)
            ax.scatter(f[ok], hi[ok], marker="_", color=f"C{i}", alpha=0.6)
    ax.axhline(comp["base"]["pass_at_k"][k], color="k", lw=0.8, ls=":", label="unpruned")
    ax.set_xlabel("fraction of heads removed")
    ax.set_ylabel(f"{k} over {comp.get('n_problems', '?')} problems")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    entries = [comp["base"]] + [e for s in comp.get("settings", []) for e in [s, *s.get("controls", [])]]
    ce = [(e["heldout_ce"], e["pass_at_k"][k], " " in e["label"]) for e in entries if e.get("heldout_ce") is not None]
    for is_ctl, color, lab in ((False, "C3", "base and settings"), (True, "0.5", "random controls")):
        pts = [(x, y) for x, y, c in ce if c == is_ctl]
        if pts:
            bx.scatter(*zip(*pts), color=color, label=lab, s=18)
    bx.set_xlabel("held-out CE with the heads gated (nats)")
    bx.set_ylabel(k)
    bx.grid(alpha=0.3)
    if ce:
        bx.legend(fontsize=7)
    n = comp.get("n_problems")
    head = title or f"Pruned inference: {comp.get('model', '')} {comp.get('dataset', '')}"
    fig.suptitle(head + (f" (n={n} problems)" if n else "") + small_n_caveat(n), fontsize=10)
    return fig


def pruned_figures(
    results_dir: str | Path, model: str | None, only: Sequence[str] | None = None
) -> Iterator[tuple[str, Figure]]:
    for d in datasets(results_dir, model):
        if (not only or d in only) and (comp := _read(load_pruned, results_dir, model, d)):
            yield f"pruned_{d}_pass_at_1", pruned_curve(comp)


FAMILIES = {
    "generation": generation_figures,
    "entropy": entropy_figures,
    "ablation": ablation_figures,
    "taylor": taylor_figures,
    "cmaes": cmaes_figures,
    "pruned": pruned_figures,
}


def write_figures(
    results_dir: str | Path,
    model: str | None,
    out: str | Path,
    *,
    only: Sequence[str] | None = None,
    families: Sequence[str] = tuple(FAMILIES),
    pdf: bool = False,
    dpi: int = 130,
) -> list[Path]:
    """Write every figure the results allow; returns the files written."""
    from .store import UserError, provenance

    have = datasets(results_dir, model)
    if only and (bad := [d for d in only if d not in have]):
        raise UserError(
            f"no results for --dataset {', '.join(bad)} under {model_dir(results_dir, model)} — have: "
            f"{', '.join(have) or 'none'}"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = provenance(stage="plots")
    SKIPPED.clear()
    slug = model_dir(results_dir, model).name
    where = f"{model_dir(results_dir, model)} (btp {stamp['versions']['btp']}, git {stamp['git_commit'] or '?'})"
    written = []
    for fam in families:
        for name, fig in FAMILIES[fam](results_dir, model, only):
            with_model(fig, slug)
            for ext in ("png", "pdf") if pdf else ("png",):
                p = out / figure_file(slug, name, ext)
                meta = {"Title": name, "Description" if ext == "png" else "Subject": f"btp.plots from {where}"}
                fig.savefig(p, dpi=dpi, metadata=meta)
                written.append(p)
    return written


def figure_file(slug: str, name: str, ext: str) -> str:
    """`<model-slug>__<figure>.<ext>`: figures of several models share an --out folder without overwriting."""
    return f"{slug}__{name}.{ext}"


def with_model(fig: Figure, slug: str) -> Figure:
    """Name the model at the top of a figure (in front of its suptitle, or as one), unless its title already does."""
    if slug in "\n".join(t.get_text() for t in fig.findobj(Text)):
        return fig
    old = fig.get_suptitle()
    fig.suptitle(f"{slug} · {old}" if old else f"model {slug}", fontsize=10 if old else 9)
    return fig


def main(argv: Sequence[str] | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    p = cli.parser("plots", "Figures (PNG, and PDF with --pdf) of everything a results tree holds; computes nothing.")
    p.add_argument("--results-dir", default="results", help="root of the results tree")
    p.add_argument("--model", default=None, help="slug, HF id or embedded name (default: the only model)")
    p.add_argument(
        "--dataset",
        action="append",
        default=None,
        help="only these datasets, comma-separated or repeated (default: every dataset)",
    )
    p.add_argument("--out", default="figures", help="output folder")
    p.add_argument(
        "--only",
        choices=list(FAMILIES),
        action="append",
        default=None,
        help="only these figure families, repeatable (default: all)",
    )
    p.add_argument("--pdf", action="store_true", help="also write PDFs")
    p.add_argument("--dpi", type=int, default=130, help="resolution of the PNGs", check=cli.at_least(1))
    args = cli.parse(p, argv)
    datasets = [d.strip() for a in args.dataset for d in a.split(",") if d.strip()] if args.dataset else None
    try:
        files = write_figures(
            args.results_dir,
            args.model,
            args.out,
            only=datasets,
            families=args.only or tuple(FAMILIES),
            pdf=args.pdf,
            dpi=args.dpi,
        )
    except (FileNotFoundError, ValueError) as e:  # no such results / model / dataset: said as one line
        print(cli.error_line("plots", e), file=sys.stderr)
        raise SystemExit(2) from None
    for f in files:
        print(f)
    print(f"[btp.plots] {len(files)} files in {args.out}", file=sys.stderr)
    if args.model != results.REFERENCE and (note := results.reference_note(args.results_dir)):
        print(f"[btp.plots] not plotted: the {note} (--model {results.REFERENCE} plots it)", file=sys.stderr)
    if SKIPPED:  # the other figures are written; a broken file still must not look like success
        print(f"[btp.plots] {len(SKIPPED)} broken files skipped (run btp.check):", file=sys.stderr)
        for why in SKIPPED:
            print(f"  {why}", file=sys.stderr)
        raise SystemExit(1)
    return files


# ================================================================ OV/QK circuits (btp.circuits outputs)
# `results/circuits/<base-slug>__<other-slug>.{csv,npz,json}`: read here, never recomputed.


@dataclass
class Circuits:
    """One circuit comparison: [L, Hmax] matrices and per-rotary-pair arrays (npz) and its JSON."""

    name: str  # `<base-slug>__<other-slug>`
    data: dict  # npz arrays
    meta: dict

    @property
    def base(self) -> str:
        return str(self.meta.get("model"))

    @property
    def other(self) -> str:
        return str(self.meta.get("other_model"))

    @property
    def label(self) -> str:
        return f"{results.model_slug(self.base)} → {results.model_slug(self.other)}"

    def matrix(self, col: str) -> np.ndarray:
        return np.asarray(self.data[col], dtype=float)


def load_circuits(
    results_dir: str | Path, base: str | None = None, other: str | None = None, name: str | None = None
) -> Circuits:
    """A circuits output by its name, by the two models (slugs, HF ids, folders or embedded names), or the only one
    of `base` (or at all) when `other` is None."""
    d = Path(results_dir) / results.CIRCUITS
    if name is None and other is None:  # the only comparison (of `base`, if given)
        have = [
            n
            for n in results.circuit_names(results_dir)
            if base is None or any(n.startswith(f"{b}__") for b in results.model_slugs(base))
        ]
        if len(have) != 1:
            raise FileNotFoundError(
                f"{len(have)} circuit comparisons"
                + (f" of {base}" if base else "")
                + f" under {d} ({', '.join(have) or 'run python -m btp.circuits'}): pass other="
            )
        name = have[0]
    elif name is None:
        names = (
            [f"{a}__{b}" for a in results.model_slugs(base or "") for b in results.model_slugs(other)] if base else []
        )
        name = next((n for n in names if results.read_circuits(results_dir, n) is not None), names[0] if names else "?")
    found = results.read_circuits(results_dir, name)
    if found is None:
        raise FileNotFoundError(f"no circuits output {name} under {d} (run python -m btp.circuits)")
    return Circuits(name, *found)


def _cos_heat(ax, fig: Figure, m: np.ndarray, title: str) -> None:
    lo = min(0.0, float(np.nanmin(m))) if np.isfinite(m).any() else 0.0
    im = ax.imshow(
        np.ma.masked_invalid(m),
        cmap=colormaps["viridis"].with_extremes(bad=(1, 1, 1, 0)),
        vmin=lo,
        vmax=1.0,
        aspect="auto",
        interpolation="nearest",
        origin="lower",
    )
    _head_axes(ax, *m.shape)
    fig.colorbar(im, ax=ax, label="cosine (Frobenius)", shrink=0.9)
    ax.set_title(title, fontsize=9)


def circuit_heatmaps(c: Circuits) -> Figure:
    """Layer x head maps of the OV and static QK cosines, with the baselines in the panel titles."""
    s = c.meta.get("summary") or {}
    L, H = c.matrix("ov_cos").shape
    fig = new_figure(min(max(11.0, 5 + 0.6 * H), 18), min(max(3.8, 1.8 + 0.2 * L), 14))
    for ax, circ, what in zip(fig.subplots(1, 2), ("ov", "qk"), ("W_OV", "W_QK (static, relative position 0)")):
        b = s.get(circ) or {}
        base = "; ".join(
            x
            for x in (
                f"other heads {b['null_mean']:.3f}" if "null_mean" in b else "",
                f"random model {b['random_mean']:+.3f}" if "random_mean" in b else "",
            )
            if x
        )
        _cos_heat(
            ax,
            fig,
            c.matrix(f"{circ}_cos"),
            f"{what}: mean {b.get('mean', float('nan')):.3f}" + (f"\nbaselines (mean cos): {base}" if base else ""),
        )
    fig.suptitle(f"Circuit similarity per head: {c.label}", fontsize=10)
    return fig


def circuit_pairs(c: Circuits) -> Figure:
    """Per rotary frequency pair: median (line) and interquartile band over heads of the QK cosine of the pair's own
    form, static and averaged over relative rotation."""
    fig = new_figure(6.5, 3.8)
    ax = fig.subplots()
    for i, (key, lab) in enumerate(
        (("qk_pair_cos", "static (relative position 0)"), ("qk_pair_cos_pos_avg", "averaged over relative rotation"))
    ):
        x = c.matrix(key).reshape(-1, c.matrix(key).shape[-1])
        x = x[np.isfinite(x).all(1)]
        if not x.size:
            continue
        q = np.quantile(x, [0.25, 0.5, 0.75], axis=0)
        ax.plot(np.arange(x.shape[1]), q[1], color=f"C{i}", label=lab)
        ax.fill_between(np.arange(x.shape[1]), q[0], q[2], color=f"C{i}", alpha=0.2, lw=0)
    ax.set_xlabel("rotary pair i (dims i, i + rot/2): low i rotates fast")
    ax.set_ylabel("QK cosine of the pair's form")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="median and IQR over heads", title_fontsize=7)
    ax.set_title(f"QK similarity per rotary frequency pair\n{c.label}", fontsize=10)
    return fig


def circuit_importance_items(c: Circuits) -> list[dict]:
    """The joins with the base model's analyses that have an importance matrix in the npz."""
    return [j for j in c.meta.get("importance") or [] if "error" not in j and j.get("npz_key") in c.data]


def circuit_vs_importance(c: Circuits, item: dict) -> Figure:
    """Circuit cosine against the base model's head importance (one analysis); top-k heads marked; the title gives
    top-k minus rest with its bootstrap CI."""
    imp = c.matrix(item["npz_key"]).ravel()
    fig = new_figure(10, 3.9)
    for ax, col in zip(fig.subplots(1, 2), ("ov_cos", "qk_cos")):
        cos = c.matrix(col).ravel()
        ok = np.isfinite(imp) & np.isfinite(cos)
        j = item.get(col) or {}
        k = int(j.get("top_k", 0))
        top = np.zeros(ok.sum(), dtype=bool)
        top[np.argsort(-imp[ok], kind="stable")[:k]] = True
        ax.scatter(imp[ok][~top], cos[ok][~top], s=10, alpha=0.6, color="C0", label="other heads")
        ax.scatter(imp[ok][top], cos[ok][top], s=22, color="C3", label=f"top-{k} by importance")
        ax.set_xlabel(f"importance: {item.get('what', '')}")
        ax.set_ylabel(col.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        if "diff" in j:
            ax.set_title(
                f"top − rest {j['diff']:+.4f} [{j['ci_low']:+.4f}, {j['ci_high']:+.4f}] 95% CI; "
                f"Spearman {j['spearman']['estimate']:+.2f}; n={int(ok.sum())} heads",
                fontsize=8,
            )
    fig.suptitle(
        f"Is importance preserved? {c.label}\n{item['stage']} · {item['dataset']} · {item['name']}", fontsize=10
    )
    return fig


def circuit_figures(
    results_dir: str | Path, model: str | None, only: Sequence[str] | None = None
) -> Iterator[tuple[str, Figure]]:
    """Every circuits output whose base model is `model`: heatmaps, rotary pairs, similarity vs importance."""
    slug = model_dir(results_dir, model).name
    for name in results.circuit_names(results_dir):
        c = _read(load_circuits, results_dir, None, None, name)
        if c is None or results.model_slug(c.base) != slug:
            continue
        yield f"circuits_{name}_heatmaps", circuit_heatmaps(c)
        yield f"circuits_{name}_rotary_pairs", circuit_pairs(c)
        for i, item in enumerate(circuit_importance_items(c)):
            if not only or item["dataset"] in only:
                yield f"circuits_{name}_importance_{i}", circuit_vs_importance(c, item)


FAMILIES["circuits"] = circuit_figures


if __name__ == "__main__":  # last: `python -m` runs main only once every family (circuits too) is registered
    cli.entry("plots", main)
