"""Stage: CMA-ES search (pycma ask/tell) for the set of query heads to keep under a budget that best preserves the
model on code.

`python -m btp.cmaes_search --source reference --num-samples 32 --budget 0.5 --max-generations 30` writes
`results/<model-slug>/<dataset>/cmaes/<stem>.jsonl`, one record per generation (best/median/worst fitness, sigma,
the best mask so far and its held-out fitness with a CI over problems, evaluations used, wall time), and at the end
`<stem>.json` (the final mask, the controls, provenance). The optimizer state (pycma's pickled strategy, its
random state and the cache of evaluated masks) is saved atomically after every generation in
`<stem>.partial.pkl`, so a killed run, or a rerun with more `--max-generations`, continues exactly as an
uninterrupted run would (same seed: same masks, same numbers).

Search space: one coordinate per query head. Encodings: `fixed` keeps exactly the budget, the largest coordinates
(the `--min-heads-per-layer` largest of each layer first); `threshold` keeps the heads whose coordinate is > 0 (the
largest of a layer added up to the minimum) and adds `--size-penalty` nats per kept head over the budget.
Warm start: the mean starts at the rank of each head's Taylor importance (first iteration) or single-head ablation
delta (averaged over the scoring samples only), placed so that the budget's most important heads are > 0, when
such an output exists for the same samples and split; else (or `--warm-start cold`) at zeros.

Fitness: mean over the scoring samples of the mean cross-entropy of their scored tokens with the candidate's
removed heads gated to zero (lower is better), plus the penalty. It is computed by `btp.headsets`: the whole
population in batched passes (one candidate per batch row), every candidate resuming at the lowest layer any
candidate touches, logits only at scored positions, evaluated masks memoised. The split is Taylor's
(`SampleSet.split` with the same --heldout / --split-seed): the best mask of each generation is scored on the
held-out problems, and at the end the final mask is compared there with controls of the same size: random masks
with the same heads per layer (several draws), the Taylor-pruned set and the ablation top-k set where those
outputs exist. Every held-out figure carries a bootstrap CI over problems.

`--fitness pass1` (for GPU runs) replaces the CE by 1 - pass@1 of real generation (lower is better): each candidate
goes through btp.pruned's own path (`btp.pruning`: a checkpoint by weight surgery, btp.generate with btp.pruned's
generation flags, btp.evaluate in the sandbox) on the first `--dev-problems` problems of the dataset; held-out
figures and controls are pass@1 on the `--heldout-problems` problems after them, with CIs over problems. A
candidate's generations are kept under `cmaes/<stem>.pass1/<key>/` (key: its heads and every setting that changes
what is generated), so a mask seen before, in this run or a killed one, is not generated again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from . import cli, results
from .cli import opt
from .pruning import GenFlags, Runner
from .stats import clustered_mean

STAGE = "cmaes"
ENCODINGS = ("fixed", "threshold")
WARM_STARTS = ("auto", "taylor", "ablation", "cold")
FITNESSES = ("ce", "pass1")
Head = tuple[int, int]


def _budget_arg(v: str | float | int) -> float | int:
    """`0.5` (a fraction of all query heads) or `64` (a number of heads) to keep."""
    s = str(v)
    try:
        x = float(s)
    except ValueError:
        raise ValueError(f"--budget must be a fraction (0.5) or a count (64), got {v!r}") from None
    if "." in s or "e" in s.lower():
        if not 0 < x <= 1:
            raise ValueError(f"--budget fraction must be in (0, 1], got {v}")
        return x
    if x < 1:
        raise ValueError(f"--budget count must be >= 1, got {v}")
    return int(x)


@dataclass
class SearchConfig:
    budget: float | int = opt(
        0.5, "heads to keep: a fraction of all query heads (0.5) or a count (64)", parse=_budget_arg
    )
    encoding: str = opt(
        "fixed",
        "fixed: keep exactly the budget, the largest coordinates; threshold: keep "
        "coordinates > 0, --size-penalty per kept head over the budget",
        choices=ENCODINGS,
    )
    size_penalty: float = opt(
        0.05, "threshold encoding: nats added to the fitness per kept head over the budget", check=cli.at_least(0)
    )
    min_heads_per_layer: int = opt(1, "never keep fewer heads in a layer", check=cli.at_least(0))
    warm_start: str = opt(
        "auto",
        "mean of the first generation: auto (Taylor importance, else the ablation matrix, "
        "for the same samples and split, else zeros), taylor, ablation, or cold (zeros)",
        choices=WARM_STARTS,
    )
    popsize: int | None = opt(
        None, "candidates per generation (default: pycma's 4 + 3 ln(heads))", check=cli.at_least(2)
    )
    sigma0: float = opt(0.5, "initial step size (a warm start spans about [-1, 1])", check=cli.above(0))
    max_generations: int = opt(20, "generations to run (a rerun with more continues the file)", check=cli.at_least(1))
    max_evals: int | None = opt(
        None, "stop once this many candidates were evaluated (cache hits count)", check=cli.at_least(1)
    )
    fitness: str = opt(
        "ce",
        "ce: mean CE of the scored tokens with the removed heads gated; pass1: 1 - pass@1 of real generation on "
        "the first --dev-problems problems, through btp.pruned's path (GPU runs)",
        choices=FITNESSES,
    )
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        self.budget = _budget_arg(self.budget)
        if self.encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, got {self.encoding!r}")
        if self.fitness not in FITNESSES:
            raise ValueError(f"fitness must be one of {FITNESSES}, got {self.fitness!r}")
        if self.warm_start not in WARM_STARTS:
            raise ValueError(f"warm_start must be one of {WARM_STARTS}, got {self.warm_start!r}")
        if self.popsize is not None and self.popsize < 2:
            raise ValueError("popsize must be >= 2")
        if self.sigma0 <= 0 or self.size_penalty < 0:
            raise ValueError("need sigma0 > 0 and size_penalty >= 0")
        if self.max_generations < 1 or (self.max_evals is not None and self.max_evals < 1):
            raise ValueError("max_generations and max_evals must be >= 1")
        if self.min_heads_per_layer < 0:
            raise ValueError("min_heads_per_layer must be >= 0")

    def n_keep(self, n_total: int) -> int:
        return self.budget if isinstance(self.budget, int) else max(1, round(self.budget * n_total))

    @property
    def numbers(self) -> dict:
        """The settings that change what a generation computes (max_generations/max_evals say how far to go; the
        default CE fitness is left out, so that outputs written before pass1 existed keep their identity)."""
        skip = ("max_generations", "max_evals", "progress") + (("fitness",) if self.fitness == "ce" else ())
        return {k: v for k, v in asdict(self).items() if k not in skip}


# ---------------------------------------------------------------- search space and encodings


@dataclass(frozen=True)
class Space:
    """One coordinate per existing query head, in (layer, head) order; masks are [L, Hmax] bool (padding False)."""

    layer_num_heads: tuple[int, ...]

    @property
    def heads(self) -> list[Head]:
        return [(l, h) for l, n in enumerate(self.layer_num_heads) for h in range(n)]

    @property
    def n(self) -> int:
        return sum(self.layer_num_heads)

    @property
    def layer(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.layer_num_heads)), self.layer_num_heads)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.layer_num_heads), max(self.layer_num_heads)

    def masks(self, keep: np.ndarray) -> np.ndarray:
        """[N, n] bool over coordinates -> [N, L, Hmax] keep-masks."""
        keep = np.atleast_2d(keep)
        out = np.zeros((len(keep), *self.shape), dtype=bool)
        ls, hs = np.array(self.heads).T
        out[:, ls, hs] = keep
        return out

    def coords(self, mask: np.ndarray) -> np.ndarray:
        """[L, Hmax] keep-mask -> [n] bool."""
        ls, hs = np.array(self.heads).T
        return np.asarray(mask, dtype=bool)[ls, hs]

    def check(self, k: int, min_per_layer: int) -> None:
        floor = sum(min(min_per_layer, n) for n in self.layer_num_heads)
        if not floor <= k <= self.n:
            raise ValueError(
                f"budget of {k} heads must lie in [{floor}, {self.n}] (min {min_per_layer} per layer, {self.n} heads)"
            )


def _layer_floor(x: np.ndarray, keep: np.ndarray, layer: np.ndarray, m: int) -> np.ndarray:
    """Add the largest coordinates of each layer holding fewer than m kept heads (ties: lower head)."""
    for l in np.unique(layer):
        idx = np.nonzero(layer == l)[0]
        short = min(m, len(idx)) - int(keep[idx].sum())
        if short > 0:
            cand = idx[~keep[idx]]
            keep[cand[np.argsort(-x[cand], kind="stable")[:short]]] = True
    return keep


def decode_fixed(x: np.ndarray, space: Space, k: int, min_per_layer: int) -> np.ndarray:
    """Keep exactly k heads: the `min_per_layer` largest coordinates of each layer, then the largest of the rest."""
    x = np.asarray(x, dtype=np.float64)
    keep = _layer_floor(x, np.zeros(space.n, dtype=bool), space.layer, min_per_layer)
    rest = np.argsort(-x, kind="stable")
    rest = rest[~keep[rest]][: max(0, k - int(keep.sum()))]
    keep[rest] = True
    return keep


def decode_threshold(x: np.ndarray, space: Space, min_per_layer: int) -> np.ndarray:
    """Keep the heads whose coordinate is > 0, the largest of a layer added up to `min_per_layer`."""
    x = np.asarray(x, dtype=np.float64)
    return _layer_floor(x, x > 0, space.layer, min_per_layer)


def warm_mean(scores: np.ndarray, space: Space, k: int) -> np.ndarray:
    """A search mean from per-head scores (higher = more important, [L, Hmax]): the rank of each head, scaled so
    that the k highest are > 0 and the rest < 0 (about [-1, 1]); ranks, not values, so heavy tails do not
    dominate. Ties in (layer, head) order."""
    s = np.asarray(scores, dtype=np.float64)[tuple(np.array(space.heads).T)]
    if not np.isfinite(s).all():
        raise ValueError("warm start scores must be finite for every head")
    rank = np.empty(space.n)
    rank[np.argsort(s, kind="stable")] = np.arange(space.n)
    return (rank - (space.n - k) + 0.5) / (space.n / 2)


# ---------------------------------------------------------------- the search


class Fitness(Protocol):
    """Per-sample loss of keep-masks: [N, L, Hmax] bool -> [N, S] float64 (lower is better). Optional
    `state_dict`/`load_state_dict` for a cache that a resumed search restores."""

    def __call__(self, masks: np.ndarray) -> np.ndarray: ...


class ModelFitness:
    """The model's per-sample mean CE over scored tokens with the removed heads of each mask gated to zero,
    through `btp.headsets.SetLossCache` (the population in batched passes from a common start layer, one
    candidate per row, masks seen before not rerun)."""

    def __init__(
        self,
        model: Any,
        sample_set: Any,
        *,
        batch_rows: int | None = None,
        cache: bool = True,
        progress: bool = False,
        desc: str = "population",
    ):
        from .arch import adapter
        from .headsets import SetLossCache, set_losses

        self.ad, self.progress, self.desc = adapter(model), progress, desc
        from dataclasses import replace

        # causal: the tokens after the last scored one cannot change a scored logit, so they are not computed
        # (a generation's prose after its code; float noise only, hence here and not in every stage's engine)
        sample_set = replace(
            sample_set, samples=[replace(s, input_ids=s.input_ids[: s.score_end]) for s in sample_set.samples]
        )
        # no base CE: a population at layer 0 (every budget that leaves each layer short of a head) then needs no
        # base pass at all
        kw = {"batch_rows": batch_rows, "common_start": True, "need_base": False}
        self.cache = SetLossCache(model, sample_set, **kw) if cache else None
        self._plain = lambda sets: set_losses(model, sample_set, sets, progress=progress, desc=desc, **kw)

    def __call__(self, masks: np.ndarray) -> np.ndarray:
        from .headsets import removed_sets

        sets = removed_sets(self.ad, masks)
        res = self.cache(sets, progress=self.progress, desc=self.desc) if self.cache is not None else self._plain(sets)
        return res.ce

    def state_dict(self) -> dict:
        return self.cache.state_dict() if self.cache is not None else {}

    def load_state_dict(self, st: dict) -> None:
        if self.cache is not None and st:
            self.cache.load_state_dict(st)


class Pass1Fitness:
    """Per problem, 1 - pass@1 (lower is better) of real generation with each mask's removed heads, exactly as
    btp.pruned runs an arm (`btp.pruning`): the checkpoint by weight surgery in the run's dtype, btp.generate on the
    first `limit` problems of the dataset, btp.evaluate in the sandbox; `problems` (among those) are scored. A
    mask's files live in `work/<key>/` (key: its heads and `setting`, everything else that changes what is
    generated), so a mask seen before is not generated again, and the held-out problems of a mask extend its dev
    generations; evaluated masks are also memoised in memory (`state_dict` for a resumed search)."""

    def __init__(
        self,
        lm: Any,
        problems: Sequence[str],
        *,
        limit: int,
        gen: GenFlags,
        setting: dict,
        work: Path,
        results_dir: str,
        runner: Runner,
        n_boot: int,
        keep_checkpoints: bool = False,
    ):
        from dataclasses import replace

        self.lm, self.problems, self.work, self.runner = lm, list(problems), Path(work), runner
        self.gen, self.setting, self.results_dir = replace(gen, limit=limit), setting, results_dir
        self.n_boot, self.keep_checkpoints = n_boot, keep_checkpoints
        self.memo: dict[frozenset, np.ndarray] = {}
        self.hits = self.misses = 0

    @property
    def cache(self) -> Pass1Fitness:  # Search reads `fitness.cache.misses`
        return self

    def dir(self, heads: Sequence[Head]) -> Path:
        return self.work / results.identity_key({"heads": sorted([int(l), int(h)] for l, h in heads), **self.setting})

    def __call__(self, masks: np.ndarray) -> np.ndarray:
        from .arch import adapter
        from .headsets import removed_sets

        sets = removed_sets(adapter(self.lm.model), masks)
        out = np.empty((len(sets), len(self.problems)))
        for i, heads in enumerate(sets):
            key = frozenset(heads)
            if key in self.memo:
                self.hits += 1
            else:
                self.misses += 1
                self.memo[key] = self.judge(heads)
            out[i] = self.memo[key]
        return out

    def judge(self, heads: Sequence[Head]) -> np.ndarray:
        """1 - pass@1 per problem of this head set (generated and judged unless its folder holds every verdict)."""
        import shutil

        from .pruning import arm_counts, ensure_checkpoint
        from .stats import pass_at_k

        d = self.dir(heads)
        f = results.arm_files(d)
        n, c = arm_counts(f["evaluations"], self.problems)
        if (n < self.gen.n).any():
            s = self.setting
            ck = ensure_checkpoint(
                self.lm,
                heads,
                self.results_dir,
                s["dtype"],
                {"arm": "cmaes candidate", "heads": [list(h) for h in heads]},
            )
            d.mkdir(parents=True, exist_ok=True)
            self.runner.generate(
                self.gen.generate_args(str(ck), s["dataset"], f["generations"], s["seed"], s["dtype"], s["backend"])
            )
            self.runner.evaluate(
                self.gen.evaluate_args(f"cmaes-{d.name[:12]}", s["dataset"], f["generations"], s["seed"], self.n_boot)
            )
            if not self.keep_checkpoints:
                shutil.rmtree(ck, ignore_errors=True)
            n, c = arm_counts(f["evaluations"], self.problems)
            if (n < self.gen.n).any():
                raise RuntimeError(f"{f['evaluations']}: fewer than {self.gen.n} verdicts for some problems")
        return 1.0 - pass_at_k(n, c, 1)

    def state_dict(self) -> dict:
        return {
            "sets": [sorted(k) for k in self.memo],
            "f": list(self.memo.values()),
            "hits": self.hits,
            "misses": self.misses,
        }

    def load_state_dict(self, st: dict) -> None:
        self.memo = {frozenset(tuple(h) for h in k): np.asarray(v) for k, v in zip(st["sets"], st["f"])}
        self.hits, self.misses = int(st["hits"]), int(st["misses"])


@dataclass
class Best:
    fitness: float
    ce: float
    keep: np.ndarray  # [n] bool over coordinates
    generation: int
    heldout: np.ndarray | None = None  # per held-out sample CE


def _rows(mask: np.ndarray, layer_num_heads: Sequence[int]) -> list[str]:
    """A keep-mask as one string per layer: `1` kept, `0` removed, `-` padding (`results.mask_from_rows`)."""
    return [
        "".join("1" if mask[l, h] else "0" for h in range(n)) + "-" * (mask.shape[1] - n)
        for l, n in enumerate(layer_num_heads)
    ]


def _ci(values: np.ndarray, problems: Sequence[str], n_boot: int, seed: int) -> dict:
    m = clustered_mean(np.asarray(values, dtype=np.float64), problems, n_boot, seed)  # problems weigh alike
    return {"mean": float(m.mean), "ci_low": float(m.low), "ci_high": float(m.high)}


class Search:
    """pycma ask/tell over head coordinates. `step()` runs one generation and returns its record; `state()` is
    everything a resumed search needs (pycma's strategy, its numpy random state, the best so far, the fitness
    cache); `Search(..., state=...)` continues from it exactly."""

    def __init__(
        self,
        space: Space,
        cfg: SearchConfig,
        fitness: Fitness,
        *,
        x0: np.ndarray | None = None,
        heldout: Fitness | None = None,
        heldout_problems: Sequence[str] = (),
        n_boot: int = 1000,
        state: dict | None = None,
    ):
        import cma

        self.space, self.cfg, self.fitness, self.heldout = space, cfg, fitness, heldout
        self.heldout_problems, self.n_boot = list(heldout_problems), n_boot
        self.k = cfg.n_keep(space.n)
        space.check(self.k, cfg.min_heads_per_layer)
        if state is not None:
            self.es, self.rng = state["es"], state["rng"]
            self.generation, self.elapsed, self.best = state["generation"], state["elapsed"], state["best"]
            if hasattr(fitness, "load_state_dict"):
                fitness.load_state_dict(state["fitness_cache"])
            return
        x0 = np.zeros(space.n) if x0 is None else np.asarray(x0, dtype=np.float64)
        # pycma samples through `randn`; by default numpy's global generator, whose bound method a pickle would
        # copy by value (a resumed search would then draw from a stale copy). Our own generator instead: it is
        # pickled with the strategy and nothing else draws from it. pycma's seed option is not used (nan).
        rs = np.random.RandomState(cfg.seed)
        opts: dict[str, Any] = {"seed": np.nan, "randn": rs.randn, "verbose": -9}
        if cfg.popsize:
            opts["popsize"] = cfg.popsize
        self.rng = np.random.RandomState(cfg.seed + 1).get_state()
        self.es = self._isolated(lambda: cma.CMAEvolutionStrategy(x0, cfg.sigma0, opts))
        self.generation, self.elapsed, self.best = 0, 0.0, None

    def _isolated(self, fn: Callable[[], Any]) -> Any:
        """Any other draw pycma makes from numpy's global generator comes from a saved state of its own; the
        caller's global state is left as it was."""
        outer = np.random.get_state()
        np.random.set_state(self.rng)
        try:
            return fn()
        finally:
            self.rng = np.random.get_state()
            np.random.set_state(outer)

    def state(self) -> dict:
        return {
            "es": self.es,
            "rng": self.rng,
            "generation": self.generation,
            "elapsed": self.elapsed,
            "best": self.best,
            "fitness_cache": getattr(self.fitness, "state_dict", dict)(),
        }

    def decode(self, x: np.ndarray) -> np.ndarray:
        c = self.cfg
        if c.encoding == "fixed":
            return decode_fixed(x, self.space, self.k, c.min_heads_per_layer)
        return decode_threshold(x, self.space, c.min_heads_per_layer)

    def penalty(self, keep: np.ndarray) -> np.ndarray:
        over = np.clip(np.atleast_2d(keep).sum(1) - self.k, 0, None)
        return self.cfg.size_penalty * over if self.cfg.encoding == "threshold" else np.zeros(len(over))

    def cma_stop(self) -> str | None:
        """pycma's own stopping rules that fired (`cma:<rule>,...`), None while it goes on."""
        rules = self.es.stop() if self.generation else {}
        return "cma:" + ",".join(sorted(rules)) if rules else None

    def stop_reason(self) -> str | None:
        """pycma's rules, then ours (max_evals, max_generations); None to go on."""
        if (cma_rule := self.cma_stop()) is not None:
            return cma_rule
        if self.cfg.max_evals is not None and self.es.countevals >= self.cfg.max_evals:
            return "max_evals"
        if self.generation >= self.cfg.max_generations:
            return "max_generations"
        return None

    def step(self) -> dict:
        t0 = time.perf_counter()
        X = self._isolated(self.es.ask)
        keep = np.stack([self.decode(x) for x in X])
        ce = np.asarray(self.fitness(self.space.masks(keep)), dtype=np.float64)  # [N, S]
        f = ce.mean(1) + self.penalty(keep)
        self._isolated(lambda: self.es.tell(X, f.tolist()))
        self.generation += 1
        b = int(np.argmin(f))
        gen_best = Best(float(f[b]), float(ce[b].mean()), keep[b].copy(), self.generation)
        if self.heldout is not None:
            gen_best.heldout = np.asarray(self.heldout(self.space.masks(keep[b])), dtype=np.float64)[0]
        if self.best is None or gen_best.fitness < self.best.fitness:
            self.best = gen_best
        self.elapsed += time.perf_counter() - t0
        return self.record(f, ce, gen_best, time.perf_counter() - t0)

    def record(self, f: np.ndarray, ce: np.ndarray, gen_best: Best, secs: float) -> dict:
        sp, bb = self.space, self.best
        hold = lambda b: (
            _ci(b.heldout, self.heldout_problems, self.n_boot, self.cfg.seed) if b.heldout is not None else None
        )
        mask = sp.masks(bb.keep)[0]
        return {
            "generation": self.generation,
            "best_fitness": float(f.min()),
            "median_fitness": float(np.median(f)),
            "worst_fitness": float(f.max()),
            "best_ce": gen_best.ce,
            "best_n_kept": int(gen_best.keep.sum()),
            "best_heldout": hold(gen_best),
            "sigma": float(self.es.sigma),
            "best_so_far_fitness": bb.fitness,
            "best_so_far_ce": bb.ce,
            "best_so_far_generation": bb.generation,
            "best_so_far_n_kept": int(bb.keep.sum()),
            "best_so_far_mask": _rows(mask, sp.layer_num_heads),
            "best_so_far_heldout": hold(bb),
            "popsize": int(len(f)),
            "evals": int(self.es.countevals),
            "evals_computed": int(getattr(getattr(self.fitness, "cache", None), "misses", self.es.countevals)),
            # pycma's rules only: the limits of this invocation are not part of the history (a resumed run with
            # more generations writes the same records as an uninterrupted one)
            "stop_reason": self.cma_stop(),
            "cma_stop": {k: _plain(v) for k, v in self.es.stop().items()},
            "budget": self.k,
            "time_s": round(secs, 3),
            "elapsed_s": round(self.elapsed, 3),
        }


