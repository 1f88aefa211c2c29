"""Benchmark: the attribution-patching screen (`ablation --method atp`) against btp's exact single-head matrix,
on the same model and samples: both times, their ratio (goal: atp >= 20x faster) and how far the screen is from
the exact answer (Spearman and Pearson over all heads, top-k recall of the exact top-k, the largest misses).

    .venv/bin/python scripts/bench_atp.py                     # embedded model, 2 HumanEval references, all heads
    .venv/bin/python scripts/bench_atp.py --sample-max-tokens 96     # short samples: a few minutes on a CPU
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's btp

from btp import ablation as abl
from btp.arch import adapter
from btp.models import load_model
from btp.samples import SampleConfig, load_samples
from btp.stats import agreement


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dataset", default="humaneval")
    p.add_argument("--num-samples", type=int, default=2)
    p.add_argument("--seed", type=int, default=1, help="sample choice (seed 1: two short HumanEval references)")
    p.add_argument("--sample-max-tokens", type=int, default=None)
    p.add_argument("--ablation", default="zero", choices=abl.ABLATIONS)
    p.add_argument("--k", type=int, default=10, help="top-k recall")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared CPU)")
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    ad = adapter(lm.model)
    ss = load_samples(
        "results",
        lm.model_id,
        args.dataset,
        SampleConfig(
            source="reference", num_samples=args.num_samples, seed=args.seed, max_tokens=args.sample_max_tokens
        ),
        lm.tokenizer,
    )
    cfg = dict(ablation=args.ablation, n_boot=10, progress=False)
    print(
        f"{lm.model_id} on {lm.device} ({lm.dtype}), {torch.get_num_threads()} threads; {len(ss)} {args.dataset} "
        f"reference samples ({', '.join(str(len(s.input_ids)) for s in ss.samples)} tokens), "
        f"{ad.n_heads_total} heads, {args.ablation} ablation"
    )
    clock = time.perf_counter
    abl.run_atp(lm.model, ss, abl.MatrixConfig(method="atp", **cfg))  # warm-up (allocator, first backward)
    t0 = clock()
    est = abl.run_atp(lm.model, ss, abl.MatrixConfig(method="atp", **cfg))
    t_atp = clock() - t0
    t0 = clock()
    exact = abl.run_matrix(lm.model, ss, abl.MatrixConfig(**cfg))
    t_exact = clock() - t0
    rep = agreement(est["delta"].mean(0), exact["delta"].mean(0), (args.k, 20))
    print(f"  exact matrix {t_exact:8.1f}s   atp {t_atp:6.2f}s   speed-up {t_exact / t_atp:.1f}x (goal >= 20x)")
    print(
        f"  over {rep['n']} heads (mean over samples): Spearman {rep['spearman']:.3f}, Pearson {rep['pearson']:.3f}, "
        + ", ".join(f"top-{k} recall {v:.2f}" for k, v in rep["topk_recall"].items())
    )
    print("  largest misses (head: atp estimate vs exact, nats):")
    for m in rep["largest_misses"][:5]:
        l, h = m["index"]
        print(f"    L{l:>2}H{h:<2} {m['estimate']:+.4f} vs {m['exact']:+.4f}")
    per = [agreement(est["delta"][s], exact["delta"][s], (args.k,)) for s in range(len(ss))]
    print(
        "  per sample: "
        + "; ".join(
            f"Spearman {r['spearman']:.3f}, top-{args.k} recall {r['topk_recall'][str(args.k)]:.2f}" for r in per
        )
    )
    assert np.array_equal(np.isfinite(est["delta"]), np.isfinite(exact["delta"]))


if __name__ == "__main__":
    main()
