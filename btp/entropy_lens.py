"""Stage: the entropy lens. For every block b = 0..L-1 (block index, 0-based, as head ids count layers), read the
residual stream after block b through the model's own final norm and unembedding (soft-capped as the model does)
and record, at the scored tokens only, the entropy of that distribution, the cross-entropy of the actual next
token and KL(final || layer). The embeddings (before block 0) are not read.

`python -m btp.entropy_lens --source reference --mode chain_code --num-samples 20`
writes `results/<model-slug>/<dataset>/entropy/<stem>.npz` (+ `<stem>.json`). Its `layer` array holds the block
indices; block L-1 is exactly the model's own logits: its normed last hidden state is unembedded without a second
norm.

Memory: one forward pass per sample (under SDPA or FlashAttention, the default: no [heads, T, T] scores) keeps the
residual streams at the scored positions only, as they pass ([L, P, d]); vocab-sized fp32 tensors exist only for
`chunk_tokens` (layer, position) rows at a time (three reused buffers), so [layers x tokens x vocab] is never held.
Nothing grows with T^2.
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

from . import cli
from .arch import adapter
from .cli import opt
from .heads import record
from .results import read_partial, write_partial
from .samples import SampleSet
from .scoring import final_hidden
from .stats import CLUSTERED_CI, clustered_mean
from .store import write_json, write_npz

STAGE = "entropy_lens"
METRICS = ("entropy", "ce", "kl")


@dataclass
class LensConfig:
    chunk_tokens: int | None = opt(
        None,
        "(layer, position) rows of vocab-sized fp32 logits held at once, bounds "
        "memory (default: auto, <= 128 MiB per buffer on CPU, <= 512 MiB on CUDA)",
        check=cli.at_least(1),
    )
    save_every: float = opt(60.0, "seconds between partial saves (resume)")
    progress: bool = True

    def __post_init__(self) -> None:
        if self.chunk_tokens is not None and self.chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {self.chunk_tokens}")


def auto_chunk(vocab_size: int, device: torch.device) -> int:
    """Default rows per chunk: one fp32 [rows, V] buffer of <= 128 MiB on CPU (about 3 such buffers live at
    once; larger matmuls amortise the unembedding's packing, measured flat from ~500 rows for V = 49k), <= 512 MiB
    on CUDA."""
    budget = (512 if device.type == "cuda" else 128) * 2**20
    return int(min(4096, max(8, budget // (4 * vocab_size))))


# ---------------------------------------------------------------- the lens


class _Pool:
    """Reusable flat buffers by name: vocab-sized blocks are allocated once, not once per chunk (on CPU each fresh
    block is mmapped and page-faulted anew: that cost ~35% of the lens' CPU time, measured)."""

    def __init__(self, device: torch.device):
        self.device, self.bufs = device, {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n = int(np.prod(shape))
        b = self.bufs.get(name)
        if b is None or b.numel() < n or b.dtype != dtype:
            b = self.bufs[name] = torch.empty(n, dtype=dtype, device=self.device)
        return b[:n].view(shape)


def _stats(
    logits: torch.Tensor,
    targets: torch.Tensor,
    pool: _Pool,
    final_p: torch.Tensor | None = None,
    final_neg_h: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Entropy, CE of `targets` and KL(final || this) per row of `logits` z [..., P, V], in fp32. Without `final_p`
    these are the final layer's rows and their probabilities are returned (in their own buffer) for the KL of the
    other layers. Destroys `logits`.

    One softmax pass and no log-probabilities: with z shifted by its max (z_j at j = argmax p, as log_softmax does,
    so that the sums below do not cancel), lse = -log p_j, H = lse - sum p z, CE = lse - z_t and
    KL(f || l) = sum p_f log p_f - sum p_f z_l + lse_l. (softmax rather than exp: torch's exp kernel is ~4x slower
    on CPU.)"""
    z = logits if logits.dtype == torch.float32 else pool.get("z32", tuple(logits.shape)).copy_(logits)
    p = torch.softmax(z, -1, out=pool.get("p" if final_p is not None else "p_final", tuple(z.shape)))
    p_max, j = p.max(-1, keepdim=True)
    z.sub_(z.gather(-1, j))
    lse = -p_max.log().squeeze(-1)
    ce = lse - z.gather(-1, targets.expand(*z.shape[:-1]).unsqueeze(-1)).squeeze(-1)
    if final_p is None:
        return lse - z.mul_(p).sum(-1), ce, None, p
    ent = lse - p.mul_(z).sum(-1)  # products in place: no extra buffers
    kl = final_neg_h + lse - z.mul_(final_p).sum(-1)
    return ent, ce, kl, None


@torch.no_grad()
def lens_sample(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    targets: torch.Tensor,
    chunk_tokens: int | None = None,
    *,
    pool: _Pool | None = None,
) -> dict[str, torch.Tensor]:
    """Entropy, CE and KL(final || layer) as fp32 [P, L] (CPU) for one sequence `input_ids` [T], at `positions` [P]
    whose logits predict `targets` [P]. Column b is the residual after block b; column L-1 is the model's own output.
    `pool`: buffers shared across calls (run_entropy_lens passes one for all samples)."""
    ad = adapter(model)
    L, dev = ad.n_layers, ad.device
    ids = torch.as_tensor(input_ids, dtype=torch.long).view(1, -1).to(dev)
    pos = torch.as_tensor(positions, dtype=torch.long).to(dev)
    tgt = torch.as_tensor(targets, dtype=torch.long).to(dev)
    if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= ids.shape[1]):
        raise IndexError(f"positions outside the sequence of {ids.shape[1]} tokens")
    if pos.numel():
        ids = ids[:, : int(pos.max()) + 1]  # causal: later tokens cannot change the scored positions
    # residual after layer l (1-indexed) = input of layer index l, kept at the scored positions only, as they pass
    # (memory [L, P, d], not [L, T, d]); moved to the unembedding's device (a device_map may spread the layers)
    with record(model, layer_inputs=range(1, L), positions=pos) as rec:
        last = final_hidden(model, ids)
        resid = [rec["layer_in", l][0].to(dev) for l in range(1, L)]
        rec.clear()
    final = last[0].index_select(0, pos.to(last.device)).to(dev)
    del last
    P, V, wdt = pos.numel(), ad.vocab_size, ad.unembed.weight.dtype
    res = {m: torch.zeros(P, L, dtype=torch.float32) for m in METRICS}
    rows = chunk_tokens or auto_chunk(V, dev)
    c = max(1, min(P, rows))  # positions per chunk
    g = max(1, rows // c)  # layers per unembedding matmul: g * c <= rows (short samples batch layers)
    pool = pool or _Pool(dev)
    for s in range(0, P, c):
        sl = slice(s, min(s + c, P))
        t, n = tgt[sl], sl.stop - sl.start
        # the model's own logits: its normed last state, unembedded (norm not applied twice)
        z = ad.logits_from_normed(final[sl], out=pool.get("z", (n, V), wdt))
        ent, ce, _, p_f = _stats(z, t, pool)
        res["entropy"][sl, L - 1], res["ce"][sl, L - 1] = ent.cpu(), ce.cpu()  # kl stays 0
        neg_h_f = -ent
        for l0 in range(0, L - 1, g):
            ls = range(l0, min(l0 + g, L - 1))
            h = torch.stack([resid[l][sl] for l in ls])  # [g, c, d]
            z = ad.lens_logits(h, out=pool.get("z", (len(ls), n, V), wdt))
            ent, ce, kl, _ = _stats(z, t, pool, p_f, neg_h_f)
            for k, v in (("entropy", ent), ("ce", ce), ("kl", kl)):
                res[k][sl, l0 : l0 + len(ls)] = v.T.cpu()
    return res


SUMMARY_LABELS = {
    "mean": "token-weighted: every scored token weighs the same (long outputs dominate)",
    "sample_mean": "sample-weighted: mean over problems of the mean over a problem's samples of each sample's token "
    "mean (every problem weighs the same; = the mean of sample means with one sample per problem)",
    "ci": "95% CI of the sample-weighted mean, " + CLUSTERED_CI,
}


def summarize(
    per_token: dict[str, np.ndarray],
    sample_index: np.ndarray,
    n_samples: int,
    problems: Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Per metric: token-weighted per-layer `{m}_mean`/`{m}_std` [L], per-sample means `sample_{m}_mean` [S, L], and
    the sample-weighted `{m}_sample_mean` [L] with its CI `{m}_ci_low`/`{m}_ci_high` over problems
    (`SUMMARY_LABELS`). A sample without scored tokens has NaN means and drops out of the sample-weighted ones."""
    out: dict[str, np.ndarray] = {}
    counts = np.bincount(sample_index, minlength=n_samples).astype(np.float64)
    for m in METRICS:
        x = per_token[m].astype(np.float64)
        out[f"{m}_mean"] = x.mean(0).astype(np.float32)
        out[f"{m}_std"] = x.std(0).astype(np.float32)
        sums = np.zeros((n_samples, x.shape[1]))
        np.add.at(sums, sample_index, x)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[f"sample_{m}_mean"] = (sums / counts[:, None]).astype(np.float32)
        cm = clustered_mean(out[f"sample_{m}_mean"], problems, n_boot, seed)
        out[f"{m}_sample_mean"], out[f"{m}_ci_low"], out[f"{m}_ci_high"] = (a.astype(np.float32) for a in cm[:3])
    out["sample_n_tokens"] = counts.astype(np.int64)
    return out


def lens_samples(
    model: torch.nn.Module,
    sample_set: SampleSet,
    config: LensConfig,
    indices: Sequence[int] | None = None,
    *,
    partial: Path | None = None,
    key: str = "",
) -> dict[str, list[np.ndarray]]:
    """Per metric, the [P_s, L] arrays of the samples at `indices` (default: all), in that order. Samples are
    independent: a shard computes its own and `btp.merge` puts them in place. With `partial`, the samples done
    are saved there every `config.save_every` seconds (tagged by `key`) and a rerun resumes after them."""
    parts: dict[str, list[np.ndarray]] = {m: [] for m in METRICS}
    pool = _Pool(adapter(model).device)
    todo = [sample_set.samples[i] for i in (range(len(sample_set)) if indices is None else indices)]
    st = read_partial(partial, key)
    if st is not None:  # whole samples only: per metric the done samples' rows, split back by their token counts
        n = int(st["n_done"])
        cut = np.cumsum([s.n_scored for s in todo[:n]])[:-1]
        parts = {m: np.split(st[m], cut) if n else [] for m in METRICS}
        print(f"[btp.entropy_lens] resuming from {partial}: {n} of {len(todo)} samples done")
    last, done = time.time(), len(parts["ce"])
    for s in tqdm(todo[done:], desc="entropy lens", unit="sample", disable=not config.progress):
        r = lens_sample(
            model,
            torch.from_numpy(s.input_ids),
            torch.from_numpy(s.positions),
            torch.from_numpy(s.targets),
            config.chunk_tokens,
            pool=pool,
        )
        for m in METRICS:
            parts[m].append(r[m].numpy())
        if partial is not None and time.time() - last >= config.save_every and len(parts["ce"]) < len(todo):
            write_partial(
                partial, key, {"n_done": len(parts["ce"]), **{m: np.concatenate(v) for m, v in parts.items()}}
            )
            last = time.time()
    return parts


def run_entropy_lens(
    model: torch.nn.Module,
    sample_set: SampleSet,
    config: LensConfig | None = None,
    *,
    partial: Path | None = None,
    key: str = "",
) -> dict[str, np.ndarray]:
    """The lens over all samples: per-token `entropy`, `ce`, `kl` [tokens, L] float32, their summaries,
    `layer` (block indices 0..L-1) and the sample fields (`SampleSet.fields()`), i.e. everything the npz holds."""
    parts = lens_samples(model, sample_set, config or LensConfig(), partial=partial, key=key)
    return lens_arrays(parts, sample_set, adapter(model).n_layers)


def lens_arrays(parts: dict[str, list[np.ndarray]], sample_set: SampleSet, L: int) -> dict[str, np.ndarray]:
    """Everything the npz holds, from every sample's per-token arrays (`lens_samples`, in sample order)."""
    fields = sample_set.fields()
    per_token = {
        m: (np.concatenate(v) if v else np.zeros((0, L), np.float32)).astype(np.float32) for m, v in parts.items()
    }
    return {
        **per_token,
        **summarize(per_token, fields["sample_index"], len(sample_set), sample_set.problem_ids),
        "layer": np.arange(L, dtype=np.int64),  # block index, 0-based (results.LAYER_NUMBERING)
        **fields,
    }


# ---------------------------------------------------------------- CLI

SPEC = cli.StageSpec(
    STAGE,
    "Entropy lens: per-layer entropy, next-token CE and KL(final || layer) at scored tokens",
    configs=(LensConfig,),
    device_map=True,
    shard="samples",
)
FILES = ("npz", "json")


def build_parser() -> argparse.ArgumentParser:
    return cli.stage_parser(SPEC)


@cli.each_dataset
def main(argv: Sequence[str] | None = None) -> Path:
    run = cli.prepare(SPEC, argv)
    cfg, ss = run.config(LensConfig), run.samples
    out = run.output(run.sample_config.output_stem)
    npz_path, json_path = out.path("npz"), out.path("json")
    # chunk_tokens bounds memory only: not part of the identity
    claim = run.claim(out, run.identity(), files=FILES, partials=("npz",))
    if claim.done:
        print(f"[btp.entropy_lens] {npz_path} exists for these samples; skipping (use --force to recompute)")
        return npz_path
    if run.merging:  # the shards' per-token arrays back in sample order; summaries by this stage's own code
        shards = run.shards(out, run.identity(), FILES)
        lm, book = cli.shard_stamp(shards)
        parts = {m: [None] * len(ss) for m in METRICS}
        for z, _ in shards:
            cut = np.cumsum([ss.samples[i].n_scored for i in z["shard_samples"]])[:-1]
            for m in METRICS:
                for i, a in zip(z["shard_samples"], np.split(z[m], cut)):
                    parts[m][int(i)] = a
        res = lens_arrays(parts, ss, int(shards[0][0]["layer"].size))
        secs, extra = sum(b or 0 for b in book["seconds"]), {"shards": book}
    else:
        lm = run.load()
        t0 = time.time()
        if run.shard:
            idx = run.shard.take(len(ss))
            parts = lens_samples(lm.model, ss, cfg, idx, partial=out.partial("npz"), key=claim.key)
            L = adapter(lm.model).n_layers
            stamp = run.stamp(lm, dtype=str(lm.dtype), device=str(lm.device), seconds=round(time.time() - t0, 2))
            write_json(json_path, {**stamp, **claim.stamp, "shard_samples": idx})  # identity first: npz last
            write_npz(
                npz_path,
                provenance={**stamp, **claim.stamp},
                shard_samples=np.array(idx, dtype=np.int64),
                layer=np.arange(L, dtype=np.int64),
                **{m: np.concatenate(v) if v else np.zeros((0, L), np.float32) for m, v in parts.items()},
            )
            out.partial("npz").unlink(missing_ok=True)
            print(f"[btp.entropy_lens] shard {run.shard.label}: {len(idx)} of {len(ss)} samples -> {npz_path}")
            return npz_path
        res = run_entropy_lens(lm.model, ss, cfg, partial=out.partial("npz"), key=claim.key)
        secs, extra = time.time() - t0, {}
    stamp = run.stamp(
        lm, dtype=str(lm.dtype), device=str(lm.device), seconds=round(secs, 2), stem=out.name, **claim.stamp, **extra
    )
    write_npz(npz_path, provenance=stamp, **res)
    out.partial("npz").unlink(missing_ok=True)
    summary = {
        k: res[k].tolist()
        for k in (
            "layer",
            "entropy_mean",
            "entropy_std",
            "ce_mean",
            "ce_std",
            "kl_mean",
            *(f"{m}_{w}" for m in METRICS for w in ("sample_mean", "ci_low", "ci_high")),
        )
    }
    write_json(
        json_path,
        {
            **stamp,
            "problem_ids": ss.problem_ids,
            "n_tokens": int(len(res["token_id"])),
            "n_layers": int(len(res["layer"])),
            "npz": npz_path.name,
            "summary": summary,
            "summary_labels": SUMMARY_LABELS,
            "n_problems": len(set(ss.problem_ids)),
        },
    )
    L = len(res["layer"])
    print(
        f"[btp.entropy_lens] {len(ss)} samples, {len(res['token_id'])} scored tokens, {L} layers, {secs:.1f}s "
        f"-> {npz_path}{ss.left_out()}"
    )
    for b in sorted({0, L // 4, L // 2, 3 * L // 4, L - 1}):
        print(
            f"  after block {b:3d}: entropy {res['entropy_mean'][b]:.3f}  ce {res['ce_mean'][b]:.3f}  "
            f"kl {res['kl_mean'][b]:.3f} nats (token-weighted); sample-weighted entropy "
            f"{res['entropy_sample_mean'][b]:.3f}  ce {res['ce_sample_mean'][b]:.3f}"
        )
    return npz_path


if __name__ == "__main__":
    cli.entry("entropy_lens", main)