def _plain(v: Any) -> Any:
    """pycma's stop values as JSON."""
    if isinstance(v, (np.generic, np.ndarray)):
        return np.asarray(v).tolist()
    return v if isinstance(v, (int, float, str, bool, type(None), list, dict)) else str(v)


def run_search(
    search: Search, *, on_generation: Callable[[dict, dict], None] | None = None, progress: bool = False
) -> list[dict]:
    """Generations until a stop rule fires; `on_generation(record, state)` after each (save, then append)."""
    from tqdm import tqdm

    recs = []
    with tqdm(
        total=search.cfg.max_generations,
        initial=search.generation,
        desc="CMA-ES",
        unit="gen",
        disable=not progress,
        dynamic_ncols=True,
    ) as bar:
        while search.stop_reason() is None:
            rec = search.step()
            recs.append(rec)
            if on_generation is not None:
                on_generation(rec, search.state())
            bar.update(1)
            bar.set_postfix_str(f"best {rec['best_so_far_fitness']:.4f} sigma {rec['sigma']:.3f}")
    return recs


# ---------------------------------------------------------------- warm start and controls (other stages' files)


@dataclass
class Prior:
    """Per-head scores from another stage's output for the same samples: higher = more important."""

    source: str  # e.g. `taylor/regular-reference.jsonl`
    values: np.ndarray  # [L, Hmax] per-head scores, NaN at padding
    detail: dict = field(default_factory=dict)

    @property
    def tag(self) -> dict:
        import hashlib

        h = hashlib.sha1(np.nan_to_num(self.values, nan=-1e300).tobytes()).hexdigest()[:16]
        return {"source": self.source, "scores": h, **self.detail}


