"""Stage: iterative first-order Taylor head pruning (Michel, Levy & Neubig 2019, "Are Sixteen Heads Really Better
than One?") for decoder-only (GQA) models, on the scored tokens of code samples.

`python -m btp.taylor --source reference --num-samples 32 --num-iters 9` writes
`results/<model-slug>/<dataset>/taylor/<stem>.jsonl`, one record per iteration, and `<stem>.samples.npz`
(the sample fields, so every number can be recomputed). A killed run resumes after its last complete iteration.

Importance. A gate m (one per query head, at the o_proj input, value 1; pruned heads are gates fixed at 0) and
the loss L_s of a sample (mean CE over its scored tokens). Estimators:
- `gate` (default; the paper's, and what the original code computes: it accumulates each sample's |dL/dm| of a
  head mask, in model dtype): I(l, h) = sum_s |dL_s/dm_lh|;
- `token` (a finer variant, in neither the paper nor its code): I(l, h) = sum_s sum_t |<dL_s/da_t, a_t>| over
  positions t, a_t the head's o_proj-input slice; the signed per-token sum is the gate gradient, so signed scores
  exist for `gate` only;
- `--signed`: I = -sum_s dL_s/dm, the first-order estimate of the loss increase when the head is removed
  (m: 1 -> 0), so that the lowest are still pruned first;
- per-layer L2 normalisation (default, as the paper): divide each layer's scores by their L2 norm over the
  layer's alive heads; `--no-normalize` keeps the raw sums (output name word `nonorm`).
Gradients and sums are fp32 (fp64 for an fp64 model) whatever the model dtype; weights get no gradient.

Iteration i: one forward+backward per scoring sample under the heads pruned so far (this also yields the
scoring loss after iteration i-1's pruning: no separate loss pass), prune the `--prune-per-iter` lowest alive
heads (keeping `--min-heads-per-layer`), one forward per held-out sample (held-out loss after pruning), append
the record. The base held-out loss is computed once. Stops after `--num-iters` or when the held-out loss exceeds
`--stop-factor` x base.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from . import cli
from .arch import Adapter, adapter
from .cli import opt
from .heads import Head, frozen_weights, gates_for, head_gates, o_proj_input_grads
from .headsets import keep_mask
from .results import check_record, importance_matrix, taylor_record  # noqa: F401  (importance_matrix: re-exported)
from .samples import Sample, SampleSet
from .scoring import scored_ce

ESTIMATORS = ("gate", "token")
# Settings that define a history: a resumed file must have been written with the same ones.
HISTORY_KEYS = ("estimator", "signed", "normalize", "prune_per_iter", "min_heads_per_layer")


@dataclass
class TaylorConfig:
    # None: 10% of all heads (rounded, at least 1), the paper's step
    prune_per_iter: int | None = opt(None, "heads pruned per iteration (default: 10%% of all)", check=cli.at_least(1))
    num_iters: int = opt(9, "pruning iterations (a rerun with more continues the history)", check=cli.at_least(1))
    min_heads_per_layer: int = opt(1, "never prune a layer below this many heads", check=cli.at_least(0))
    stop_factor: float | None = opt(
        None, "stop when held-out loss exceeds this factor x the unpruned held-out loss", check=cli.above(0)
    )
    estimator: str = opt(
        "gate",
        "gate: sum_s |dL_s/dm| (the paper and its code); token: sum_s sum_t |<dL_s/da_t, a_t>| (a per-token variant)",
        choices=ESTIMATORS,
    )
    signed: bool = opt(False, "signed scores: -sum_s dL_s/dm (estimated loss increase)")
    normalize: bool = opt(
        True, "raw scores: no per-layer L2 normalisation (the paper normalises)", flag="no-normalize", invert=True
    )

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if self.signed and self.estimator == "token":
            raise ValueError(
                "signed per-token scores sum to the signed gate gradient: use estimator 'gate' with signed=True"
            )
        if self.prune_per_iter is not None and self.prune_per_iter < 1:
            raise ValueError("prune_per_iter must be >= 1")
        if self.num_iters < 0 or self.min_heads_per_layer < 0:
            raise ValueError("num_iters and min_heads_per_layer must be >= 0")
        if self.stop_factor is not None and self.stop_factor <= 0:
            raise ValueError("stop_factor must be > 0")

    def step(self, n_heads_total: int) -> int:
        return self.prune_per_iter or max(1, round(0.1 * n_heads_total))

    @property
    def variant(self) -> tuple[str, ...]:
        """Output-name variant words naming the non-default importance options, so variants never share a file."""
        return tuple(
            w
            for w, on in (("token", self.estimator == "token"), ("signed", self.signed), ("nonorm", not self.normalize))
            if on
        )


# ---------------------------------------------------------------- importance of one sample


@contextmanager
def checkpointing_active(model: torch.nn.Module) -> Iterator[None]:
    """HF checkpoints a decoder layer only while that layer is in training mode, so
    `model.gradient_checkpointing_enable()` alone does nothing to an eval model. Turn the flag on for the
    checkpointed layers themselves, not recursively: attention dropout and every submodule stay in eval mode."""
    flipped = [m for m in adapter(model).layers if getattr(m, "gradient_checkpointing", False) and not m.training]
    for m in flipped:
        m.training = True
    try:
        yield
    finally:
        for m in flipped:
            m.training = False


def _grad_dtype(model: torch.nn.Module) -> torch.dtype:
    return torch.promote_types(torch.float32, next(model.parameters()).dtype)


def _tensors(s: Sample) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.as_tensor(s.input_ids)[None], torch.as_tensor(s.positions), torch.as_tensor(s.targets))


class SampleScores(NamedTuple):
    loss: float  # mean CE of the sample's scored tokens, pruned heads gated to 0
    scores: np.ndarray  # [L, Hmax] float64, see `sample_scores`


def sample_scores(
    model: torch.nn.Module, sample: Sample, pruned: Iterable[Head] = (), estimator: str = "gate"
) -> SampleScores:
    """One forward+backward. Returns the sample's loss (mean CE of its scored tokens, pruned heads gated to 0)
    and [L, Hmax] float64: the gate gradient dL/dm (`gate`) or sum_t |<dL/da_t, a_t>| (`token`).
    Padding entries are 0; entries of pruned heads are meaningless (the caller masks them)."""
    ad = adapter(model)
    dt = _grad_dtype(model)
    pruned = list(pruned)
    gates = gates_for(ad, pruned, value=0.0, dtype=dt, device=ad.device)
    if estimator == "gate":
        gates.requires_grad_(True)
    acc = torch.zeros(ad.n_layers, ad.max_heads, dtype=dt)

    def on_grad(l: int, x: torch.Tensor, grad: torch.Tensor) -> None:
        lay = ad.heads[l]
        dots = (grad.to(dt) * x.to(dt)).view(*x.shape[:-1], lay.n_heads, lay.head_dim).sum(-1)  # [B, T, H]
        acc[l, : lay.n_heads] += dots.abs().sum(dim=(0, 1)).cpu()

    ids, pos, tgt = _tensors(sample)
    with ExitStack() as stack:
        stack.enter_context(frozen_weights(model))
        stack.enter_context(torch.enable_grad())
        if estimator == "gate" or pruned:
            stack.enter_context(head_gates(model, gates))
        if estimator == "token":
            stack.enter_context(o_proj_input_grads(model, on_grad))
        stack.enter_context(checkpointing_active(model))
        loss = scored_ce(model, ids, pos, tgt).mean()
        loss.backward()
    if estimator == "gate":
        out = gates.grad[0].detach().to(torch.float64).cpu().numpy()
    else:
        out = acc.to(torch.float64).numpy()
    return SampleScores(float(loss.detach()), out)


@torch.no_grad()
def sample_losses(
    model: torch.nn.Module,
    samples: Sequence[Sample],
    pruned: Iterable[Head] = (),
    progress: bool = False,
    desc: str = "held-out",
) -> list[float]:
    """Forward only: each sample's loss (mean CE of its scored tokens) with the given heads gated to 0."""
    ad = adapter(model)
    pruned = list(pruned)
    out = []
    with ExitStack() as stack:
        if pruned:
            stack.enter_context(head_gates(model, gates_for(ad, pruned, value=0.0, device=ad.device)))
        for s in tqdm(samples, desc=desc, disable=not progress, leave=False):
            out.append(float(scored_ce(model, *_tensors(s)).mean()))
    return out


