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
import hashlib
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from . import cli
from .arch import adapter
from .heads import Head
from .headsets import HeadSetScorer, mean_o_proj_inputs
from .headsets import set_losses as eval_sets
from .samples import SampleSet, add_sample_args, config_from_args, load_samples
from .store import dataset_dir, provenance, read_json, read_npz, write_json, write_npz
from .stats import bootstrap_mean

STAGE = "ablation"
ABLATIONS = ("zero", "mean")
SampleRun = HeadSetScorer  # the engine's former name here (tests and scripts patch and call it)


@dataclass
class MatrixConfig:
    ablation: str = "zero"              # zero | mean (the head's mean o_proj-input slice over all sample tokens)
    layers: list[int] | None = None     # None: every layer (the default; no shortcut to a subset)
    batch_rows: int | None = None       # ablations per batched pass; None: from free memory and sequence length
    per_token: bool = False             # also keep per-token deltas [tokens, L, Hmax]
    reuse_attention: bool = True        # reuse layer l's recorded o_proj input for layer-l ablations (exact)
    n_boot: int = 1000
    seed: int = 0
    save_every: float = 60.0            # seconds between partial saves (0: after every (sample, layer))
    progress: bool = True

    def __post_init__(self) -> None:
        if self.ablation not in ABLATIONS:
            raise ValueError(f"ablation must be one of {ABLATIONS}, got {self.ablation!r}")
        if self.batch_rows is not None and self.batch_rows < 1:
            raise ValueError(f"batch_rows must be >= 1, got {self.batch_rows}")
        if self.n_boot < 1:
            raise ValueError(f"n_boot must be >= 1, got {self.n_boot}")


@dataclass
class KnockoutConfig:
    ks: list[int] | None = None         # None: 1, 2, 4, ... up to the number of ranked heads
    random_seeds: int = 3
    greedy: bool = False
    greedy_candidates: int | None = None  # greedy picks among the top-N heads of the matrix (None: all)
    batch_rows: int | None = None
    reuse_attention: bool = True
    n_boot: int = 1000
    seed: int = 0
    progress: bool = True


# ---------------------------------------------------------------- the matrix

def run_matrix(model: torch.nn.Module, sample_set: SampleSet, config: MatrixConfig, *,
               partial: Path | None = None, key: str = "") -> dict[str, np.ndarray]:
    """The single-head ablation matrix. Returns `delta` [S, L, Hmax] (mean CE change over scored tokens, NaN
    for padding heads and layers not computed), `delta_mean`, `delta_ci_low`/`_high` [L, Hmax], `base_ce` [S],
    `layer_num_heads` [L], per-token `token_delta`/`base_token_ce` if asked, and `replacement` for mean ablation.
    With `partial`, progress is saved there (tagged by `key`) and a rerun resumes from it."""
    ad = adapter(model)
    L, H, S = ad.n_layers, ad.max_heads, len(sample_set)
    layers = _check_layers(config.layers, L)
    n_tok = [s.n_scored for s in sample_set.samples]
    off = np.concatenate([[0], np.cumsum(n_tok)]).astype(int)
    st = _load_partial(partial, key)
    if st is None:
        st = {"delta": np.full((S, L, H), np.nan, np.float32), "base_ce": np.full(S, np.nan, np.float32),
              "done": np.zeros((S, L), bool)}
        if config.per_token:
            st["token_delta"] = np.full((off[-1], L, H), np.nan, np.float32)
            st["base_token_ce"] = np.full(off[-1], np.nan, np.float32)
        if config.ablation == "mean":
            st["replacement"] = mean_o_proj_inputs(model, sample_set).numpy()
    rep = torch.as_tensor(st["replacement"]) if config.ablation == "mean" else None
    last_save = time.time()
    with tqdm(total=S * len(layers), initial=int(st["done"][:, layers].sum()), desc="ablation matrix",
              unit="layer", disable=not config.progress, dynamic_ncols=True) as bar:
        for s, sample in enumerate(sample_set.samples):
            todo = [l for l in layers if not st["done"][s, l]]
            if not todo:
                continue
            bar.set_postfix_str(f"sample {s + 1}/{S} ({len(sample.input_ids)} tok)")
            run = HeadSetScorer(model, sample, todo, replacement=rep, batch_rows=config.batch_rows,
                            reuse_attention=config.reuse_attention)
            base = run.base.double()
            st["base_ce"][s] = base.mean().item()
            if config.per_token:
                st["base_token_ce"][off[s]:off[s + 1]] = run.base.cpu().numpy()
            for l in todo:
                n = ad.heads[l].n_heads
                d = run.ce([[(l, h)] for h in range(n)]).double() - base  # [n, P]
                st["delta"][s, l, :n] = d.mean(1).cpu().numpy()
                if config.per_token:
                    st["token_delta"][off[s]:off[s + 1], l, :n] = d.T.cpu().numpy()
                st["done"][s, l] = True
                bar.update(1)
                if partial is not None and time.time() - last_save >= config.save_every:
                    _save_partial(partial, key, st)
                    last_save = time.time()
            del run
    out = {k: v for k, v in st.items() if k != "done"}
    out["delta_mean"], out["delta_ci_low"], out["delta_ci_high"] = (
        a.astype(np.float32) for a in bootstrap_mean(st["delta"], config.n_boot, config.seed))
    out["layer_num_heads"] = np.array(ad.layer_num_heads, dtype=np.int64)
    return out