def _ids(ss: Any) -> list[list]:
    return [[s.problem_id, int(s.sample)] for s in ss.samples]


def taylor_prior(
    results_dir: str, model_id: str, dataset: str, stem: results.Stem, tokens: str, scoring: Any, heldout: Any
) -> tuple[Prior, list[Head]] | None:
    """Taylor's first-iteration importance (all heads alive, scoring samples only) and its pruning order, from a
    Taylor output of these samples (same tokens) and this split; the default variant first."""
    d = results.stage_dir(results_dir, model_id, dataset, "taylor")
    names = [n for n in results.list_outputs(d, "taylor") if results.parse_stem(n).base == stem.base]
    for name in sorted(names, key=lambda n: (results.parse_stem(n).variant != (), n)):
        recs, meta = results.read_taylor(d, name)
        if not recs or (meta.get("identity") or {}).get("tokens") != tokens:
            continue
        if recs[0].get("scoring_samples") != _ids(scoring) or recs[0].get("heldout_samples") != _ids(heldout):
            continue
        order = [tuple(h) for r in recs for h in r["pruned"]]
        return Prior(
            f"taylor/{name}.jsonl", results.importance_matrix(recs[0]), {"settings": recs[0].get("settings")}
        ), order
    return None


def ablation_prior(
    results_dir: str, model_id: str, dataset: str, stem: results.Stem, tokens: str, scoring: Any
) -> Prior | None:
    """The single-head ablation delta averaged over the scoring samples only (no held-out information), from an
    ablation output of these samples with every layer computed; zero ablation (as the fitness) before mean."""
    d = results.stage_dir(results_dir, model_id, dataset, "ablation")
    names = [
        n
        for n in results.list_outputs(d, "ablation")
        if results.parse_stem(n).base == stem.base and set(results.parse_stem(n).variant) <= {"mean"}
    ]
    for name in sorted(names, key=lambda n: ("mean" in results.parse_stem(n).variant, n)):
        arrays, meta = results.read_analysis(d, name)
        if (meta.get("identity") or {}).get("tokens") != tokens:
            continue
        pairs = list(zip(arrays["sample_problem_id"].tolist(), arrays["sample_number"].tolist()))
        where = {(str(p), int(s)): i for i, (p, s) in enumerate(pairs)}
        rows = [where.get((s.problem_id, int(s.sample))) for s in scoring.samples]
        if None in rows:
            continue
        delta = np.asarray(arrays["delta"], dtype=np.float64)[rows].mean(0)
        n_heads = np.asarray(arrays["layer_num_heads"])
        exists = np.arange(delta.shape[1])[None, :] < n_heads[:, None]
        if not np.isfinite(delta[exists]).all():
            continue
        return Prior(f"ablation/{name}.npz", np.where(exists, delta, np.nan), {"ablation": meta.get("ablation")})
    return None


