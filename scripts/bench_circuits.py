"""Benchmark: btp.circuits' factored per-head OV/QK cosines against the materialised computation, on random weights
with Qwen2.5-1.5B's attention shapes (d_model 1536, 12 query heads, 2 KV heads, d_head 128; 28 layers in the model,
`--layers` of them here to keep the run short).

Materialised: per query head build W_OV = W_V^T W_O^T and W_QK = W_Q^T W_K (d_model x d_model) in both models and
take their Frobenius cosines. Factored (`btp.circuits.compare_factors`, what the stage runs): d_head x d_head Gram
products only (the self Grams of the norms through BLAS syrk). Both in float64 on the same weights (the other model
= base + 5% noise, as a fine-tune); the script checks that the cosines agree and prints time, peak extra memory
(VmHWM above the RSS with the weights loaded, each method in its own subprocess) and the ratios.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_circuits.py --layers 4
    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_circuits.py --layers 1 --d-model 4096 --heads 32 --kv-heads 8 \
        --model-layers 32      # Llama-3.1-8B's shapes
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

from btp.arch import HeadLayout
from btp.circuits import Factors, compare_factors, materialised

DTYPES = {"float64": torch.float64, "float32": torch.float32}


def layer_factors(seed: int, d_model: int, layout: HeadLayout, noise: float) -> tuple[Factors, Factors]:
    g = torch.Generator().manual_seed(seed)
    H, KV, dh = layout.n_heads, layout.n_kv_heads, layout.head_dim
    shapes = {"q": (H, dh, d_model), "k": (KV, dh, d_model), "v": (KV, dh, d_model), "o": (H, dh, d_model)}
    a = {n: torch.randn(s, generator=g) * d_model**-0.5 for n, s in shapes.items()}
    b = {n: t + noise * t.std() * torch.randn(t.shape, generator=g) for n, t in a.items()}
    return Factors(layout, **a), Factors(layout, **b)


def _status(field: str) -> int:
    """kB of a /proc/self/status field (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    try:  # Linux >= 4.0: writing 5 resets VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(args: argparse.Namespace) -> dict:
    layout = HeadLayout(args.heads, args.kv_heads, args.head_dim)
    torch.set_default_dtype(DTYPES[args.dtype])
    layers = [layer_factors(args.seed + l, args.d_model, layout, args.noise) for l in range(args.layers)]
    fn = {
        "factored": lambda f1, f2: (lambda r: {"ov_cos": r.ov_cos, "qk_cos": r.qk_cos})(
            compare_factors(f1, f2, args.head_dim)
        ),
        "materialised": materialised,
    }[args.worker]
    rss = _status("VmRSS")  # memory: the first (cold) pass over the layers, above the loaded weights
    exact_peak = _reset_peak()
    out = [fn(f1, f2) for f1, f2 in layers]
    peak = (_status("VmHWM") - rss) / 1024
    times = []
    for _ in range(args.repeat):  # time: the best of the warm passes
        t0 = time.perf_counter()
        out = [fn(f1, f2) for f1, f2 in layers]
        times.append(time.perf_counter() - t0)
    return {
        "method": args.worker,
        "seconds": min(times),
        "peak_extra_mb": peak,
        "peak_exact": exact_peak,
        "ov_cos": np.concatenate([o["ov_cos"] for o in out]).tolist(),
        "qk_cos": np.concatenate([o["qk_cos"] for o in out]).tolist(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2, help="layers to compare (Qwen2.5-1.5B has 28)")
    p.add_argument("--model-layers", type=int, default=28, help="layers of the whole model, for the estimate")
    p.add_argument("--d-model", type=int, default=1536)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--noise", type=float, default=0.05)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=list(DTYPES), default="float64", help="float64: what the stage computes in")
    p.add_argument("--worker", choices=("factored", "materialised"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    res = {}
    for m in ("materialised", "factored"):
        cmd = [sys.executable, __file__, "--worker", m] + [a for a in sys.argv[1:]]
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ}, check=True)
        res[m] = json.loads(r.stdout.strip().splitlines()[-1])
    f, m = res["factored"], res["materialised"]
    diff = max(np.abs(np.subtract(f[k], m[k])).max() for k in ("ov_cos", "qk_cos"))
    dm, dh = args.d_model, args.head_dim
    print(
        f"shapes: d_model {dm}, {args.heads} query / {args.kv_heads} KV heads, d_head {dh}; {args.layers} layers, "
        f"{args.layers * args.heads} heads x (OV, QK); {args.dtype}; torch threads {torch.get_num_threads()}"
    )
    print(f"max |cos factored - cos materialised| = {diff:.2e}")
    for r in (m, f):
        print(
            f"  {r['method']:<13} {r['seconds']:8.3f} s   peak extra memory {r['peak_extra_mb']:8.1f} MiB"
            + ("" if r["peak_exact"] else " (VmHWM not resettable: upper bound)")
        )
    print(
        f"  ratio: {m['seconds'] / f['seconds']:.1f}x faster, "
        + (
            f"{m['peak_extra_mb'] / f['peak_extra_mb']:.1f}x less peak memory"
            if f["peak_extra_mb"] > 0.05
            else "factored peak below the RSS resolution"
        )
    )
    flops_m = 2 * 2 * args.heads * 2 * dm * dm * dh  # per layer: W_OV and W_QK of each head in both models
    # factored: per circuit and per factor set (H and KV of them), one cross Gram (2 dh^2 dm flops) and two self
    # Grams at syrk's half cost
    flops_f = 2 * (2 * dh * dh * dm) * 2 * (args.heads + args.kv_heads)
    print(
        f"  flop ratio (materialised / factored Gram products, = 2 d_model / (2 d_head (1 + KV/H))): "
        f"{flops_m / flops_f:.1f}"
    )
    print(
        f"  reference sizes: one d_model x d_model float64 matrix {dm * dm * 8 / 2**20:.1f} MiB; one d_model x "
        f"d_head factor {dm * dh * 8 / 2**20:.2f} MiB"
    )
    L = args.model_layers
    print(
        f"  full model estimate ({L} layers): materialised {m['seconds'] / args.layers * L:.1f} s, factored "
        f"{f['seconds'] / args.layers * L:.1f} s"
    )


if __name__ == "__main__":
    main()