def _check_layers(layers: Sequence[int] | None, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad or not layers:
        raise ValueError(f"layers {bad or '[]'} out of range: the model has layers 0..{n_layers - 1}")
    return sorted(set(int(l) for l in layers))


def _read_partial(path: Path | None, key: str, read) -> dict | None:
    """A partial-progress file's state if it exists, is readable and belongs to this configuration (`key`)."""
    if path is None or not path.exists():
        return None
    try:
        st = read(path)
    except Exception as e:
        warnings.warn(f"[btp.ablation] ignoring unreadable partial file {path}: {e}")
        return None
    if str(st.pop("key", "")) != key:
        warnings.warn(f"[btp.ablation] {path} belongs to another configuration; starting afresh")
        return None
    return st


def _load_partial(path: Path | None, key: str) -> dict | None:
    st = _read_partial(path, key, read_npz)
    if st is None:
        return None
    st.pop("provenance", None)
    print(f"[btp.ablation] resuming from {path}: {int(st['done'].sum())} (sample, layer) units done")
    return st


def _save_partial(path: Path, key: str, st: dict) -> None:
    write_npz(path, key=np.array(key), **st)


# ---------------------------------------------------------------- knockout

def rank_heads(delta_mean: np.ndarray) -> list[Head]:
    """Heads with a finite mean delta, largest first (ties in (layer, head) order)."""
    ls, hs = np.nonzero(np.isfinite(delta_mean))
    order = np.argsort(-delta_mean[ls, hs], kind="stable")
    return [(int(ls[i]), int(hs[i])) for i in order]


def default_ks(n: int) -> list[int]:
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    return ks


def _curve(ks: Sequence[int], sets: Sequence[Sequence[Head]], ce: np.ndarray, n_boot: int, seed: int) -> list[dict]:
    m, lo, hi = bootstrap_mean(ce.T, n_boot, seed)
    return [{"k": int(k), "heads": [list(h) for h in hs], "mean_ce": float(m[i]), "ci_low": float(lo[i]),
             "ci_high": float(hi[i]), "per_sample_ce": ce[i].tolist()} for i, (k, hs) in enumerate(zip(ks, sets))]


def run_knockout(model: torch.nn.Module, sample_set: SampleSet, delta_mean: np.ndarray, config: KnockoutConfig, *,
                 replacement: torch.Tensor | None = None, partial: Path | None = None, key: str = "") -> dict:
    """Cumulative knockout curves: `top` (heads by the matrix ranking, largest mean delta first), `random`
    (nested random orders of the same ranked heads, one per seed, and their seed average), and `greedy` if asked
    (each step adds the remaining candidate that raises the mean CE most, on these same samples). Each point:
    k, heads removed, mean CE over samples with a bootstrap CI over samples. With `partial`, finished parts and
    greedy steps are saved there and a rerun resumes."""
    ranked = rank_heads(delta_mean)
    n = len(ranked)
    ks = sorted(set(config.ks)) if config.ks else default_ks(n)
    if not ks or ks[0] < 1 or ks[-1] > n:
        raise ValueError(f"knockout ks must lie in 1..{n} (the ranked heads), got {ks}")
    kw = dict(replacement=replacement, batch_rows=config.batch_rows, reuse_attention=config.reuse_attention,
              progress=config.progress)
    st = _load_json_partial(partial, key) or {}
    if "top" not in st:
        rand_sets = []
        for i in range(config.random_seeds):
            perm = np.random.default_rng([config.seed, i]).permutation(n)
            rand_sets += [[ranked[j] for j in perm[:k]] for k in ks]
        top_sets = [ranked[:k] for k in ks]
        ce, base = eval_sets(model, sample_set, top_sets + rand_sets, desc="knockout top/random", **kw)
        st.update(base=base.tolist(), top={"sets": top_sets, "ce": ce[:len(ks)].tolist()},
                  random={"sets": rand_sets, "ce": ce[len(ks):].tolist()})
        _save_json_partial(partial, key, st)
    base = np.array(st["base"])
    bm, blo, bhi = bootstrap_mean(base, config.n_boot, config.seed)
    out: dict = {"ks": ks, "n_ranked": n, "ranking": "matrix delta_mean, largest first",
                 "base": {"k": 0, "heads": [], "mean_ce": float(bm), "ci_low": float(blo), "ci_high": float(bhi),
                          "per_sample_ce": base.tolist()},
                 "top": _curve(ks, st["top"]["sets"], np.array(st["top"]["ce"]), config.n_boot, config.seed)}
    rce = np.array(st["random"]["ce"]).reshape(config.random_seeds, len(ks), len(sample_set)) \
        if config.random_seeds else np.zeros((0, len(ks), len(sample_set)))
    rsets = st["random"]["sets"]
    out["random"] = {"seeds": [[config.seed, i] for i in range(config.random_seeds)],
                     "per_seed": [_curve(ks, rsets[i * len(ks):(i + 1) * len(ks)], rce[i], config.n_boot,
                                         config.seed) for i in range(config.random_seeds)]}
    if config.random_seeds:
        avg = _curve(ks, [[] for _ in ks], rce.mean(0), config.n_boot, config.seed)
        for p in avg:
            del p["heads"]
        out["random"]["mean_over_seeds"] = avg
    if config.greedy:
        out["greedy"] = _greedy(model, sample_set, ranked, ks, config, st, partial, key, kw)
    return out


def _greedy(model, sample_set, ranked, ks, config: KnockoutConfig, st: dict, partial, key, kw) -> dict:
    cands = ranked[:config.greedy_candidates] if config.greedy_candidates else list(ranked)
    if ks[-1] > len(cands):
        raise ValueError(f"greedy knockout to k={ks[-1]} needs at least that many candidates, got {len(cands)} "
                         f"(--greedy-candidates)")
    g = st.setdefault("greedy", {"chosen": [], "ce": []})
    chosen = [tuple(h) for h in g["chosen"]]
    if chosen:
        print(f"[btp.ablation] greedy: resuming after {len(chosen)} steps")
    for step in range(len(chosen), ks[-1]):
        rest = [c for c in cands if c not in chosen]
        ce, _ = eval_sets(model, sample_set, [chosen + [c] for c in rest],
                          desc=f"greedy step {step + 1}/{ks[-1]} ({len(rest)} candidates)", **kw)
        best = int(np.argmax(ce.mean(1)))
        chosen.append(rest[best])
        g["chosen"].append(list(rest[best]))
        g["ce"].append(ce[best].tolist())
        _save_json_partial(partial, key, st)
    return {"candidates": len(cands), "candidate_rule": "top-N of the matrix ranking" if config.greedy_candidates
            else "all ranked heads", "selection": "in-sample (the same samples the curve reports)",
            "order": [list(h) for h in chosen],
            "curve": _curve(ks, [chosen[:k] for k in ks], np.array([g["ce"][k - 1] for k in ks]), config.n_boot,
                            config.seed)}


def _load_json_partial(path: Path | None, key: str) -> dict | None:
    st = _read_partial(path, key, read_json)
    if st is None:
        return None
    for part in ("top", "random"):
        if part in st:
            st[part]["sets"] = [[tuple(h) for h in hs] for hs in st[part]["sets"]]
    return st


def _save_json_partial(path: Path | None, key: str, st: dict) -> None:
    if path is not None:
        write_json(path, {"key": key, **st})


# ---------------------------------------------------------------- CLI

def parse_layers(spec: str | Sequence[int] | None) -> list[int] | None:
    """`"0,5,10-12"` -> [0, 5, 10, 11, 12]; None/""/"all" -> None (every layer)."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "all")):
        return None
    if not isinstance(spec, str):
        return [int(x) for x in spec]
    out = []
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                a, b = part.split("-")
                out += list(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise ValueError(f"bad layer list {spec!r}: use e.g. 0,5,10-12") from None
    return out


def parse_ks(spec: str | Sequence[int] | None) -> list[int] | None:
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "auto")):
        return None
    try:
        return [int(x) for x in (spec.split(",") if isinstance(spec, str) else spec)]
    except ValueError:
        raise ValueError(f"bad --knockout-ks {spec!r}: use e.g. 1,2,4,8") from None


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(STAGE, "Exact single-head ablation matrix and cumulative knockout curves")
    cli.add_common(p)
    add_sample_args(p)
    p.add_argument("--ablation", choices=ABLATIONS, default="zero",
                   help="zero the head, or replace it by its mean o_proj-input slice over all sample tokens")
    p.add_argument("--layers", default=None, help="restrict the matrix to these layers, e.g. 0,5,10-12 (default: all)")
    p.add_argument("--batch-rows", type=int, default=None,
                   help="ablations per batched pass (default: from free memory and sequence length)")
    p.add_argument("--per-token", action="store_true", help="also store per-token deltas")
    p.add_argument("--no-reuse-attention", action="store_true",
                   help="recompute layer l's attention for layer-l ablations (slower, same numbers)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples over samples for CIs")
    p.add_argument("--save-every", type=float, default=60.0, help="seconds between partial saves (resume)")
    p.add_argument("--no-knockout", action="store_true", help="matrix only")
    p.add_argument("--knockout-ks", default=None, help="knockout counts, e.g. 1,2,4,8 (default: powers of 2)")
    p.add_argument("--random-seeds", type=int, default=3, help="random-head control curves")
    p.add_argument("--greedy", action="store_true",
                   help="also the greedy curve (re-rank remaining heads after each removal: one matrix-like "
                        "pass per step)")
    p.add_argument("--greedy-candidates", type=int, default=None,
                   help="greedy picks among the top-N heads of the matrix (default: all; costly for big models)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: fp32 on CPU, bf16 on GPU)")
    p.add_argument("--device", default=None)
    p.add_argument("--force", action="store_true", help="recompute even if the outputs exist")
    p.add_argument("--no-progress", action="store_true")
    return p


def output_name(stem: str, ablation: str, layers: list[int] | None) -> str:
    name = stem + ("-mean" if ablation == "mean" else "")
    return name + ("-layers" + "_".join(map(str, layers)) if layers is not None else "")


def _key(obj: dict) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _matches(json_path: Path, key: str) -> bool:
    try:
        return json_path.exists() and read_json(json_path).get("run_key") == key
    except Exception:
        return False


def main(argv: Sequence[str] | None = None) -> Path:
    from .models import default_device, default_dtype, load_model, load_tokenizer, parse_dtype, resolve_model

    args = cli.parse(build_parser(), argv)
    scfg = config_from_args(args)
    layers = parse_layers(args.layers)
    if layers is not None:
        layers = sorted(set(layers))
    mcfg = MatrixConfig(ablation=args.ablation, layers=layers, batch_rows=args.batch_rows, per_token=args.per_token,
                        reuse_attention=not args.no_reuse_attention, n_boot=args.n_boot, seed=args.seed,
                        save_every=args.save_every, progress=not args.no_progress)
    kcfg = KnockoutConfig(ks=parse_ks(args.knockout_ks), random_seeds=args.random_seeds, greedy=args.greedy,
                          greedy_candidates=args.greedy_candidates, batch_rows=args.batch_rows,
                          reuse_attention=not args.no_reuse_attention, n_boot=args.n_boot, seed=args.seed,
                          progress=not args.no_progress)
    ref = resolve_model(args.model)
    ss = load_samples(args.results_dir, ref.model_id, args.dataset, scfg, load_tokenizer(args.model))
    desc = ss.describe()
    dev = torch.device(args.device) if args.device else default_device()
    dtype = parse_dtype(args.dtype) or default_dtype(dev)
    out_dir = dataset_dir(args.results_dir, ref.model_id, args.dataset) / "ablation"
    name = output_name(scfg.stem, args.ablation, layers)
    npz_path, json_path = out_dir / f"{name}.npz", out_dir / f"{name}.json"
    ko_path = out_dir / f"{name}_knockout.json"
    mpart, kpart = out_dir / f"{name}.partial.npz", out_dir / f"{name}_knockout.partial.json"
    mkey = _key({"model": ref.model_id, "revision": ref.revision, "dtype": str(dtype), "samples": desc["samples"],
                 "n_scored": [s.n_scored for s in ss.samples], "stem": scfg.stem, "ablation": args.ablation,
                 "layers": layers, "per_token": args.per_token, "max_tokens": scfg.max_tokens})
    kkey = _key({"matrix": mkey, "ks": kcfg.ks, "seeds": kcfg.random_seeds, "greedy": kcfg.greedy,
                 "cands": kcfg.greedy_candidates, "seed": kcfg.seed})
    if args.force:
        for p in (mpart, kpart):
            p.unlink(missing_ok=True)
    m_done = not args.force and npz_path.exists() and _matches(json_path, mkey)
    k_done = args.no_knockout or (not args.force and m_done and _matches(ko_path, kkey))
    if m_done and k_done:
        print(f"[btp.ablation] {npz_path} exists for this configuration; skipping (use --force to recompute)")
        return npz_path
    if not args.force and npz_path.exists() and not m_done:
        raise SystemExit(f"{npz_path} exists for other samples or settings; use --force to overwrite or another "
                         f"--results-dir")
    lm = load_model(args.model, dtype=dtype, device=dev)
    stamp = dict(stage=STAGE, model=lm.model_id, revision=lm.revision, dataset=args.dataset, mode=scfg.mode,
                 seed=args.seed, config=cli.config_dict(args), samples=desc, dtype=str(lm.dtype),
                 device=str(lm.device), stem=scfg.stem, ablation=args.ablation)
    t0 = time.time()
    if m_done:
        res = read_npz(npz_path)
        print(f"[btp.ablation] matrix {npz_path} exists for this configuration; knockout only")
    else:
        res = run_matrix(lm.model, ss, mcfg, partial=mpart, key=mkey)
        secs = time.time() - t0
        rep = res.pop("replacement", None)
        arrays = {k: res[k] for k in ("delta", "delta_mean", "delta_ci_low", "delta_ci_high", "base_ce",
                                      "layer_num_heads")}
        if args.per_token:
            arrays.update(token_delta=res["token_delta"], base_token_ce=res["base_token_ce"])
        full = provenance(**stamp, run_key=mkey, seconds=round(secs, 2))
        # json first: a kill between the two writes leaves no npz, so the rerun redoes it (from the partial)
        write_json(json_path, {
            **full, "npz": npz_path.name, "layers": layers or list(range(len(res["layer_num_heads"]))),
            "n_boot": args.n_boot,
            "delta": "mean over scored tokens of CE(ablated) - CE(base), nats; NaN: padding or not computed",
            "mean_ablation": "each head's mean o_proj-input slice over all tokens of all samples"
            if args.ablation == "mean" else None,
            "base_ce_mean": float(np.mean(res["base_ce"])), "top_heads": _top(res, 20)})
        write_npz(npz_path, provenance=full, **arrays, **ss.fields())
        mpart.unlink(missing_ok=True)
        res["replacement"] = rep
        n_heads = int(np.isfinite(res["delta_mean"]).sum())
        print(f"[btp.ablation] matrix: {len(ss)} samples x {n_heads} heads in {secs:.1f}s -> {npz_path}")
    _print_top(res)
    if not k_done:
        rep = res.get("replacement") if args.ablation == "mean" else None
        if args.ablation == "mean" and rep is None:
            rep = mean_o_proj_inputs(lm.model, ss)
        t1 = time.time()
        ko = run_knockout(lm.model, ss, res["delta_mean"], kcfg,
                          replacement=None if rep is None else torch.as_tensor(rep), partial=kpart, key=kkey)
        write_json(ko_path, {**provenance(**stamp, run_key=kkey, seconds=round(time.time() - t1, 2)),
                             "matrix": npz_path.name, **ko})
        kpart.unlink(missing_ok=True)
        _print_knockout(ko, ko_path)
    return npz_path


def _top(res: dict, n: int) -> list[dict]:
    dm = np.asarray(res["delta_mean"])
    return [{"head": [l, h], "delta_mean": float(dm[l, h]), "ci_low": float(res["delta_ci_low"][l, h]),
             "ci_high": float(res["delta_ci_high"][l, h])} for l, h in rank_heads(dm)[:n]]


def _print_top(res: dict) -> None:
    print(f"  base CE {float(np.mean(res['base_ce'])):.4f} nats; largest mean deltas:")
    for t in _top(res, 8):
        print(f"    L{t['head'][0]:>2}H{t['head'][1]:<2} {t['delta_mean']:+.4f}  "
              f"[{t['ci_low']:+.4f}, {t['ci_high']:+.4f}]")


def _print_knockout(ko: dict, path: Path) -> None:
    rnd = {p["k"]: p["mean_ce"] for p in ko["random"].get("mean_over_seeds", [])}
    gr = {p["k"]: p["mean_ce"] for p in ko.get("greedy", {}).get("curve", [])}
    print(f"[btp.ablation] knockout -> {path}\n  k   top-k CE   random CE" + ("   greedy CE" if gr else ""))
    print(f"  0   {ko['base']['mean_ce']:8.4f}")
    for p in ko["top"]:
        k = p["k"]
        print(f"  {k:<3} {p['mean_ce']:8.4f}   {rnd.get(k, float('nan')):9.4f}"
              + (f"   {gr[k]:9.4f}" if gr else ""))


if __name__ == "__main__":
    main()