def random_controls(keep: np.ndarray, space: Space, draws: int, seed: int) -> list[np.ndarray]:
    """Random keep-sets with the same number of kept heads in every layer as `keep` ([n] bool)."""
    rng = np.random.default_rng([seed, 14])
    out = []
    for _ in range(draws):
        k = np.zeros(space.n, dtype=bool)
        for l in range(len(space.layer_num_heads)):
            idx = np.nonzero(space.layer == l)[0]
            k[rng.choice(idx, int(keep[idx].sum()), replace=False)] = True
        out.append(k)
    return out


def compare_controls(
    final: np.ndarray,
    space: Space,
    heldout: Fitness,
    scoring: Fitness,
    problems: Sequence[str],
    *,
    draws: int,
    seed: int,
    min_per_layer: int,
    n_boot: int,
    taylor_order: Sequence[Head] | None = None,
    ablation: Prior | None = None,
) -> dict:
    """Held-out (and scoring) loss of the final keep-set against controls of the same size, each with a CI over
    problems and its paired difference to the final set (control - CMA-ES, CI over problems)."""
    n_kept = int(final.sum())
    sets: dict[str, np.ndarray] = {"cmaes": final, "unpruned": np.ones(space.n, dtype=bool)}
    notes: dict[str, str] = {}
    for i, k in enumerate(random_controls(final, space, draws, seed)):
        sets[f"random_{i}"] = k
    if taylor_order is not None:
        need = space.n - n_kept
        if len(taylor_order) >= need:
            k = np.ones(space.n, dtype=bool)
            pos = {h: i for i, h in enumerate(space.heads)}
            k[[pos[tuple(h)] for h in taylor_order[:need]]] = False
            sets["taylor"] = k
        else:
            notes["taylor"] = f"the Taylor history pruned {len(taylor_order)} heads, fewer than the {need} needed"
    if ablation is not None:
        sets["ablation_topk"] = decode_fixed(warm_mean(ablation.values, space, n_kept), space, n_kept, min_per_layer)
    names = list(sets)
    masks = space.masks(np.stack([sets[n] for n in names]))
    h, s = np.asarray(heldout(masks)), np.asarray(scoring(masks))
    out: dict = {"n_kept": n_kept, "notes": notes, "sets": {}}
    for i, n in enumerate(names):
        rec = {
            "n_kept": int(sets[n].sum()),
            "removed": [list(space.heads[j]) for j in np.nonzero(~sets[n])[0]],
            "scoring_ce": float(s[i].mean()),
            "heldout": _ci(h[i], problems, n_boot, seed),
            "heldout_per_sample": h[i].tolist(),
        }
        if n != "cmaes":
            rec["diff_vs_cmaes"] = _ci(h[i] - h[0], problems, n_boot, seed)
        out["sets"][n] = rec
    if draws:
        r = np.stack([h[names.index(f"random_{i}")] for i in range(draws)]).mean(0)
        out["sets"]["random"] = {
            "n_kept": n_kept,
            "draws": draws,
            "heldout": _ci(r, problems, n_boot, seed),
            "scoring_ce": float(np.mean([out["sets"][f"random_{i}"]["scoring_ce"] for i in range(draws)])),
            "diff_vs_cmaes": _ci(r - h[0], problems, n_boot, seed),
        }
    return out


