"""Benchmark: one iteration of btp's Taylor pruning against the straightforward implementation, same samples.

Straightforward (as the anchor did): per iteration, score with one forward+backward per scoring sample (the full
[T, vocab] logits from `model(...)`), prune, then evaluate the loss in a separate pass over the scoring samples
and another over the held-out samples. btp (`btp.taylor.run_taylor`): the scoring pass itself yields the scoring
loss (with the heads pruned so far), one forward per held-out sample, logits only at the scored positions.
Both use the same gates and the same pruning rule; the script checks that the importances, pruned heads and
held-out losses agree, and prints the time per iteration of each and the ratio.

    .venv/bin/python scripts/bench_taylor.py --num-samples 6 --heldout 2 --num-iters 2
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from btp.arch import adapter
from btp.heads import gates_for, head_gates
from btp.models import load_model
from btp.samples import SampleConfig, load_samples
from btp.taylor import TaylorConfig, alive_mask, choose_pruned, importance_matrix, run_taylor


def full_logits_loss(model, s, gates) -> torch.Tensor:
    ids = torch.as_tensor(s.input_ids)[None].to(adapter(model).device)
    with head_gates(model, gates):
        logits = model(input_ids=ids).logits[0]
    return F.cross_entropy(logits[torch.as_tensor(s.positions)].float(), torch.as_tensor(s.targets).to(logits.device))


def straightforward(model, scoring, heldout, k: int, num_iters: int, min_heads: int) -> tuple[list[dict], float]:
    """The anchor's loop: score (fwd+bwd per sample), prune, then a separate loss pass over scoring + held-out."""
    ad = adapter(model)
    t0 = time.perf_counter()
    with torch.no_grad():
        none = gates_for(ad, [], device=ad.device)
        base = [float(full_logits_loss(model, s, none)) for s in scoring + heldout]
    t_base = time.perf_counter() - t0
    pruned: list = []
    out = []
    for it in range(1, num_iters + 1):
        t0 = time.perf_counter()
        total = np.zeros((ad.n_layers, ad.max_heads))
        for s in scoring:
            g = gates_for(ad, pruned, value=0.0, device=ad.device).requires_grad_(True)
            full_logits_loss(model, s, g).backward()
            total += np.abs(g.grad[0].double().cpu().numpy())
        alive = alive_mask(ad, pruned)
        imp = np.where(alive, total, np.nan)
        new = choose_pruned(imp, alive, k, min_heads)
        pruned = sorted(set(pruned) | set(new))
        with torch.no_grad():
            gz = gates_for(ad, pruned, value=0.0, device=ad.device)
            s_losses = [float(full_logits_loss(model, s, gz)) for s in scoring]
            h_losses = [float(full_logits_loss(model, s, gz)) for s in heldout]
        out.append({"importance": imp, "pruned": [list(h) for h in new], "scoring_loss_after": np.mean(s_losses),
                    "heldout_losses": h_losses, "time_s": time.perf_counter() - t0})
    return out, t_base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="humaneval")
    ap.add_argument("--num-samples", type=int, default=6)
    ap.add_argument("--heldout", type=int, default=2, help="held-out problems")
    ap.add_argument("--num-iters", type=int, default=2)
    ap.add_argument("--prune-per-iter", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--device", default=None)
    args = ap.parse_args()

    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    ss = load_samples("results", lm.model_id, args.dataset,
                      SampleConfig(source="reference", num_samples=args.num_samples, max_tokens=args.max_tokens),
                      lm.tokenizer)
    scoring, heldout = ss.split(args.heldout, seed=0)
    cfg = TaylorConfig(prune_per_iter=args.prune_per_iter, num_iters=args.num_iters)
    ad = adapter(lm.model)
    k = cfg.step(ad.n_heads_total)
    ntok = [len(s.input_ids) for s in ss.samples]
    print(f"model {lm.model_id} ({lm.dtype}, {lm.device}), {len(scoring)} scoring + {len(heldout)} held-out "
          f"HumanEval reference samples, {sum(ntok)} tokens ({min(ntok)}-{max(ntok)}), {k} heads/iteration, "
          f"{args.num_iters} iterations; torch threads {torch.get_num_threads()}, load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")

    with torch.no_grad():  # warm-up (allocator, kernels) so that neither side pays it
        full_logits_loss(lm.model, scoring.samples[0], gates_for(ad, [], device=ad.device))

    t0 = time.perf_counter()
    hist = run_taylor(lm.model, scoring, heldout, cfg)
    t_btp_total = time.perf_counter() - t0
    btp_iter = [r["time_scoring_s"] + r["time_heldout_s"] for r in hist]

    t0 = time.perf_counter()
    ref, t_ref_base = straightforward(lm.model, scoring.samples, heldout.samples, k, args.num_iters, 1)
    t_ref_total = time.perf_counter() - t0
    ref_iter = [r["time_s"] for r in ref]

    # agreement
    worst = 0.0
    for a, b in zip(hist, ref):
        ia, ib = importance_matrix(a), b["importance"]
        assert np.array_equal(np.isnan(ia), np.isnan(ib))
        m = ~np.isnan(ia)
        worst = max(worst, float(np.max(np.abs(ia[m] - ib[m]) / np.abs(ib[m]).max())))
    same_pruned = all(a["pruned"] == b["pruned"] for a, b in zip(hist, ref))
    dh = max(abs(x - y) for a, b in zip(hist, ref) for x, y in zip(a["heldout_losses"], b["heldout_losses"]))
    ds = max((abs(hist[i + 1]["scoring_loss"] - ref[i]["scoring_loss_after"]) for i in range(len(ref) - 1)),
             default=float("nan"))
    print(f"agreement: importance max |diff| / max |I| = {worst:.2e}, same pruned heads every iteration: "
          f"{same_pruned}, held-out loss max |diff| = {dh:.2e}, scoring loss (btp's next scoring pass vs the "
          f"separate pass) max |diff| = {ds:.2e}")
    for i, (a, b) in enumerate(zip(btp_iter, ref_iter), 1):
        print(f"iteration {i}: btp {a:8.2f} s   straightforward {b:8.2f} s   ratio {b / a:5.2f}x")
    ma, mb = float(np.mean(btp_iter)), float(np.mean(ref_iter))
    print(f"mean per iteration: btp {ma:.2f} s, straightforward {mb:.2f} s, ratio {mb / ma:.2f}x")
    print(f"whole run incl. base loss: btp {t_btp_total:.2f} s, straightforward {t_ref_total:.2f} s "
          f"(its base pass {t_ref_base:.2f} s), ratio {t_ref_total / t_btp_total:.2f}x")
    if worst > 1e-3 or not same_pruned:
        raise SystemExit("importances disagree")


if __name__ == "__main__":
    main()
