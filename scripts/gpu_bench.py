"""One short GPU check for a box with no internet (issue 18): random-weight models with real shapes (Qwen3-4B,
Llama-3.2-3B configs; Llama's rope scaling left out: it changes no cost), in bf16 and fp32.

1. Agreement with CPU references on a small case (the real width, 2 layers, 2 random samples of 48 tokens; the
   CPU copy in fp32 holds the same weights): head core (`HeadSetScorer` CE of head sets), entropy lens, ablation
   (exact matrix and atp), Taylor gate gradients, CMA-ES fitness (`ModelFitness` of random masks). Largest
   |device - CPU| per check against a tolerance (fp32 without TF32: 2e-3; bf16: 0.1 nats, its rounding).
2. Timing on the full-depth model, one random sample of `--tokens` tokens, btp against the straightforward method:
   exact ablation of the heads of `--time-layers` layers (btp: `HeadSetScorer`; straightforward: a full forward with
   full logits per head) and atp (all heads, one forward+backward) against that exact matrix; entropy lens (btp:
   `lens_sample`; straightforward: output_hidden_states and full-vocab logits of every layer); CMA-ES fitness of a
   population (btp: `ModelFitness`, common start, one candidate per row; straightforward: one full forward per
   candidate). A table of absolute times and ratios; nothing is estimated or extrapolated.

    scripts/gpu_bench.sh                       # on the GPU box (~5 min on one H100-class card)
    scripts/gpu_bench.sh --cpu-smoke           # tiny shapes on the CPU: the whole script in seconds (the tests)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's btp

from btp import ablation as abl  # noqa: E402
from btp import taylor  # noqa: E402
from btp.arch import adapter  # noqa: E402
from btp.cmaes_search import ModelFitness  # noqa: E402
from btp.entropy_lens import lens_sample  # noqa: E402
from btp.heads import gates_for, head_gates  # noqa: E402
from btp.headsets import HeadSetScorer, keep_mask  # noqa: E402
from btp.samples import Sample, SampleConfig, SampleSet  # noqa: E402

SHAPES = {
    "qwen3-4b": (
        "Qwen3Config",
        dict(
            vocab_size=151936,
            hidden_size=2560,
            intermediate_size=9728,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            rope_theta=1e6,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            max_position_embeddings=40960,
        ),
    ),
    "llama-3.2-3b": (
        "LlamaConfig",
        dict(
            vocab_size=128256,
            hidden_size=3072,
            intermediate_size=8192,
            num_hidden_layers=28,
            num_attention_heads=24,
            num_key_value_heads=8,
            head_dim=128,
            rope_theta=5e5,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
            max_position_embeddings=131072,
        ),
    ),
}
SMOKE = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
TOL = {"fp32": 2e-3, "bf16": 0.1}


def build(name: str, dtype: torch.dtype, device: str, smoke: bool, layers: int | None = None):
    import transformers as tf

    cls, kw = SHAPES[name]
    kw = {**kw, **(SMOKE if smoke else {})}
    if layers is not None:
        kw["num_hidden_layers"] = layers
    cfg = getattr(tf, cls)(**kw)
    torch.manual_seed(0)
    with torch.device(device):  # random init on the device itself: seconds, not minutes on a CPU
        m = tf.AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype, attn_implementation="eager")
    return m.eval().requires_grad_(False)


def samples(vocab: int, n: int, T: int, start: int, seed: int = 0) -> SampleSet:
    g = np.random.default_rng(seed)
    ss = [Sample(f"p{i}", -1, g.integers(1, vocab, T).astype(np.int64), start, T) for i in range(n)]
    return SampleSet(ss, SampleConfig(source="reference"), "random", "random")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


# ---------------------------------------------------------------- 1. agreement with the CPU


def outputs(model, ss: SampleSet) -> dict[str, np.ndarray]:
    """Every checked quantity of one model on the small case, as float64 arrays."""
    ad = adapter(model)
    s = ss.samples[0]
    heads = list(ad.all_heads())
    sets = [[h] for h in heads[:4]] + [heads[::3], heads[1::2]]
    out = {"head core": HeadSetScorer(model, s, range(ad.n_layers), batch_rows=3).ce(sets)}
    lens = lens_sample(model, s.input_ids, s.positions, s.targets)
    out.update({f"entropy lens {k}": v for k, v in lens.items()})
    cfg = dict(n_boot=10, progress=False)
    out["ablation exact"] = abl.run_matrix(model, ss, abl.MatrixConfig(**cfg))["delta"]
    out["ablation atp"] = abl.run_atp(model, ss, abl.MatrixConfig(method="atp", **cfg))["delta"]
    out["taylor gate"] = taylor.sample_scores(model, s, [], "gate").scores
    rng = np.random.default_rng(0)
    masks = np.stack([keep_mask(ad) & (rng.random((ad.n_layers, ad.max_heads)) > 0.3) for _ in range(6)])
    out["cmaes fitness"] = ModelFitness(model, ss, batch_rows=4)(masks)
    return {k: np.asarray(v.float().cpu() if torch.is_tensor(v) else v, dtype=np.float64) for k, v in out.items()}


def agreement_checks(name: str, dtypes, device: str, smoke: bool) -> list[tuple]:
    cpu = build(name, torch.float32, "cpu", smoke, layers=2)
    ss = samples(adapter(cpu).vocab_size, 2, 48, 16)
    ref = outputs(cpu, ss)
    rows = []
    for dn in dtypes:
        dev_model = build(name, DTYPES[dn], device, smoke, layers=2)
        dev_model.load_state_dict({k: v.to(DTYPES[dn]) for k, v in cpu.state_dict().items()})
        got = outputs(dev_model, ss)
        for k in ref:
            ok = np.isfinite(ref[k])
            diff = float(np.max(np.abs(got[k][ok] - ref[k][ok]))) if ok.any() else 0.0
            finite = bool(np.array_equal(np.isfinite(got[k]), ok))
            rows.append((name, dn, k, diff, TOL[dn], finite and diff <= TOL[dn]))
        del dev_model
    return rows


# ---------------------------------------------------------------- 2. timing


class Straightforward:
    """Full forward of the whole sequence per head set (one set per row), full logits, CE at scored positions."""

    def __init__(self, model, sample: Sample):
        self.model, self.ad = model, adapter(model)
        dev = self.ad.device
        self.ids = torch.as_tensor(sample.input_ids)[None].to(dev)
        self.pos, self.tgt = torch.as_tensor(sample.positions).to(dev), torch.as_tensor(sample.targets).to(dev)

    @torch.no_grad()
    def ce(self, sets, rows: int) -> torch.Tensor:
        out = []
        for i in range(0, len(sets), rows):
            chunk = sets[i : i + rows]
            with head_gates(self.model, gates_for(self.ad, chunk, device=self.ad.device)):
                lg = self.model(input_ids=self.ids.expand(len(chunk), -1)).logits[:, self.pos].float()
            out.append(
                F.cross_entropy(lg.flatten(0, 1), self.tgt.repeat(len(chunk)), reduction="none")
                .view(len(chunk), -1)
                .mean(1)
            )
        return torch.cat(out)

    @torch.no_grad()
    def lens(self) -> torch.Tensor:
        """Entropy of every layer's logits at every position, then the scored ones."""
        out = self.model(input_ids=self.ids, output_hidden_states=True)
        ents = []
        for h in out.hidden_states[1:-1]:
            lp = F.log_softmax(self.ad.lens_logits(h[0]).float(), -1)
            ents.append(-(lp.exp() * lp).sum(-1)[self.pos])
        return torch.stack(ents)