# ---------------------------------------------------------------- CLI


@dataclass
class RunConfig:
    """The stage's options besides the search: the split (Taylor's), controls, memory, the output tag."""

    heldout: float | int = opt(
        0.25,
        "held-out problems: a fraction (0.25) or a count (8), as btp.taylor",
        parse=lambda v: cli.parse_heldout(str(v)),
    )
    split_seed: int | None = opt(None, "seed of the scoring/held-out split (default --seed, as btp.taylor)")
    control_draws: int = opt(5, "random control masks (same heads per layer as the final mask)", check=cli.at_least(0))
    n_boot: int = opt(1000, "bootstrap resamples over problems for CIs", check=cli.at_least(1))
    batch_rows: int | None = opt(None, "candidates per batched pass (default: from free memory)", check=cli.at_least(1))
    tag: str | None = opt(None, "suffix of the output stem (keeps variants apart)")
    dev_problems: int = opt(
        8, "--fitness pass1: the first N problems of the dataset are the dev subset", check=cli.at_least(1)
    )
    heldout_problems: int = opt(
        8,
        "--fitness pass1: the N problems after the dev subset are held out (each generation's best, controls)",
        check=cli.at_least(1),
    )
    keep_checkpoints: bool = opt(False, "--fitness pass1: keep each candidate's pruned checkpoint")


