"""Benchmark: btp's entropy lens against the straightforward method, on the same samples, in one run.

straightforward, as a researcher writes it: the model loaded with transformers' defaults (`from_pretrained(path)`:
SDPA attention, the checkpoint's dtype), `model(ids, output_hidden_states=True)`, full-vocab fp32 logits,
log-probabilities and probabilities at every position of every layer ([L, T, V] each), then selection of the
scored positions.
btp: `btp.entropy_lens.run_entropy_lens` on the model as `python -m btp.entropy_lens` loads it
(`--attn-implementation auto`; scored positions only, (layer, position) rows in chunks).
The headline ratios are straightforward / btp for wall time and peak memory (goals >= 3x and >= 4x).

Each (method, mode) runs in a fresh subprocess so that peak memory is its own:
- CPU: peak resident set (VmHWM, reset through /proc/self/clear_refs after the model is loaded, so that "above
  base" is the computation's own; falls back to ru_maxrss where clear_refs is not writable);
- CUDA: torch.cuda.max_memory_allocated (reset after loading).
Time is the wall time of the computation over all samples (forward passes included; model and sample loading,
identical for both, excluded), and its CPU time (user + system, all threads: steadier than wall time on a shared
machine). With --repeats, runs alternate and each method's fastest is reported. The numbers of both methods are
compared (max |difference| <= 1e-4 or the script fails).

    .venv/bin/python scripts/bench_entropy_lens.py --num-samples 3 --max-len 400
    .venv/bin/python scripts/bench_entropy_lens.py --num-samples 1 --modes chain_code --seq-len 4096

`--seq-len N` lengthens each sample to N tokens (the other samples' tokens as context before it, its scored span
kept). The straightforward method is then run only where its [L, T, V] tensors fit in half the available memory;
otherwise its need is printed instead.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from benchlib import load_line

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


# ---------------------------------------------------------------- memory probes


def _hwm_kb() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


# ---------------------------------------------------------------- the two methods


def naive_sample(model, ids, positions, targets) -> dict:
    """Full logits/probabilities at every position of every layer, then selection."""
    import torch

    from btp.arch import adapter

    ad = adapter(model)
    with torch.no_grad():
        out = model(ids.view(1, -1).to(ad.device), output_hidden_states=True)
        hs = out.hidden_states  # embeddings, after layers 1..L-1, final normed state
        logits = torch.stack([ad.lens_logits(h[0]) for h in hs[1:-1]] + [out.logits[0]]).float()  # [L, T, V]
        del out, hs
        logp = torch.log_softmax(logits, -1)
        probs = torch.softmax(logits, -1)
        entropy = -(probs * logp).sum(-1)  # [L, T]
        nxt = ids.view(-1)[1:].to(logp.device)
        ce = -logp[:, :-1].gather(-1, nxt.expand(logp.shape[0], -1).unsqueeze(-1)).squeeze(-1)
        kl = (probs[-1] * (logp[-1] - logp)).sum(-1)
        pos = positions.to(logp.device)
        assert torch.equal(nxt[pos], targets.to(nxt.device))
        return {"entropy": entropy[:, pos].T.cpu(), "ce": ce[:, pos].T.cpu(), "kl": kl[:, pos].T.cpu()}


def worker(args) -> None:
    import torch
    from benchlib import kernel, stretch, user_model

    from btp.data import load_problems
    from btp.entropy_lens import LensConfig, run_entropy_lens
    from btp.models import load_model
    from btp.samples import SampleConfig, load_samples

    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model, device=args.device, dtype=args.dtype, attn_implementation=args.attn_implementation)
    model = lm.model
    if args.worker == "naive":  # the model as a user loads it
        model = user_model(lm.path, lm.device)
        del lm.model
    chosen = args.problems.split(",")
    by_id = {p.problem_id: p for p in load_problems("humaneval")}
    cfg = SampleConfig(source="reference", mode=args.mode, seed=args.seed)
    ss = load_samples(
        tempfile.gettempdir(), lm.model_id, "humaneval", cfg, lm.tokenizer, problems=[by_id[c] for c in chosen]
    )
    ss.samples = stretch(ss.samples, args.seq_len)
    cuda = lm.device.type == "cuda"
    with torch.no_grad():  # warm-up: first-call overheads are not the method's
        model(torch.tensor([[1, 2, 3]], device=lm.device))
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset = _reset_hwm()
        base = (_rss_kb() if reset else _hwm_kb()) * 1024
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    if args.worker == "btp":  # as `python -m btp.entropy_lens` runs it
        out = run_entropy_lens(model, ss, LensConfig(chunk_tokens=args.chunk_tokens, progress=False))
    else:
        parts = [
            naive_sample(
                model, torch.from_numpy(s.input_ids), torch.from_numpy(s.positions), torch.from_numpy(s.targets)
            )
            for s in ss.samples
        ]
        out = {m: np.concatenate([p[m].numpy() for p in parts]) for m in ("entropy", "ce", "kl")}
    if cuda:
        torch.cuda.synchronize()
    secs, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    peak = torch.cuda.max_memory_allocated() if cuda else _hwm_kb() * 1024
    np.savez(args.out, **{m: out[m] for m in ("entropy", "ce", "kl")})
    print(
        json.dumps(
            {
                "seconds": secs,
                "cpu_seconds": cpu,
                "peak": peak,
                "base": base,
                "device": str(lm.device),
                "kernel": kernel(model),
                "dtype": str(next(model.parameters()).dtype),
                "threads": torch.get_num_threads(),
                "n_samples": len(ss),
                "n_tokens": int(sum(s.n_scored for s in ss.samples)),
                "n_positions": int(sum(len(s.input_ids) for s in ss.samples)),
                "problems": ss.problem_ids,
                "probe": "cuda" if cuda else ("VmHWM" if reset else "ru_maxrss"),
            }
        )
    )


# ---------------------------------------------------------------- driver


def choose_problems(args) -> list[str]:
    """The first --num-samples HumanEval problems, in the seeded order the samples module uses, whose whole
    reference sample (prompt + answer) has at most --max-len tokens: contexts are not cut, as in a real run,
    and the straightforward method's [L, T, V] tensors stay within this machine's memory."""
    from btp.models import load_tokenizer
    from btp.samples import SampleConfig, load_samples

    ss = load_samples(
        tempfile.gettempdir(),
        "bench",
        "humaneval",
        SampleConfig(source="reference", seed=args.seed),
        load_tokenizer(args.model),
    )
    order = np.random.default_rng(args.seed).permutation(len(ss.samples))
    ids = [ss.samples[i].problem_id for i in order if len(ss.samples[i].input_ids) <= args.max_len]
    if not ids:
        raise SystemExit(f"no HumanEval reference sample has <= {args.max_len} tokens")
    return ids[: args.num_samples]


def run_one(method: str, mode: str, problems: list[str], args, out: Path) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        method,
        "--mode",
        mode,
        "--out",
        str(out),
        "--model",
        args.model,
        "--problems",
        ",".join(problems),
        "--seed",
        str(args.seed),
    ]
    for flag, v in (
        ("--chunk-tokens", args.chunk_tokens),
        ("--device", args.device),
        ("--dtype", args.dtype),
        ("--threads", args.threads),
        ("--seq-len", args.seq_len),
        ("--attn-implementation", args.attn_implementation),
    ):
        if v is not None:
            cmd += [flag, str(v)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"{method}/{mode} worker failed (rc {r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--modes", nargs="+", default=["chain_code", "regular"])
    p.add_argument("--num-samples", type=int, default=3)
    p.add_argument(
        "--max-len",
        type=int,
        default=400,
        help="use samples of at most this many tokens: the straightforward method holds about five "
        "[L, T, V] fp32 tensors (30 x 400 x 49152 x 4 B = 2.4 GB each)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk-tokens", type=int, default=None, help="btp's chunk (default: its auto choice)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="float32", help="fp32 (also on GPU) so that the numbers compare at 1e-4")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads per worker (1: steady timings on a shared machine; 0: torch's default)",
    )
    p.add_argument("--repeats", type=int, default=1, help="runs per method (alternating); the fastest is reported")
    p.add_argument("--seq-len", type=int, default=None, help="lengthen each sample to this many tokens")
    p.add_argument("--attn-implementation", default="auto", help="btp's kernel (as the stage's flag)")
    p.add_argument("--worker", choices=("btp", "naive"), help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--problems", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    gib = 2**30
    ok = True
    problems = choose_problems(args)
    naive_ok, need = naive_fits(args, problems)
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes:
            res: dict[str, dict] = {}
            methods = ("naive", "btp") if naive_ok else ("btp",)
            for rep in range(args.repeats):
                for method in methods if rep % 2 == 0 else methods[::-1]:
                    r = run_one(method, mode, problems, args, Path(tmp) / f"{method}-{mode}.npz")
                    if method not in res or r["seconds"] < res[method]["seconds"]:
                        res[method] = r
            n = res["btp"]
            print(
                f"\n== mode {mode}: {n['n_samples']} HumanEval reference samples {n['problems']}, "
                f"{n['n_tokens']} scored tokens of {n['n_positions']} positions, device {n['device']}, "
                f"{n['threads']} torch thread(s), memory probe {n['probe']}; {load_line()}"
            )
            print(f"{'method':<16}{'kernel':>8}{'wall s':>9}{'CPU s':>9}{'peak GiB':>10}{'above base GiB':>16}")
            for name, r in (("straightforward", res.get("naive")), ("btp", n)):
                if r is None:
                    print(f"{name:<16}  not run: its [L, T, V] tensors need about {need / gib:.0f} GiB")
                    continue
                print(
                    f"{name:<16}{r['kernel']:>8}{r['seconds']:>9.2f}{r['cpu_seconds']:>9.2f}{r['peak'] / gib:>10.3f}"
                    f"{(r['peak'] - r['base']) / gib:>16.3f}"
                )
            if not naive_ok:
                continue
            nv = res["naive"]
            a, b = np.load(Path(tmp) / f"btp-{mode}.npz"), np.load(Path(tmp) / f"naive-{mode}.npz")
            diff = max(float(np.abs(a[m] - b[m]).max()) for m in ("entropy", "ce", "kl"))
            same = diff <= 1e-4
            ok &= same
            above_n, above_v = max(n["peak"] - n["base"], 1), max(nv["peak"] - nv["base"], 1)
            print(
                f"headline (straightforward with transformers defaults / btp): wall time "
                f"{nv['seconds'] / n['seconds']:.2f}x (goal >= 3), peak memory {nv['peak'] / n['peak']:.2f}x "
                f"(goal >= 4); CPU time {nv['cpu_seconds'] / n['cpu_seconds']:.2f}x, memory above base "
                f"{above_v / above_n:.1f}x; max |difference| {diff:.2e} "
                f"({'same numbers' if same else 'NUMBERS DIFFER'})"
            )
    if not ok:
        raise SystemExit("the two methods disagree beyond 1e-4")


def naive_fits(args, problems: list[str]) -> tuple[bool, float]:
    """Whether the straightforward method's five [L, T, V] fp32 tensors (the longest sample) fit in half the
    available memory, and the bytes they need."""
    from benchlib import free_bytes
    from transformers import AutoConfig

    from btp.models import resolve_model

    cfg = AutoConfig.from_pretrained(resolve_model(args.model).path)
    t = args.seq_len or args.max_len
    need = 5.0 * cfg.num_hidden_layers * t * cfg.vocab_size * 4
    return need <= free_bytes(args.device) / 2, need


if __name__ == "__main__":
    main()