# ---------------------------------------------------------------- scores of all heads


def alive_mask(ad: Adapter, pruned: Iterable[Head]) -> np.ndarray:
    """[L, Hmax] bool: heads that exist and are not pruned (the keep-mask of `headsets`)."""
    return keep_mask(ad, pruned)


class HeadScores(NamedTuple):
    scores: np.ndarray  # [L, Hmax] used for ranking (normalised if asked), NaN at pruned heads and padding
    raw: np.ndarray  # [L, Hmax] before any normalisation
    losses: list[float]  # per-sample losses under the pruned heads


def score_heads(
    model: torch.nn.Module, samples: Sequence[Sample], pruned: Iterable[Head], cfg: TaylorConfig, progress: bool = False
) -> HeadScores:
    """Importance of the alive heads over `samples`: (scores used for ranking, raw scores before any
    normalisation, per-sample losses). Both matrices [L, Hmax], NaN at pruned heads and padding."""
    ad = adapter(model)
    pruned = list(pruned)
    total = np.zeros((ad.n_layers, ad.max_heads))
    losses = []
    for s in tqdm(samples, desc="scoring", disable=not progress, leave=False):
        loss, g = sample_scores(model, s, pruned, cfg.estimator)
        losses.append(loss)
        if cfg.estimator == "token":
            total += g
        elif cfg.signed:
            total -= g  # estimated loss increase when the head is removed
        else:
            total += np.abs(g)
    alive = alive_mask(ad, pruned)
    raw = np.where(alive, total, np.nan)
    scores = raw.copy()
    if cfg.normalize:
        for l in range(ad.n_layers):
            if alive[l].any():
                scores[l] = raw[l] / (np.sqrt(np.nansum(raw[l] ** 2)) + 1e-20)
    return HeadScores(scores, raw, losses)