# --fitness pass1 generates with btp.pruned's flags (btp.pruning.GenFlags). Its generation length is
# --gen-max-tokens here: --max-tokens was this stage's sample cap (now --sample-max-tokens) and stays refused with
# that hint, so an old command line never silently sets the generation length. The problems are --dev-problems /
# --heldout-problems, not --limit.
GEN_RENAME = {"gen_max_tokens": "gen-max-tokens"}


def _gen_flags(p) -> None:
    cli.add_flags(p, GenFlags, skip=("limit",), rename=GEN_RENAME)


SPEC = cli.StageSpec(
    STAGE,
    "CMA-ES search for the heads to keep under a budget (pycma)",
    configs=(SearchConfig, RunConfig),
    device_map=True,
    module="cmaes_search",
    no_shard="a CMA-ES search is one sequential run (each generation samples from the last one's fitness) and "
    "its controls need its final mask; run budgets, datasets and modes as separate jobs",
    more_flags=_gen_flags,
)


def build_parser():
    return cli.stage_parser(SPEC)


def output_stem(stem: results.Stem, cfg: SearchConfig, tag: str | None) -> results.Stem:
    """The samples' stem plus the budget (`keep50pct`, `keep64`), `threshold` for that encoding, `cold` for a
    cold start, `pass1` for that fitness, and the tag."""
    b = cfg.budget
    words = [
        f"keep{round(100 * b)}pct" if isinstance(b, float) else f"keep{b}",
        "threshold" if cfg.encoding == "threshold" else None,
        "cold" if cfg.warm_start == "cold" else None,
        "pass1" if cfg.fitness == "pass1" else None,
        tag,
    ]
    return stem.with_variant(*words)


