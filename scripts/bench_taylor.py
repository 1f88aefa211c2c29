"""Benchmark: one iteration of btp's Taylor pruning against the straightforward implementation, same samples.

Straightforward (as the anchor did), on the model loaded with transformers' defaults (`from_pretrained(path)`:
SDPA attention, the checkpoint's dtype; weights frozen): per iteration, score with one forward+backward per
scoring sample (the full [T, vocab] logits from `model(...)`), prune, then evaluate the loss in a separate pass
over the scoring samples and another over the held-out samples. btp (`btp.taylor.run_taylor`, the model loaded as
`python -m btp.taylor` loads it, `--attn-implementation auto`): the scoring pass itself yields the scoring loss
(with the heads pruned so far), one forward per held-out sample, logits only at the scored positions.
Both use the same gates and the same pruning rule; the script checks that the importances, pruned heads and
held-out losses agree, and prints the time per iteration of each and the ratio straightforward / btp (the
headline, goal >= 1.3x), and each method's peak memory. With --repeats the two alternate which runs first, and
each method's fastest run is reported.

    .venv/bin/python scripts/bench_taylor.py --num-samples 6 --heldout 2 --num-iters 2
    .venv/bin/python scripts/bench_taylor.py --num-samples 2 --heldout 1 --num-iters 1 --seq-len 4096 \
        --gradient-checkpointing --prune-per-iter 27     # 4k-token contexts, code scored at their end
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # this checkout's btp
from benchlib import Peak, kernel, load_line, stretch, user_model  # noqa: E402

from btp.arch import adapter  # noqa: E402
from btp.heads import gates_for, head_gates  # noqa: E402
from btp.models import load_model  # noqa: E402
from btp.samples import SampleConfig, load_samples  # noqa: E402
from btp.taylor import TaylorConfig, alive_mask, choose_pruned, importance_matrix, run_taylor  # noqa: E402


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
        for s in scoring + heldout:  # the anchor's base losses (timed, not compared)
            float(full_logits_loss(model, s, none))
    t_base = time.perf_counter() - t0
    pruned: list = []
    out = []
    for _ in range(num_iters):
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
        out.append(
            {
                "importance": imp,
                "pruned": [list(h) for h in new],
                "scoring_loss_after": np.mean(s_losses),
                "heldout_losses": h_losses,
                "time_s": time.perf_counter() - t0,
            }
        )
    return out, t_base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="humaneval")
    ap.add_argument("--num-samples", type=int, default=6)
    ap.add_argument("--heldout", type=int, default=2, help="held-out problems")
    ap.add_argument("--num-iters", type=int, default=2)
    ap.add_argument("--prune-per-iter", type=int, default=None)
    ap.add_argument("--sample-max-tokens", type=int, default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--attn-implementation", default="auto", help="btp's kernel (as the stage's flag)")
    ap.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="lengthen each sample to this many tokens (other samples' tokens as context before it)",
    )
    ap.add_argument("--gradient-checkpointing", action="store_true", help="both methods (as the stage's flag)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each method, alternating which goes first")
    args = ap.parse_args()

    lm = load_model(args.model, dtype=args.dtype, device=args.device, attn_implementation=args.attn_implementation)
    user = user_model(lm.path, lm.device)
    if args.gradient_checkpointing:
        lm.model.gradient_checkpointing_enable()  # btp.taylor turns it on for the layers alone
        # as a user gets it: HF checkpoints only in training mode, so on the eval model this changes nothing
        user.gradient_checkpointing_enable()
    ss = load_samples(
        "results",
        lm.model_id,
        args.dataset,
        SampleConfig(source="reference", num_samples=args.num_samples, max_tokens=args.sample_max_tokens),
        lm.tokenizer,
    )
    scoring, heldout = ss.split(args.heldout, seed=0)
    scoring.samples, heldout.samples = stretch(scoring.samples, args.seq_len), stretch(heldout.samples, args.seq_len)
    cfg = TaylorConfig(prune_per_iter=args.prune_per_iter, num_iters=args.num_iters)
    ad = adapter(lm.model)
    k = cfg.step(ad.n_heads_total)
    ntok = [len(s.input_ids) for s in scoring.samples + heldout.samples]
    print(
        f"model {lm.model_id} ({lm.dtype}, {lm.device}), {len(scoring)} scoring + {len(heldout)} held-out "
        f"HumanEval reference samples, {sum(ntok)} tokens ({min(ntok)}-{max(ntok)}), {k} heads/iteration, "
        f"{args.num_iters} iterations, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}; "
        f"btp kernel {lm.attn_implementation}, straightforward: transformers defaults ({kernel(user)}, "
        f"{user.dtype}); torch threads {torch.get_num_threads()}, {load_line()}"
    )

    with torch.no_grad():  # warm-up (weights paged in, allocator, kernels) so that neither side pays it
        for m in (lm.model, user):
            m(torch.tensor([[1, 2, 3]], device=lm.device))

    peak = Peak(lm.device)
    best: dict[str, tuple] = {}
    cpu: dict[str, float] = {}  # process CPU time (1 thread): steadier than wall time on a loaded machine
    for rep in range(args.repeats):
        for which in ("btp", "ref") if rep % 2 == 0 else ("ref", "btp"):
            t0, c0 = time.perf_counter(), time.process_time()
            with peak(which):
                if which == "btp":
                    hist = run_taylor(lm.model, scoring, heldout, cfg)
                    per = [r["time_scoring_s"] + r["time_heldout_s"] for r in hist]
                    out: tuple = (hist, per)
                else:
                    ref, t_ref_base = straightforward(user, scoring.samples, heldout.samples, k, args.num_iters, 1)
                    out = (ref, [r["time_s"] for r in ref], t_ref_base)
            total, c = time.perf_counter() - t0, time.process_time() - c0
            if which not in best or total < best[which][-1]:
                best[which] = (*out, total)
            cpu[which] = min(cpu.get(which, c), c)
            print(f"  run {rep + 1}, {which}: {total:.2f} s, CPU {c:.2f} s ({load_line()})", flush=True)
    hist, btp_iter, t_btp_total = best["btp"]
    ref, ref_iter, t_ref_base, t_ref_total = best["ref"]

    # agreement
    worst = 0.0
    for a, b in zip(hist, ref):
        ia, ib = importance_matrix(a), b["importance"]
        assert np.array_equal(np.isnan(ia), np.isnan(ib))
        m = ~np.isnan(ia)
        worst = max(worst, float(np.max(np.abs(ia[m] - ib[m]) / np.abs(ib[m]).max())))
    same_pruned = all(a["pruned"] == b["pruned"] for a, b in zip(hist, ref))
    dh = max(abs(x - y) for a, b in zip(hist, ref) for x, y in zip(a["heldout_losses_after"], b["heldout_losses"]))
    ds = max(
        (abs(hist[i + 1]["scoring_loss_before"] - ref[i]["scoring_loss_after"]) for i in range(len(ref) - 1)),
        default=float("nan"),
    )
    print(
        f"agreement: importance max |diff| / max |I| = {worst:.2e}, same pruned heads every iteration: "
        f"{same_pruned}, held-out loss max |diff| = {dh:.2e}, scoring loss (btp's next scoring pass vs the "
        f"separate pass) max |diff| = {ds:.2e}"
    )
    for i, (a, b) in enumerate(zip(btp_iter, ref_iter), 1):
        print(f"iteration {i}: btp {a:8.2f} s   straightforward {b:8.2f} s   ratio {b / a:5.2f}x")
    ma, mb = float(np.mean(btp_iter)), float(np.mean(ref_iter))
    kernels = (
        "same kernel on both sides" if kernel(user) == lm.attn_implementation else f"btp on {lm.attn_implementation}"
    )
    print(
        f"headline, mean per iteration: btp {ma:.2f} s, straightforward (transformers defaults) {mb:.2f} s, "
        f"ratio {mb / ma:.2f}x (goal >= 1.3; {kernels})"
    )
    print(
        f"whole run incl. base loss: btp {t_btp_total:.2f} s, straightforward {t_ref_total:.2f} s "
        f"(its base pass {t_ref_base:.2f} s), ratio {t_ref_total / t_btp_total:.2f}x; CPU time btp "
        f"{cpu['btp']:.2f} s, straightforward {cpu['ref']:.2f} s, ratio {cpu['ref'] / cpu['btp']:.2f}x"
    )
    # the largest over runs: each method's first run (later ones reuse the heap the first grew; on CPU, whichever
    # runs second in the first repeat finds the other's freed memory, so btp, first, is the one not favoured)
    print(
        f"peak memory above run start (largest over runs), GiB: btp {peak.gib('btp'):.3f}, "
        f"straightforward {peak.gib('ref'):.3f}"
        f"{'' if peak.exact else ' (approximate: ru_maxrss)'}; {load_line()}"
    )
    if worst > 1e-3 or not same_pruned:
        raise SystemExit("importances disagree")


if __name__ == "__main__":
    main()