def choose_pruned(scores: np.ndarray, alive: np.ndarray, k: int, min_per_layer: int) -> list[Head]:
    """The k lowest-scoring alive heads (ties: lower layer, then lower head), never leaving a layer with fewer
    than `min_per_layer` alive heads; fewer than k when the constraint allows no more."""
    left = alive.sum(1)
    order = sorted(zip(*np.nonzero(alive)), key=lambda lh: (scores[lh], lh[0], lh[1]))
    out: list[Head] = []
    for l, h in order:
        if len(out) == k:
            break
        if left[l] - 1 >= min_per_layer:
            out.append((int(l), int(h)))
            left[l] -= 1
    return out


def n_prunable(alive: np.ndarray, min_per_layer: int) -> int:
    return int(np.clip(alive.sum(1) - min_per_layer, 0, None).sum())


# ---------------------------------------------------------------- iterative pruning


def _matrix(a: np.ndarray) -> list[list[float | None]]:
    """JSON form of a score matrix: NaN (pruned head or padding) becomes null."""
    return [[None if math.isnan(x) else float(x) for x in row] for row in a]


def _ids(samples: Sequence[Sample]) -> list[list]:
    return [[s.problem_id, int(s.sample)] for s in samples]


def check_history(
    history: list[dict],
    cfg: TaylorConfig,
    ad: Adapter,
    scoring: Sequence[Sample],
    heldout: Sequence[Sample],
    where: str = "history",
) -> None:
    """A resumed history must be contiguous and made with the same settings, samples and head layout."""
    want = {k: v for k, v in asdict(cfg).items() if k in HISTORY_KEYS}
    for i, rec in enumerate(history):
        at = f"{where}:{i + 1}"
        if rec.get("iteration") != i + 1:
            raise ValueError(
                f"{at}: expected iteration {i + 1}, found {rec.get('iteration')} "
                f"(records must be 1, 2, ...; rerun with --force)"
            )
        check_record(
            rec,
            {"settings": want, "scoring_samples": _ids(scoring), "heldout_samples": _ids(heldout)},
            at,
            hint="use the same settings, sample flags and --split-seed/--heldout, --tag, another "
            "--results-dir, or --force",
        )
        if np.shape(rec.get("importance")) != (ad.n_layers, ad.max_heads):
            raise ValueError(
                f"{at}: importance shape {np.shape(rec.get('importance'))} does not fit the model "
                f"[{ad.n_layers}, {ad.max_heads}]"
            )