def _priors(
    run: cli.Run, cfg: SearchConfig, scoring: Any, heldout: Any
) -> tuple[Prior | None, tuple[Prior, list[Head]] | None, Prior | None]:
    a = run.args
    tokens = results.sample_identity(run.samples.fields())["tokens"]
    stem = run.sample_config.output_stem
    tay = taylor_prior(a.results_dir, run.ref.model_id, a.dataset, stem, tokens, scoring, heldout)
    abl = ablation_prior(a.results_dir, run.ref.model_id, a.dataset, stem, tokens, scoring)
    want = {"auto": [tay[0] if tay else None, abl], "taylor": [tay[0] if tay else None], "ablation": [abl], "cold": []}[
        cfg.warm_start
    ]
    prior = next((p for p in want if p is not None), None)
    if prior is None and cfg.warm_start in ("taylor", "ablation"):
        run.parser.error(
            f"--warm-start {cfg.warm_start}: no {cfg.warm_start} output for these samples and split; "
            f"run btp.{cfg.warm_start} first, or use --warm-start auto"
        )
    return prior, tay, abl


def _pass1_plan(run: cli.Run, opts: RunConfig) -> tuple[GenFlags, dict]:
    """--fitness pass1: the generation flags and what the identity records (problems, flags, engine)."""
    from . import benchmarks

    try:
        gen = cli.config_from(GenFlags, run.args, rename=GEN_RENAME)
    except ValueError as e:
        run.parser.error(str(e))
    n_dev, n_hold = opts.dev_problems, opts.heldout_problems
    if n_dev < 1 or n_hold < 1:
        run.parser.error("--dev-problems and --heldout-problems must be >= 1")
    probs = [q.problem_id for q in benchmarks.get(run.args.dataset).load(limit=n_dev + n_hold, variant=gen.variant)]
    if len(probs) < n_dev + n_hold:
        run.parser.error(
            f"{run.args.dataset} has {len(probs)} problems, fewer than --dev-problems {n_dev} + "
            f"--heldout-problems {n_hold}"
        )
    gen_id = {k: v for k, v in gen.identity.items() if k != "limit"}
    return gen, {"dev": probs[:n_dev], "heldout": probs[n_dev:], "generation": gen_id, "backend": gen.engine}


