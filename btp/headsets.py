"""The exact loss of many head sets per sample: the engine of the ablation matrix, knockout curves, CMA-ES fitness
and pruned-set checks.

A head set is a list of (layer, head) query heads to remove at the input of their layer's output projection:
zeroed, or replaced by a fixed vector per head (mean ablation, `mean_o_proj_inputs`). Its loss on a sample is the
cross-entropy of each scored token (`Sample.positions` -> `Sample.targets`), in nats; `set_losses` averages it
over each sample's scored tokens.

Why it is fast and still exact: nothing below a set's lowest layer l changes, so one base pass per sample records
the residual stream entering every layer a set starts at (and that layer's o_proj input); each set resumes at its
lowest layer from that residual (`heads.start_at_layer`), reuses the recorded o_proj input instead of recomputing
layer l's attention (`heads.fixed_attention`), runs in its own batch row (`heads.gates_for`, one mask per row) and
unembeds only the scored positions (`scoring.token_ce`). Batches are sized from free memory (`auto_rows`,
`logits_chunk`) unless `batch_rows` is given; a batch holds sets of one start layer only (`common_start`: every
set starts at the lowest layer any set touches, one group of full batches, e.g. for a CMA-ES population).
`SetLossCache` memoises losses by the frozen set of heads, for searches that revisit sets.

Masks: a keep-mask is [L, Hmax] bool, True where a head exists and is kept (padding heads of narrower layers are
False); `keep_mask` and `removed_heads` convert between masks and head lists, `removed_sets` a population
[N, L, Hmax] of masks (CMA-ES) into head sets.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from .arch import Adapter, adapter, attn_kernel
from .heads import Head, fixed_attention, gates_for, head_gates, record, start_at_layer
from .samples import Sample, SampleSet
from .scoring import final_hidden, token_ce

HeadSet = Sequence[Head]

__all__ = [
    "Head",
    "HeadSet",
    "HeadSetScorer",
    "RowBudget",
    "SetLossCache",
    "SetLosses",
    "auto_rows",
    "check_sample",
    "keep_mask",
    "logits_chunk",
    "lowest_layer",
    "mean_o_proj_inputs",
    "removed_heads",
    "removed_sets",
    "set_losses",
]


# ---------------------------------------------------------------- memory


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


class RowBudget(NamedTuple):
    rows: int  # head sets (batch rows) per pass
    budget: float  # bytes of memory the passes may use


def auto_rows(model: torch.nn.Module, seq_len: int) -> RowBudget:
    """(rows per batched pass that fit, memory budget in bytes): 60% of free memory on a GPU, 25% on a CPU
    (shared machines). Per row: a layer's live activations, plus the [heads, T, T] scores (and softmax
    temporaries) only under eager attention (SDPA and FlashAttention never hold them; a causal or sliding-window
    mask is at most T x T bytes), within two thirds of the budget; the logits of the scored positions get the
    last third (see `logits_chunk`)."""
    ad = adapter(model)
    cfg = ad.config
    elem = ad.unembed.weight.element_size()
    d = cfg.hidden_size
    inter = getattr(cfg, "intermediate_size", None) or 4 * d
    qkv = max(lay.n_heads * lay.head_dim + 2 * lay.n_kv_heads * lay.head_dim for lay in ad.heads)
    budget = _free_bytes(ad.device) * (0.6 if ad.device.type == "cuda" else 0.25)
    scores = 4 * 3 * ad.max_heads if attn_kernel(model) == "eager" else 1
    per_row = elem * seq_len * (6 * d + 3 * inter + qkv) + scores * seq_len * seq_len
    return RowBudget(int(max(1, min(4096, (2 * budget / 3) // max(per_row, 1)))), budget)


def logits_chunk(model: torch.nn.Module, rows: int, budget: float) -> int:
    """Scored positions per logits chunk: [rows, chunk, vocab] fp32 logits (and the CE's temporaries, ~3x)
    within a third of the budget."""
    return int(max(1, (budget / 3) // (rows * adapter(model).vocab_size * 4 * 3)))


# ---------------------------------------------------------------- head sets and masks


def lowest_layer(head_set: Iterable[Head]) -> int | None:
    """The layer a set's pass resumes at (None for the empty set: the base pass)."""
    return min((int(l) for l, _ in head_set), default=None)


def _ad(model: torch.nn.Module | Adapter) -> Adapter:
    return model if isinstance(model, Adapter) else adapter(model)


def keep_mask(model: torch.nn.Module | Adapter, removed: Iterable[Head] = ()) -> np.ndarray:
    """[L, Hmax] bool: True where a head exists and is not in `removed` (padding heads are False)."""
    ad = _ad(model)
    m = np.zeros((ad.n_layers, ad.max_heads), dtype=bool)
    for l, lay in enumerate(ad.heads):
        m[l, : lay.n_heads] = True
    for l, h in removed:
        if not (0 <= l < ad.n_layers and 0 <= h < ad.heads[l].n_heads):
            raise IndexError(f"head ({l}, {h}) does not exist")
        m[l, h] = False
    return m


def removed_heads(model: torch.nn.Module | Adapter, keep: np.ndarray | torch.Tensor) -> list[Head]:
    """The heads that exist and are not kept by the [L, Hmax] keep-mask, in (layer, head) order; padding
    entries are ignored."""
    ad = _ad(model)
    keep = np.asarray(keep.cpu() if isinstance(keep, torch.Tensor) else keep, dtype=bool)
    if keep.shape != (ad.n_layers, ad.max_heads):
        raise ValueError(f"keep-mask must be [{ad.n_layers}, {ad.max_heads}], got {list(keep.shape)}")
    return [(l, h) for l, lay in enumerate(ad.heads) for h in range(lay.n_heads) if not keep[l, h]]


def removed_sets(model: torch.nn.Module | Adapter, keeps: np.ndarray | torch.Tensor) -> list[list[Head]]:
    """A population of keep-masks [N, L, Hmax] as head sets, one per mask (e.g. one per CMA-ES candidate)."""
    return [removed_heads(model, k) for k in keeps]


# ---------------------------------------------------------------- samples and replacements


def check_sample(s: Sample) -> None:
    """A sample's scored span must fit its tokens, with a predicting position before its first scored token."""
    if not 1 <= s.score_start <= s.score_end <= len(s.input_ids):
        raise ValueError(
            f"sample {s.problem_id}#{s.sample}: scored span [{s.score_start}, {s.score_end}) does not "
            f"fit its {len(s.input_ids)} tokens with a predicting position before it"
        )


@torch.no_grad()
def mean_o_proj_inputs(model: torch.nn.Module, sample_set: SampleSet) -> torch.Tensor:
    """Each head's mean o_proj-input slice over every token of every sample, [L, Hmax, head_dim] fp32 (zeros for
    padding heads): the replacement for mean ablation."""
    ad = adapter(model)
    dims = {lay.head_dim for lay in ad.heads}
    if len(dims) != 1:
        raise ValueError(f"mean ablation needs one head_dim across layers, got {sorted(dims)}")
    hd = dims.pop()
    acc = torch.zeros(ad.n_layers, ad.max_heads, hd, dtype=torch.float64)
    n = 0
    for s in sample_set.samples:
        ids = torch.as_tensor(s.input_ids, dtype=torch.long).view(1, -1)
        with record(model, o_proj_inputs=range(ad.n_layers)) as rec:
            final_hidden(model, ids)
        for l, lay in enumerate(ad.heads):
            acc[l, : lay.n_heads] += rec["o_proj_in", l][0].view(-1, lay.n_heads, hd).double().sum(0).cpu()
        n += ids.shape[1]
    return (acc / max(n, 1)).float()


# ---------------------------------------------------------------- one sample


class HeadSetScorer:
    """One sample: its base pass (per-token base CE `base` [P] fp32; residual streams entering `layers` and, for
    attention reuse, their o_proj inputs) and the exact per-token CE of head sets, each set in its own batch row.

    `layers`: every layer a set passed to `ce` may start at (its lowest layer); record only those (memory).
    `replacement`: [L, Hmax, head_dim] per-head vectors for mean ablation (None: zero ablation).
    `batch_rows`: sets per batched pass (None: from free memory and the sample's length).
    `start`: resume every non-empty set at this layer, one of `layers` (at or below each set's lowest layer:
    still exact), so that sets of different lowest layers share full batches; None: each at its lowest layer.
    `noop_row`: every batched pass carries one more row with no head removed; `noop_delta` is the largest
    |its CE - base CE| over the passes so far (NaN before one): the noise floor of batching (kernels of another
    batch size may round otherwise, e.g. bf16 on a GPU), which a delta must exceed to mean anything.
    `need_base=False` (a population's fitness needs no base CE; `base` is then None): the base pass is a forward
    without logits only where a start layer above 0 must be recorded, and none at all when every set resumes at
    layer 0 (the rows then start from the model's own embeddings: one forward per sample less, exact)."""

    def __init__(
        self,
        model: torch.nn.Module,
        sample: Sample,
        layers: Iterable[int],
        *,
        replacement: torch.Tensor | None = None,
        batch_rows: int | None = None,
        reuse_attention: bool = True,
        start: int | None = None,
        noop_row: bool = False,
        need_base: bool = True,
    ):
        if noop_row and not need_base:
            raise ValueError("noop_row compares with the base CE: it needs need_base")
        self.model, self.ad = model, adapter(model)
        check_sample(sample)
        dev = self.ad.device
        self.ids = torch.as_tensor(sample.input_ids, dtype=torch.long).view(1, -1).to(dev)
        self.pos = torch.as_tensor(sample.positions, dtype=torch.long).to(dev)
        self.tgt = torch.as_tensor(sample.targets, dtype=torch.long).to(dev)
        self.rows, self.budget = auto_rows(model, self.ids.shape[1])
        self.rows = batch_rows or self.rows
        self.replacement, self.reuse, self.start = replacement, reuse_attention, start
        self.noop_row, self.noop_delta = noop_row, float("nan")
        layers = sorted(set(layers) - ({0} if not need_base else set()))  # layer 0's input: the embeddings
        self.base: torch.Tensor | None = None
        self.cache: dict = {}
        if need_base or layers:
            with (
                torch.no_grad(),
                record(model, layer_inputs=layers, o_proj_inputs=layers if reuse_attention else ()) as rec,
            ):
                h = final_hidden(model, self.ids)
                if need_base:
                    self.base = token_ce(model, h, self.pos, self.tgt, logits_chunk(model, 1, self.budget))[0]
            self.cache = dict(rec)

    def ce(self, head_sets: Sequence[HeadSet]) -> torch.Tensor:
        """Per-token CE [len(head_sets), P] (fp32) with each set's heads ablated; sets run grouped by their lowest
        layer, which must be one of the recorded layers (the empty set is the base CE), or all at `start`."""
        start = self.start
        out = torch.empty(len(head_sets), self.pos.numel(), dtype=torch.float32, device=self.ids.device)
        groups: dict[int, list[int]] = {}
        for i, hs in enumerate(head_sets):
            if hs:
                low = min(l for l, _ in hs)
                if start is not None and start > low:
                    raise ValueError(f"start layer {start} is above a set's lowest layer {low}")
                groups.setdefault(low if start is None else start, []).append(i)
            elif self.base is not None:
                out[i] = self.base
            else:  # no base pass: the empty set is a row like any other
                groups.setdefault(start or 0, []).append(i)
        for at, idx in sorted(groups.items()):
            if ("layer_in", at) not in self.cache and not (at == 0 and self.base is None):
                raise KeyError(f"layer {at} was not recorded in the base pass")
            step = max(1, self.rows - 1) if self.noop_row else self.rows  # the no-op row counts in the budget
            for j in range(0, len(idx), step):
                rows = idx[j : j + step]
                out[rows] = self._pass(at, [head_sets[i] for i in rows])
        return out

    @torch.no_grad()
    def _pass(self, start: int, sets: list[HeadSet]) -> torch.Tensor:
        sets = list(sets) + ([[]] if self.noop_row else [])
        gates = gates_for(self.ad, [list(s) for s in sets], device=self.ad.device)
        with ExitStack() as stack:
            if ("layer_in", start) in self.cache:  # else layer 0 without a base pass: from the embeddings
                stack.enter_context(start_at_layer(self.model, start, self.cache["layer_in", start]))
                if self.reuse:
                    stack.enter_context(fixed_attention(self.model, start, self.cache["o_proj_in", start]))
            stack.enter_context(head_gates(self.model, gates, replacement=self.replacement))
            h = final_hidden(self.model, self.ids.expand(len(sets), -1))
            ce = token_ce(self.model, h, self.pos, self.tgt, logits_chunk(self.model, len(sets), self.budget))
        if not self.noop_row:
            return ce
        d = float((ce[-1].double() - self.base.double()).abs().max()) if ce.shape[1] else 0.0
        self.noop_delta = d if not self.noop_delta >= d else self.noop_delta
        return ce[:-1]


# ---------------------------------------------------------------- a sample set


class SetLosses(NamedTuple):
    """`ce` [n_sets, S] float64: mean CE over each sample's scored tokens with the set's heads removed;
    `base` [S] float64: the same with no head removed (None when not asked for). Unpacks as `ce, base = ...`."""

    ce: np.ndarray
    base: np.ndarray | None

    @property
    def delta(self) -> np.ndarray:
        """ce - base, [n_sets, S]."""
        return self.ce - self.base


def set_losses(
    model: torch.nn.Module,
    sample_set: SampleSet,
    head_sets: Sequence[HeadSet],
    *,
    replacement: torch.Tensor | None = None,
    batch_rows: int | None = None,
    reuse_attention: bool = True,
    common_start: bool = False,
    need_base: bool = True,
    progress: bool = False,
    desc: str = "head sets",
) -> SetLosses:
    """Exact mean CE over scored tokens of every (head set, sample) and the base CE per sample: one base pass
    per sample, then each set resumes at its own lowest layer (least compute), one set per batch row, or, with
    `common_start`, every set at the lowest layer any set touches (one group: fewer, fuller batches, e.g. a
    population on a GPU). `replacement`: mean ablation vectors [L, Hmax, head_dim] (`mean_o_proj_inputs`);
    None zeroes the heads. `batch_rows`: sets per pass (None: from free memory and each sample's length).
    `need_base=False`: no base CE (`base` None) and, with `common_start` at layer 0, no base pass at all."""
    starts = {min(l for l, _ in hs) for hs in head_sets if hs}
    start = min(starts) if common_start and starts else None
    ce = np.empty((len(head_sets), len(sample_set)))
    base = np.empty(len(sample_set)) if need_base else None
    for s, sample in enumerate(
        tqdm(sample_set.samples, desc=desc, unit="sample", disable=not progress, dynamic_ncols=True, leave=False)
    ):
        run = HeadSetScorer(
            model,
            sample,
            starts if start is None else [start],
            replacement=replacement,
            batch_rows=batch_rows,
            reuse_attention=reuse_attention,
            start=start,
            need_base=need_base,
        )
        ce[:, s] = run.ce(head_sets).double().mean(1).cpu().numpy()
        if base is not None:
            base[s] = run.base.double().mean().item()
    return SetLosses(ce, base)


class SetLossCache:
    """`set_losses` on one (model, sample set, replacement), memoised by the frozen set of heads: searches that
    revisit a set (CMA-ES populations, greedy steps, pruned-set checks) compute it once. Only the sets not seen
    before are run (a call with none new runs nothing, once the base is known); the least recently used entries
    beyond `max_sets` are dropped. The model and replacement must not change while the cache is in use."""

    def __init__(
        self,
        model: torch.nn.Module,
        sample_set: SampleSet,
        *,
        replacement: torch.Tensor | None = None,
        batch_rows: int | None = None,
        reuse_attention: bool = True,
        common_start: bool = False,
        need_base: bool = True,
        max_sets: int = 1 << 16,
    ):
        self.model, self.sample_set, self.max_sets, self.need_base = model, sample_set, max_sets, need_base
        self.kw = {
            "replacement": replacement,
            "batch_rows": batch_rows,
            "reuse_attention": reuse_attention,
            "common_start": common_start,
            "need_base": need_base,
        }
        self.base: np.ndarray | None = None
        self._ce: OrderedDict[frozenset[Head], np.ndarray] = OrderedDict()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._ce)

    def state_dict(self) -> dict:
        """The memoised losses, counters and base, in insertion order (a resumed search continues exactly)."""
        return {
            "base": self.base,
            "sets": [sorted(k) for k in self._ce],
            "ce": [v for v in self._ce.values()],
            "hits": self.hits,
            "misses": self.misses,
        }

    def load_state_dict(self, st: dict) -> None:
        self.base = st["base"]
        self._ce = OrderedDict((frozenset(tuple(h) for h in k), np.asarray(v)) for k, v in zip(st["sets"], st["ce"]))
        self.hits, self.misses = int(st["hits"]), int(st["misses"])

    def __call__(self, head_sets: Sequence[HeadSet], *, progress: bool = False, desc: str = "head sets") -> SetLosses:
        keys = [frozenset((int(l), int(h)) for l, h in hs) for hs in head_sets]
        new = list(dict.fromkeys(k for k in keys if k not in self._ce))
        self.misses += len(new)
        self.hits += len(keys) - len(new)
        if new or (self.need_base and self.base is None):
            res = set_losses(
                self.model, self.sample_set, [sorted(k) for k in new], progress=progress, desc=desc, **self.kw
            )
            self.base = res.base if self.base is None else self.base
            for k, row in zip(new, res.ce, strict=True):
                self._ce[k] = row
        ce = np.empty((len(keys), len(self.sample_set)))
        for i, k in enumerate(keys):
            self._ce.move_to_end(k)
            ce[i] = self._ce[k]
        while len(self._ce) > self.max_sets:
            self._ce.popitem(last=False)
        return SetLosses(ce, None if self.base is None else self.base.copy())