def run_taylor(
    model: torch.nn.Module,
    scoring: SampleSet | Sequence[Sample],
    heldout: SampleSet | Sequence[Sample],
    cfg: TaylorConfig,
    *,
    history: Sequence[dict] = (),
    on_record: Callable[[dict], None] | None = None,
    progress: bool = False,
) -> list[dict]:
    """Iterative Taylor pruning; returns the full history (given `history` + the new records). With a history
    (e.g. read back from the jsonl after a kill) it continues from its last iteration, exactly as an
    uninterrupted run would. `on_record` is called with each new record as soon as it exists."""
    ad = adapter(model)
    scoring = list(getattr(scoring, "samples", scoring))
    heldout = list(getattr(heldout, "samples", heldout))
    if not scoring or not heldout:
        raise ValueError("run_taylor needs scoring and held-out samples")
    history = list(history)
    check_history(history, cfg, ad, scoring, heldout)
    settings = {k: v for k, v in asdict(cfg).items() if k in HISTORY_KEYS}
    k = cfg.step(ad.n_heads_total)
    if history:
        last = history[-1]
        pruned = [tuple(p) for p in last["pruned_total"]]
        base_heldout = last["base_heldout_loss"]
        if last.get("stop_reason"):
            return history
    else:
        pruned = []
        base_heldout = float(np.mean(sample_losses(model, heldout, progress=progress, desc="base held-out")))
    for it in range(len(history) + 1, cfg.num_iters + 1):
        alive = alive_mask(ad, pruned)
        if n_prunable(alive, cfg.min_heads_per_layer) == 0:
            break
        t0 = time.perf_counter()
        scores, raw, s_losses = score_heads(model, scoring, pruned, cfg, progress)
        t1 = time.perf_counter()
        new = choose_pruned(scores, alive, k, cfg.min_heads_per_layer)
        before = list(pruned)
        pruned = sorted(set(pruned) | set(new))
        h_losses = sample_losses(model, heldout, pruned, progress=progress)
        t2 = time.perf_counter()
        h_loss = float(np.mean(h_losses))
        stop = None
        if cfg.stop_factor is not None and h_loss > cfg.stop_factor * base_heldout:
            stop = "stop_factor"
        elif n_prunable(alive_mask(ad, pruned), cfg.min_heads_per_layer) == 0:
            stop = "no_prunable_heads"
        alive_after = alive_mask(ad, pruned)
        rec = {
            "iteration": it,
            "n_alive_before": int(alive.sum()),
            "n_alive_after": int(alive_after.sum()),
            "alive_per_layer": alive_after.sum(1).tolist(),
            "pruned": [list(h) for h in new],  # this iteration, lowest score first
            "pruned_before": [list(h) for h in before],  # the heads gated to 0 while scoring
            "pruned_total": [list(h) for h in pruned],
            "importance": _matrix(scores),
            **({"importance_raw": _matrix(raw)} if cfg.normalize else {}),
            # the states are named: the scoring pass runs before this iteration prunes (`pruned_before` gated),
            # the held-out pass after (`pruned_total` gated); `base_*`: no head gated
            "scoring_loss_before": float(np.mean(s_losses)),
            "scoring_losses_before": s_losses,
            "heldout_loss_after": h_loss,
            "heldout_losses_after": h_losses,
            "base_heldout_loss": base_heldout,
            "base_scoring_loss": history[0]["scoring_loss_before"] if history else float(np.mean(s_losses)),
            "stop_reason": stop,
            "settings": settings,
            "scoring_samples": _ids(scoring),
            "heldout_samples": _ids(heldout),
            "time_scoring_s": round(t1 - t0, 3),
            "time_heldout_s": round(t2 - t1, 3),
        }
        history.append(rec)
        if on_record is not None:
            on_record(rec)
        if stop:
            break
    return history


# ---------------------------------------------------------------- CLI


@dataclass
class SplitConfig:
    """The stage's run options besides the pruning itself: the scoring/held-out split, memory, the output tag."""

    heldout: float | int = opt(
        0.25, "held-out problems: a fraction (0.25) or a count (8)", parse=lambda v: cli.parse_heldout(str(v))
    )
    split_seed: int | None = opt(None, "seed of the scoring/held-out split (default --seed)")
    gradient_checkpointing: bool = opt(False, "recompute layer activations in backward")
    tag: str | None = opt(None, "suffix of the output stem (keeps variants apart)")