@cli.each_dataset
def main(argv: Sequence[str] | None = None, runner: Runner | None = None) -> Path:
    """The stage; `runner` runs btp.generate / btp.evaluate for --fitness pass1 (default: subprocesses)."""
    from .store import JsonlStore, write_json

    run = cli.prepare(SPEC, argv)
    cfg, opts, ss = run.config(SearchConfig), run.config(RunConfig), run.samples
    split_seed = run.args.seed if opts.split_seed is None else opts.split_seed
    try:
        scoring, heldout = ss.split(opts.heldout, seed=split_seed)
        out = run.output(output_stem(run.sample_config.output_stem, cfg, opts.tag))
    except ValueError as e:
        run.parser.error(str(e))
    prior, tay, abl = _priors(run, cfg, scoring, heldout)
    gen, pass1 = _pass1_plan(run, opts) if cfg.fitness == "pass1" else (None, None)
    path, json_path, state_path = out.path("jsonl"), out.path("json"), out.partial("pkl")
    # max_generations / max_evals say how far to go, batch_rows only memory: a longer run continues the file
    identity = run.identity(
        scoring_samples=_ids(scoring),
        heldout_samples=_ids(heldout),
        search=cfg.numbers,
        warm_start=prior.tag if prior else None,
        control_draws=opts.control_draws,
        n_boot=opts.n_boot,
        **({"pass1": pass1} if pass1 else {}),
    )
    store = JsonlStore(path, key_fields=("generation",))

    def complete() -> bool:
        doc = results.read_json(json_path)
        g = doc.get("generations", 0)
        return bool(
            str(doc.get("stop_reason", "")).startswith("cma:")
            or g >= cfg.max_generations
            or (cfg.max_evals is not None and doc.get("evals", 0) >= cfg.max_evals)
        )

    claim = run.claim(out, identity, files=("jsonl", "json"), partials=("pkl",), complete=complete, append=True)
    if claim.done:
        doc = results.read_json(json_path)
        print(
            f"[btp.cmaes_search] {json_path}: complete ({doc['generations']} generations, stop: "
            f"{doc['stop_reason']}); use --force or more --max-generations"
        )
        return json_path
    run.has_work()  # before the repairs below touch files
    state = results.read_partial(state_path, claim.key)
    recs = store.read()
    if state is None and (recs or json_path.exists()):
        if claim.state == "resume":
            raise SystemExit(
                f"{path}: no optimizer state ({state_path.name}) to continue from — use --force to start afresh"
            )
        print(f"[btp.cmaes_search] {path}: discarding a partial run of another configuration")
        path.unlink(missing_ok=True)
        json_path.unlink(missing_ok=True)
        recs = []
    if state is not None:
        done = state["generation"]
        if len(recs) == done - 1 and state.get("record"):  # killed between saving the state and appending
            store.append(state["record"])
            recs.append(state["record"])
        if len(recs) != done:
            raise SystemExit(f"{path} holds {len(recs)} generations, its state {done} — use --force to start afresh")
    if pass1:  # weights only for surgery: the accelerator is the generation engine's
        import torch

        run.device = torch.device("cpu")
    lm = run.load()
    from .arch import adapter

    ad = adapter(lm.model)
    space = Space(tuple(ad.layer_num_heads))
    if prior is not None and prior.values.shape != space.shape:
        raise SystemExit(
            f"{prior.source}: scores of shape {prior.values.shape} do not fit the model {space.shape} — "
            "use --warm-start cold, or rerun the stage it comes from with --force"
        )
    dtype_s = str(run.dtype).removeprefix("torch.")
    fit: Fitness
    if pass1:
        from .pruning import SubprocessRunner

        work = out.path("pass1")
        if run.args.force:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
        setting = {
            "model": lm.model_id,
            "revision": lm.revision,
            "dtype": dtype_s,
            "dataset": run.args.dataset,
            "seed": run.args.seed,
            "backend": pass1["backend"],
            "generation": pass1["generation"],
        }
        kw = {
            "gen": gen,
            "setting": setting,
            "work": work,
            "results_dir": run.args.results_dir,
            "runner": runner or SubprocessRunner(),
            "n_boot": opts.n_boot,
            "keep_checkpoints": opts.keep_checkpoints,
        }
        fit = Pass1Fitness(lm, pass1["dev"], limit=len(pass1["dev"]), **kw)
        hold = Pass1Fitness(lm, pass1["heldout"], limit=len(pass1["dev"]) + len(pass1["heldout"]), **kw)
        heldout_ids = pass1["heldout"]
    else:
        fit = ModelFitness(lm.model, scoring, batch_rows=opts.batch_rows, progress=False)
        hold = ModelFitness(lm.model, heldout, batch_rows=opts.batch_rows, cache=False)
        heldout_ids = heldout.problem_ids
    k = cfg.n_keep(space.n)
    x0 = warm_mean(prior.values, space, k) if prior is not None else None
    search = Search(space, cfg, fit, x0=x0, heldout=hold, heldout_problems=heldout_ids, n_boot=opts.n_boot, state=state)
    stamp = run.stamp(
        lm,
        split={
            "seed": split_seed,
            "heldout": opts.heldout,
            "scoring": scoring.problem_ids,
            "heldout_problems": heldout.problem_ids,
        },
        search=asdict(cfg),
        dtype=str(lm.dtype),
        device=str(lm.device),
        **claim.stamp,
    )
    store.begin_run(stamp)
    what = (
        f"pass@1 on {len(pass1['dev'])} dev / {len(pass1['heldout'])} held-out problems ({pass1['backend']})"
        if pass1
        else f"{len(scoring)} scoring / {len(heldout)} held-out samples"
    )
    print(
        f"[btp.cmaes_search] {what}, keep {k} of {space.n} "
        f"heads ({cfg.encoding}), warm start: {prior.source if prior else 'zeros'}"
        + (f"; resuming after generation {search.generation}" if state else "")
        + run.samples.left_out()
    )

    def save(rec: dict, st: dict) -> None:
        results.write_partial(state_path, claim.key, {**st, "record": rec})  # state first: see the resume above
        store.append(rec)

    import subprocess

    try:
        run_search(search, on_generation=save, progress=run.progress)
        final = search.best.keep
        ctl = compare_controls(
            final,
            space,
            hold,
            fit,
            heldout_ids,
            draws=opts.control_draws,
            seed=run.args.seed,
            min_per_layer=cfg.min_heads_per_layer,
            n_boot=opts.n_boot,
            taylor_order=tay[1] if tay else None,
            ablation=abl,
        )
    except subprocess.CalledProcessError as e:  # pass1: generations and verdicts so far are kept
        raise SystemExit(f"{' '.join(map(str, e.cmd[1:4]))} failed (exit {e.returncode}) — rerun to resume") from None
    if tay:
        ctl["taylor_source"] = tay[0].source
    if abl:
        ctl["ablation_source"] = abl.source
    recs = store.read()
    last = recs[-1]
    write_json(
        json_path,
        {
            **stamp,
            "stem": out.name,
            "generations": search.generation,
            "evals": int(search.es.countevals),
            "stop_reason": search.stop_reason(),
            "cma_stop": last["cma_stop"],
            "budget": k,
            "n_heads": space.n,
            "encoding": cfg.encoding,
            "warm_start": prior.tag if prior else None,
            "final": {
                "mask": _rows(space.masks(final)[0], space.layer_num_heads),
                "n_kept": int(final.sum()),
                "kept_per_layer": [int(final[space.layer == l].sum()) for l in range(space.shape[0])],
                "removed": ctl["sets"]["cmaes"]["removed"],
                "fitness": search.best.fitness,
                "scoring_ce": search.best.ce,
                "generation": search.best.generation,
                "heldout": ctl["sets"]["cmaes"]["heldout"],
            },
            "controls": ctl,
            "elapsed_s": round(search.elapsed, 2),
            "fitness_kind": cfg.fitness,
            "fitness": (
                f"1 - pass@1 over the first {len(pass1['dev'])} problems, real generation with the removed heads "
                "zeroed by weight surgery (btp.pruned's path); held-out figures and *_ce keys: 1 - pass@1 on the "
                f"{len(pass1['heldout'])} problems after them"
                if pass1
                else "mean over scoring samples of the mean CE of their scored tokens, removed heads zeroed (nats)"
            )
            + (f" + {cfg.size_penalty} per kept head over the budget" if cfg.encoding == "threshold" else ""),
            **({"pass1": pass1} if pass1 else {}),
        },
    )
    _summary(search, ctl, json_path, "1 - pass@1" if pass1 else "CE")
    return json_path


def _summary(search: Search, ctl: dict, path: Path, metric: str) -> None:
    b = search.best
    print(
        f"[btp.cmaes_search] {search.generation} generations, {search.es.countevals} candidates "
        f"({search.elapsed:.1f}s); best fitness {b.fitness:.4f} at generation {b.generation} -> {path}"
    )
    print(f"  held-out {metric} [95% CI over problems]   set")
    for name, r in ctl["sets"].items():
        if name.startswith("random_"):
            continue
        h = r["heldout"]
        print(
            f"  {h['mean']:.4f} [{h['ci_low']:.4f}, {h['ci_high']:.4f}]   {name}"
            + (f" (mean of {r['draws']} draws)" if "draws" in r else "")
        )
    for n, why in ctl["notes"].items():
        print(f"  {n}: {why}")


if __name__ == "__main__":
    cli.entry("cmaes_search", main)
