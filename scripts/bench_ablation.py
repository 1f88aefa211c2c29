"""Benchmark: btp's single-head ablation matrix against the straightforward batched method, in one run on the
same model and samples.

straightforward: for every head, a full forward of the whole sequence with that head gated to zero (one head per
batch row, `--batch-rows` rows per pass, heads of any layers mixed), full logits [rows, T, vocab], CE at the
scored positions.
btp (`headsets.HeadSetScorer`, the engine of `ablation.run_matrix`): one base pass per sample; heads of layer l resume
at layer l from the recorded residual, reuse layer l's recorded o_proj input, and unembed only the scored
positions.

Both run with the same rows per pass and torch threads, interleaved layer by layer with alternating order (so
that load from other processes hits both alike); the script prints both times, the ratio (goal <= 0.5) and the largest difference
between the two matrices.

    .venv/bin/python scripts/bench_ablation.py                      # embedded model, 2 HumanEval references
    .venv/bin/python scripts/bench_ablation.py --num-samples 3 --threads 2
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from btp import ablation as abl
from btp.arch import adapter
from btp.heads import gates_for, head_gates
from btp.headsets import HeadSetScorer
from btp.models import load_model
from btp.samples import SampleConfig, load_samples


class Straightforward:
    """Full forward of the whole sequence per head (one head per batch row), full logits, CE at scored positions."""

    def __init__(self, model, sample):
        self.model, self.ad = model, adapter(model)
        self.ids = torch.as_tensor(sample.input_ids, dtype=torch.long)[None].to(self.ad.device)
        self.pos = torch.as_tensor(sample.positions).to(self.ad.device)
        self.tgt = torch.as_tensor(sample.targets).to(self.ad.device)
        self.base = self._ce(self.ids)

    @torch.no_grad()
    def _ce(self, ids) -> torch.Tensor:  # mean CE over scored tokens, per row
        lg = self.model(input_ids=ids).logits[:, self.pos].float()
        return F.cross_entropy(lg.flatten(0, 1), self.tgt.repeat(lg.shape[0]), reduction="none"
                               ).view(lg.shape[0], -1).double().mean(1)

    def deltas(self, heads) -> np.ndarray:
        with head_gates(self.model, gates_for(self.ad, [[h] for h in heads], device=self.ad.device)):
            return (self._ce(self.ids.expand(len(heads), -1)) - self.base).cpu().numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dataset", default="humaneval")
    p.add_argument("--num-samples", type=int, default=2)
    p.add_argument("--seed", type=int, default=1, help="sample choice (seed 1: two short HumanEval references)")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--layers", default=None, help="restrict both methods to these layers (default: all)")
    p.add_argument("--batch-rows", type=int, default=None, help="rows per pass for both (default: max heads/layer)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared CPU)")
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--no-reuse-attention", action="store_true", help="btp without the attention reuse")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    model, ad = lm.model, adapter(lm.model)
    ss = load_samples("results", lm.model_id, args.dataset,
                      SampleConfig(source="reference", num_samples=args.num_samples, seed=args.seed,
                                   max_tokens=args.max_tokens), lm.tokenizer)
    layers = abl.parse_layers(args.layers)
    heads = [(l, h) for l, h in ad.all_heads() if layers is None or l in layers]
    rows = args.batch_rows or ad.max_heads
    print(f"{lm.model_id} on {lm.device} ({lm.dtype}), {torch.get_num_threads()} threads; {len(ss)} "
          f"{args.dataset} reference samples, {len(heads)} heads, {rows} rows per pass")
    t_btp = t_ref = 0.0
    worst = 0.0
    clock = time.perf_counter
    for i, s in enumerate(ss.samples):
        # interleaved per layer (alternating which goes first), so that load from other processes hits both alike
        t0 = clock()
        run = HeadSetScorer(model, s, layers or range(ad.n_layers), batch_rows=rows,
                               reuse_attention=not args.no_reuse_attention)
        base = run.base.double().mean()
        tb = clock() - t0
        t0 = clock()
        ref = Straightforward(model, s)
        tr = clock() - t0
        mine = np.full((ad.n_layers, ad.max_heads), np.nan)
        theirs = mine.copy()
        by_layer = {}
        for l, h in heads:
            by_layer.setdefault(l, []).append((l, h))
        for j, (l, hs) in enumerate(sorted(by_layer.items())):
            for which in ((0, 1) if j % 2 == 0 else (1, 0)):
                for c in range(0, len(hs), rows):
                    chunk = hs[c:c + rows]
                    t0 = clock()
                    if which == 0:
                        mine[l, [h for _, h in chunk]] = (run.ce([[x] for x in chunk]).double().mean(1)
                                                          - base).cpu().numpy()
                        tb += clock() - t0
                    else:
                        theirs[l, [h for _, h in chunk]] = ref.deltas(chunk)
                        tr += clock() - t0
        diff = float(np.nanmax(np.abs(mine - theirs)))
        worst = max(worst, diff)
        t_btp += tb
        t_ref += tr
        print(f"  sample {i} ({s.problem_id}: {len(s.input_ids)} tokens, {s.n_scored} scored): btp {tb:8.1f}s"
              f"   straightforward {tr:8.1f}s   ratio {tb / tr:.3f}   max|diff| {diff:.2e}", flush=True)
    print(f"total: btp {t_btp:.1f}s, straightforward {t_ref:.1f}s, ratio {t_btp / t_ref:.3f} (goal <= 0.5); "
          f"largest |delta difference| {worst:.2e} nats")
    tol = 1e-4 if lm.dtype == torch.float32 else 5e-2
    if not worst <= tol:
        raise SystemExit(f"matrices disagree: {worst:.2e} > {tol}")


if __name__ == "__main__":
    main()
