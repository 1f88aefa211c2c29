"""Benchmark: the fitness of a CMA-ES population, batched by btp against one candidate at a time, in one run on the
same model, samples and masks.

one at a time: for every candidate and sample, a full forward of the whole sequence with the candidate's removed
heads gated to zero (batch 1), full logits [T, vocab], CE at the scored positions.
btp (`cmaes_search.ModelFitness`, i.e. `headsets.SetLossCache` with `common_start`, no base CE): the whole
population in batched passes (one candidate per row), resuming at the lowest layer any candidate touches (above
layer 0: from a base pass that recorded that layer's input and attention; at layer 0: from the embeddings, no base
pass), logits only at the scored positions. A fresh cache per repeat: no candidate is served from it (a real search
also gets its revisited masks for free).

The population is a first CMA-ES generation: coordinates N(0, sigma0^2), decoded by the fixed-budget encoding.
Both methods run with the same torch threads, alternating which goes first; the script prints both times (wall
and this process's CPU time: on a shared machine the CPU time is the steadier figure), the ratios (goal >= 3), the
machine's load and the largest difference between the two fitness matrices.

    .venv/bin/python scripts/bench_cmaes.py                              # embedded model, 3 HumanEval references
    .venv/bin/python scripts/bench_cmaes.py --popsize 20 --budget 0.9 --threads 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from btp.arch import adapter
from btp.cmaes_search import ModelFitness, SearchConfig, Space, decode_fixed
from btp.heads import gates_for, head_gates
from btp.headsets import removed_sets
from btp.models import load_model
from btp.samples import SampleConfig, load_samples

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import load_line  # noqa: E402


@torch.no_grad()
def one_at_a_time(model, ss, masks: np.ndarray) -> np.ndarray:
    """[N, S] mean CE over scored tokens, each candidate and sample in its own full forward."""
    ad = adapter(model)
    out = np.empty((len(masks), len(ss)))
    for i, removed in enumerate(removed_sets(ad, masks)):
        with head_gates(model, gates_for(ad, removed, device=ad.device)):
            for s, smp in enumerate(ss.samples):
                ids = torch.as_tensor(smp.input_ids, dtype=torch.long)[None].to(ad.device)
                lg = model(input_ids=ids).logits[0, torch.as_tensor(smp.positions)].float()
                out[i, s] = F.cross_entropy(lg, torch.as_tensor(smp.targets).to(lg.device)).item()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dataset", default="humaneval")
    p.add_argument("--num-samples", type=int, default=3)
    p.add_argument("--seed", type=int, default=1, help="sample choice and population draw")
    p.add_argument("--sample-max-tokens", type=int, default=256)
    p.add_argument("--popsize", type=int, default=None, help="default: pycma's 4 + 3 ln(heads)")
    p.add_argument("--budget", default="0.5", help="heads kept: a fraction or a count")
    p.add_argument("--sigma0", type=float, default=0.5)
    p.add_argument("--batch-rows", type=int, default=None, help="btp rows per pass (default: the population)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared CPU)")
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    model, ad = lm.model, adapter(lm.model)
    ss = load_samples(
        "results",
        lm.model_id,
        args.dataset,
        SampleConfig(
            source="reference", num_samples=args.num_samples, seed=args.seed, max_tokens=args.sample_max_tokens
        ),
        lm.tokenizer,
    )
    space = Space(tuple(ad.layer_num_heads))
    cfg = SearchConfig(budget=args.budget, min_heads_per_layer=1)
    k = cfg.n_keep(space.n)
    pop = args.popsize or int(4 + 3 * np.log(space.n))
    rng = np.random.default_rng(args.seed)
    keeps = np.stack([decode_fixed(rng.normal(0, args.sigma0, space.n), space, k, 1) for _ in range(pop)])
    masks = space.masks(keeps)
    low = min(l for r in removed_sets(ad, masks) for l, _ in r)
    toks = [len(s.input_ids) for s in ss.samples]
    scored = sum(s.n_scored for s in ss.samples)
    print(
        f"{lm.model_id} on {lm.device} ({lm.dtype}), {torch.get_num_threads()} threads; {len(ss)} "
        f"{args.dataset} reference samples ({sum(toks)} tokens, {scored} scored); population {pop}, keep {k} of "
        f"{space.n} heads; lowest layer touched {low}"
    )
    t_btp, t_one, c_btp, c_one = [], [], [], []
    for r in range(args.repeats):
        for which in ("btp", "one") if r % 2 == 0 else ("one", "btp"):
            t0, c0 = time.perf_counter(), time.process_time()
            if which == "btp":
                fit = ModelFitness(model, ss, batch_rows=args.batch_rows or pop)
                a = fit(masks)
                t_btp.append(time.perf_counter() - t0)
                c_btp.append(time.process_time() - c0)
            else:
                b = one_at_a_time(model, ss, masks)
                t_one.append(time.perf_counter() - t0)
                c_one.append(time.process_time() - c0)
    diff = float(np.abs(a - b).max())
    tb, to, cb, co = min(t_btp), min(t_one), min(c_btp), min(c_one)
    runs = lambda ts: ", ".join(f"{t:.2f}" for t in ts)
    print(f"  btp batched:      {tb:8.2f} s wall  {cb:8.2f} s CPU   (runs: {runs(t_btp)} / {runs(c_btp)})")
    print(f"  one at a time:    {to:8.2f} s wall  {co:8.2f} s CPU   (runs: {runs(t_one)} / {runs(c_one)})")
    print(f"  ratio one/btp:    {to / tb:8.2f} x wall {co / cb:8.2f} x CPU  (goal >= 3); {load_line()}")
    print(
        f"  max |fitness difference| over {a.size} (candidate, sample) pairs: {diff:.2e} nats; "
        f"mean fitness {a.mean(1).min():.4f}..{a.mean(1).max():.4f}"
    )


if __name__ == "__main__":
    main()