def timings(name: str, dn: str, device: str, smoke: bool, tokens: int, n_time_layers: int, pop: int) -> list[tuple]:
    model = build(name, DTYPES[dn], device, smoke)
    ad = adapter(model)
    ss = samples(ad.vocab_size, 1, tokens, tokens // 2, seed=1)
    s = ss.samples[0]
    layers = sorted({int(x) for x in np.linspace(0, ad.n_layers - 1, n_time_layers)})
    heads = [(l, h) for l in layers for h in range(ad.heads[l].n_heads)]
    rows = ad.max_heads
    ref = Straightforward(model, s)
    rows_out = []
    ref.ce([[heads[0]]], rows)  # warm-up (kernels, allocator)
    _, t_sf = timed(lambda: ref.ce([[h] for h in heads], rows), device)
    cfg = abl.MatrixConfig(layers=layers, batch_rows=rows, n_boot=10, progress=False)
    _, t_ex = timed(lambda: abl.run_matrix(model, ss, cfg), device)
    rows_out.append((name, dn, f"ablation, {len(heads)} heads of layers {layers}", t_ex, t_sf))
    abl.run_atp(model, ss, abl.MatrixConfig(method="atp", n_boot=10, progress=False))
    _, t_atp = timed(lambda: abl.run_atp(model, ss, abl.MatrixConfig(method="atp", n_boot=10, progress=False)), device)
    rows_out.append((name, dn, f"atp, all {ad.n_heads_total} heads vs exact of {len(heads)} heads", t_atp, t_ex))
    _, t_lens = timed(lambda: lens_sample(model, s.input_ids, s.positions, s.targets), device)
    _, t_lens_sf = timed(ref.lens, device)
    rows_out.append((name, dn, "entropy lens", t_lens, t_lens_sf))
    rng = np.random.default_rng(0)
    masks = np.stack([keep_mask(ad) & (rng.random((ad.n_layers, ad.max_heads)) > 0.1) for _ in range(pop)])
    fit = ModelFitness(model, ss, batch_rows=pop, cache=False)
    _, t_fit = timed(lambda: fit(masks), device)
    from btp.headsets import removed_sets

    _, t_fit_sf = timed(lambda: ref.ce(removed_sets(ad, masks), pop), device)
    rows_out.append((name, dn, f"CMA-ES fitness, population {pop}", t_fit, t_fit_sf))
    return rows_out  # the model goes with this frame (the caller empties the CUDA cache)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU: runs everything in seconds")
    p.add_argument("--models", default=",".join(SHAPES), help=f"comma list of {list(SHAPES)}")
    p.add_argument("--dtypes", default="bf16,fp32")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --cpu-smoke)")
    p.add_argument("--tokens", type=int, default=None, help="timed sample length (default 512; smoke 32)")
    p.add_argument("--time-layers", type=int, default=4, help="layers whose heads the exact ablation times")
    p.add_argument("--population", type=int, default=16)
    args = p.parse_args(argv)
    device = args.device or ("cpu" if args.cpu_smoke else "cuda")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device (use --cpu-smoke for the reduced CPU run)")
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 is fp32
    tokens = args.tokens or (32 if args.cpu_smoke else 512)
    names, dtypes = args.models.split(","), args.dtypes.split(",")
    card = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    print(
        f"btp gpu_bench on {card} ({device}), torch {torch.__version__}; models {names}, dtypes {dtypes}"
        + (" [cpu smoke: tiny shapes]" if args.cpu_smoke else "")
    )
    t0 = time.time()
    checks = [r for n in names for r in agreement_checks(n, dtypes, device, args.cpu_smoke)]
    print(f"\n1. agreement with the CPU fp32 reference (small case), {time.time() - t0:.0f}s")
    print(f"  {'model':14} {'dtype':5} {'check':24} {'max|diff|':>10} {'tol':>7}  ok")
    for n, dn, k, d, tol, ok in checks:
        print(f"  {n:14} {dn:5} {k:24} {d:10.2e} {tol:7.0e}  {'ok' if ok else 'FAIL'}")
    t1 = time.time()
    rows = []
    for n in names:
        for dn in dtypes:
            rows += timings(n, dn, device, args.cpu_smoke, tokens, args.time_layers, args.population)
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    print(f"\n2. timing, one sample of {tokens} tokens, full depth, {time.time() - t1:.0f}s")
    print(f"  {'model':14} {'dtype':5} {'what':58} {'btp s':>9} {'other s':>9} {'ratio':>7}")
    for n, dn, what, tb, tr in rows:
        print(f"  {n:14} {dn:5} {what:58} {tb:9.3f} {tr:9.3f} {tb / tr:7.3f}")
    print("  (ratio: btp / the straightforward method; atp's row: atp / exact)")
    bad = [c for c in checks if not c[-1]]
    print(f"\n{len(checks) - len(bad)}/{len(checks)} checks agree; total {time.time() - t0:.0f}s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
