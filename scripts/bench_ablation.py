"""Benchmark: btp's single-head ablation matrix against the straightforward batched method, in one run on the
same samples.

straightforward, as a researcher writes it: the model loaded with transformers' defaults (`from_pretrained(path)`:
SDPA attention, the checkpoint's dtype); for every head, a full forward of the whole sequence with that head gated
to zero (one head per batch row, `--batch-rows` rows per pass, heads of any layers mixed), full logits
[rows, T, vocab], CE at the scored positions.
btp (`headsets.HeadSetScorer`, the engine of `ablation.run_matrix`), loaded as `python -m btp.ablation` loads it
(`--attn-implementation auto`): one base pass per sample; heads of layer l resume at layer l from the recorded
residual, reuse layer l's recorded o_proj input, and unembed only the scored positions.

Both run with the same rows per pass and torch threads, interleaved layer by layer with alternating order (so
that load from other processes hits both alike). The headline is btp / straightforward-with-defaults (goal <= 0.55);
when btp's kernel is not the default one (FlashAttention on a GPU, or `--attn-implementation eager`) the
straightforward method also runs on btp's kernel and the same-kernel ratio is printed beside it. Peak memory above
the start of each timed segment is printed per method; the two matrices must agree.

    .venv/bin/python scripts/bench_ablation.py                      # embedded model, 2 HumanEval references
    .venv/bin/python scripts/bench_ablation.py --seq-len 4096 --num-samples 1 --layers 0,29 --heads-per-layer 3 \
        --batch-rows 3                                              # a 4k-token context, code scored at its end
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

from btp import ablation as abl  # noqa: E402
from btp.arch import adapter  # noqa: E402
from btp.heads import gates_for, head_gates  # noqa: E402
from btp.headsets import HeadSetScorer  # noqa: E402
from btp.models import load_model  # noqa: E402
from btp.samples import SampleConfig, load_samples  # noqa: E402


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
        return (
            F.cross_entropy(lg.flatten(0, 1), self.tgt.repeat(lg.shape[0]), reduction="none")
            .view(lg.shape[0], -1)
            .double()
            .mean(1)
        )

    def deltas(self, heads) -> np.ndarray:
        with head_gates(self.model, gates_for(self.ad, [[h] for h in heads], device=self.ad.device)):
            return (self._ce(self.ids.expand(len(heads), -1)) - self.base).cpu().numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dataset", default="humaneval")
    p.add_argument("--num-samples", type=int, default=2)
    p.add_argument("--seed", type=int, default=1, help="sample choice (seed 1: two short HumanEval references)")
    p.add_argument("--sample-max-tokens", type=int, default=None)
    p.add_argument("--layers", default=None, help="restrict both methods to these layers (default: all)")
    p.add_argument("--batch-rows", type=int, default=None, help="rows per pass for both (default: max heads/layer)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared CPU)")
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--no-reuse-attention", action="store_true", help="btp without the attention reuse")
    p.add_argument("--attn-implementation", default="auto", help="btp's kernel (as the stage's flag)")
    p.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="lengthen each sample to this many tokens (other samples' tokens as context before it)",
    )
    p.add_argument("--heads-per-layer", type=int, default=None, help="only the first N heads of each layer")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(args.model, dtype=args.dtype, device=args.device, attn_implementation=args.attn_implementation)
    model, ad = lm.model, adapter(lm.model)
    users = {"default": user_model(lm.path, lm.device)}
    if kernel(users["default"]) != lm.attn_implementation:  # same-kernel ratio beside the headline
        users["same"] = load_model(
            lm.path, dtype=lm.dtype, device=lm.device, attn_implementation=lm.attn_implementation
        ).model
    ss = load_samples(
        "results",
        lm.model_id,
        args.dataset,
        SampleConfig(
            source="reference", num_samples=args.num_samples, seed=args.seed, max_tokens=args.sample_max_tokens
        ),
        lm.tokenizer,
    )
    samples = stretch(ss.samples, args.seq_len)
    with torch.no_grad():  # warm-up: weights paged in, first-call overheads paid, before any peak is measured
        for m in (model, *users.values()):
            m(torch.tensor([[1, 2, 3]], device=lm.device))
    layers = abl.parse_layers(args.layers)
    heads = [
        (l, h)
        for l, h in ad.all_heads()
        if (layers is None or l in layers) and (args.heads_per_layer is None or h < args.heads_per_layer)
    ]
    rows = args.batch_rows or ad.max_heads
    print(
        f"{lm.model_id} on {lm.device} ({lm.dtype}), {torch.get_num_threads()} threads; {len(samples)} "
        f"{args.dataset} reference samples, {len(heads)} heads, {rows} rows per pass; btp kernel "
        f"{lm.attn_implementation}, straightforward: transformers defaults ({kernel(users['default'])}, "
        f"{users['default'].dtype}); {load_line()}"
    )
    names = ["btp", *users]
    t = dict.fromkeys(names, 0.0)
    cpu = dict.fromkeys(names, 0.0)  # process CPU time (1 thread): steadier than wall time on a loaded machine
    worst = 0.0
    clock, cpu_clock = time.perf_counter, time.process_time
    peak = Peak(lm.device)
    for i, s in enumerate(samples):
        # interleaved per layer (alternating which goes first), so that load from other processes hits both alike
        tt = dict.fromkeys(names, 0.0)
        t0, c0 = clock(), cpu_clock()
        with peak("btp"):
            run = HeadSetScorer(
                model, s, sorted({l for l, _ in heads}), batch_rows=rows, reuse_attention=not args.no_reuse_attention
            )
        base = run.base.double().mean()
        tt["btp"] += clock() - t0
        cpu["btp"] += cpu_clock() - c0
        refs = {}
        for u, m in users.items():
            t0, c0 = clock(), cpu_clock()
            with peak(u):
                refs[u] = Straightforward(m, s)
            tt[u] += clock() - t0
            cpu[u] += cpu_clock() - c0
        mats = {n: np.full((ad.n_layers, ad.max_heads), np.nan) for n in names}
        by_layer: dict[int, list] = {}
        for l, h in heads:
            by_layer.setdefault(l, []).append((l, h))
        for j, (l, hs) in enumerate(sorted(by_layer.items())):
            for which in names if j % 2 == 0 else names[::-1]:
                for c in range(0, len(hs), rows):
                    chunk = hs[c : c + rows]
                    t0, c0 = clock(), cpu_clock()
                    with peak(which):
                        if which == "btp":
                            d = (run.ce([[x] for x in chunk]).double().mean(1) - base).cpu().numpy()
                        else:
                            d = refs[which].deltas(chunk)
                    tt[which] += clock() - t0
                    cpu[which] += cpu_clock() - c0
                    mats[which][l, [h for _, h in chunk]] = d
        diff = max(float(np.nanmax(np.abs(mats["btp"] - mats[u]))) for u in users)
        worst = max(worst, diff)
        for n in names:
            t[n] += tt[n]
        same = f"   same-kernel ratio {tt['btp'] / tt['same']:.3f}" if "same" in users else ""
        print(
            f"  sample {i} ({s.problem_id}: {len(s.input_ids)} tokens, {s.n_scored} scored): btp {tt['btp']:8.1f}s"
            f"   straightforward {tt['default']:8.1f}s   ratio {tt['btp'] / tt['default']:.3f}{same}"
            f"   max|diff| {diff:.2e}   ({load_line()})",
            flush=True,
        )
    same = (
        f"same-kernel ratio ({lm.attn_implementation} both) {t['btp'] / t['same']:.3f}"
        if "same" in users
        else f"same kernel ({lm.attn_implementation}) on both sides"
    )
    print(
        f"total: btp {t['btp']:.1f}s, straightforward {t['default']:.1f}s, ratio {t['btp'] / t['default']:.3f} "
        f"(goal <= 0.55; {same}); CPU time btp {cpu['btp']:.1f}s, straightforward {cpu['default']:.1f}s, ratio "
        f"{cpu['btp'] / cpu['default']:.3f}; largest |delta difference| {worst:.2e} nats"
    )
    mem = ", ".join(f"{n} {peak.gib(n):.3f}" for n in names)
    print(
        f"peak memory above segment start, GiB: {mem}{'' if peak.exact else ' (approximate: ru_maxrss)'}; {load_line()}"
    )
    tol = 1e-4 if lm.dtype == torch.float32 else 5e-2
    if not worst <= tol:
        raise SystemExit(f"matrices disagree: {worst:.2e} > {tol}")


if __name__ == "__main__":
    main()