SPEC = cli.StageSpec(
    "taylor",
    "Iterative first-order Taylor head pruning (Michel et al. 2019)",
    configs=(TaylorConfig, SplitConfig),
    device_map=True,
    no_shard="Taylor pruning is iterative (each iteration scores the heads the previous ones left); spread it "
    "with --device-map, or run datasets and modes as separate jobs",
)


def build_parser():
    return cli.stage_parser(SPEC)


@cli.each_dataset
def main(argv: Sequence[str] | None = None) -> list[dict]:
    from .store import JsonlStore, write_npz

    run = cli.prepare(SPEC, argv)
    cfg, opts, ss = run.config(TaylorConfig), run.config(SplitConfig), run.samples
    split_seed = run.args.seed if opts.split_seed is None else opts.split_seed
    try:
        scoring, heldout = ss.split(opts.heldout, seed=split_seed)
        out = run.output(run.sample_config.output_stem.with_variant(*cfg.variant, opts.tag))
    except ValueError as e:
        run.parser.error(str(e))
    path, npz_path = out.path("jsonl"), out.path("samples.npz")
    settings = {k: v for k, v in asdict(cfg).items() if k in HISTORY_KEYS}
    # num_iters and stop_factor say how far to go, not what an iteration computes: a longer run continues a file
    identity = run.identity(
        scoring_samples=_ids(scoring.samples), heldout_samples=_ids(heldout.samples), settings=settings
    )
    store = JsonlStore(path, key_fields=("iteration",))

    def complete() -> bool:
        h = store.read()
        return bool(h) and (bool(h[-1].get("stop_reason")) or len(h) >= cfg.num_iters)

    # --force removes the history; the runs file keeps the provenance of the discarded run
    claim = run.claim(out, identity, files=("jsonl",), record="runs.json", complete=complete, append=True)
    history = [taylor_record(r) for r in store.read()]  # files written before the states were named, too
    if claim.done:
        print(
            f"[btp.taylor] {path}: complete ({len(history)} iterations"
            f"{', stopped: ' + history[-1]['stop_reason'] if history[-1].get('stop_reason') else ''})"
        )
        _summary(history)
        return history
    lm = run.load()
    if opts.gradient_checkpointing:
        lm.model.gradient_checkpointing_enable()
    check_history(history, cfg, adapter(lm.model), scoring.samples, heldout.samples, where=str(path))
    stamp = run.stamp(
        lm,
        split={
            "seed": split_seed,
            "heldout": opts.heldout,
            "scoring": scoring.problem_ids,
            "heldout_problems": heldout.problem_ids,
        },
        taylor=asdict(cfg),
        dtype=str(lm.dtype),
        device=str(lm.device),
        **claim.stamp,
    )
    store.begin_run(stamp)
    if run.args.force or not npz_path.exists():
        hold = set(heldout.problem_ids)
        write_npz(
            npz_path,
            provenance=stamp,
            **ss.fields(),
            heldout=np.array([pid in hold for pid in ss.problem_ids], dtype=bool),
        )
    if history:
        print(f"[btp.taylor] resuming {path} after iteration {len(history)}")
    print(
        f"[btp.taylor] {len(scoring)} scoring / {len(heldout)} held-out samples, "
        f"{cfg.step(adapter(lm.model).n_heads_total)} heads per iteration, up to {cfg.num_iters} iterations"
        f"{ss.left_out()}"
    )
    history = run_taylor(
        lm.model, scoring, heldout, cfg, history=history, on_record=store.append, progress=run.progress
    )
    _summary(history)
    print(f"[btp.taylor] wrote {path}")
    return history


def _summary(history: list[dict]) -> None:
    if not history:
        print("[btp.taylor] no iterations (nothing prunable)")
        return
    base = history[0]["base_heldout_loss"]
    print(f"  iter  alive  scoring_loss(before)  heldout_loss(after)  x base   (base held-out {base:.4f})")
    for r in history:
        print(
            f"  {r['iteration']:4d}  {r['n_alive_after']:5d}  {r['scoring_loss_before']:20.4f}"
            f"  {r['heldout_loss_after']:19.4f}  {r['heldout_loss_after'] / base:6.3f}"
            + (f"  stop: {r['stop_reason']}" if r.get("stop_reason") else "")
        )


if __name__ == "__main__":
    cli.entry("taylor", main)
