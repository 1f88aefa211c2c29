"""Benchmark: btp's generation path vs raw vLLM `LLM.generate` vs the transformers backend, same prompts.

    .venv/bin/python scripts/bench_generate.py --limit 8 --max-tokens 128 --repeats 3

One vLLM engine serves both vLLM paths; runs alternate (raw, btp, raw, btp, ...) and the median is
reported. btp's time includes everything the stage does per run: loading problems, building and
tokenizing prompts, the engine call(s), code extraction and the fsynced JSONL writes. btp's overhead
over raw = btp_time / raw_time - 1 (target <= 5%). On a shared, loaded CPU that end-to-end ratio is
noisy, so btp's own work outside the engine call (bookkeeping) is also timed and shown as a share of
the raw time; it does not depend on how fast the engine happens to be running.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from btp.data import load_problems  # noqa: E402
from btp.generate import GenerateConfig, HfBackend, VllmBackend, generate, plan_jobs  # noqa: E402
from btp.store import read_jsonl  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="humaneval")
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--n", type=int, default=1)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument(
        "--hf-threads",
        type=int,
        default=None,
        help="torch threads for the HF run (1 avoids OpenMP spin-waits on an oversubscribed CPU)",
    )
    a = ap.parse_args()

    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from btp.models import resolve_model_path

    ref = resolve_model_path(a.model)
    info = (ref.path, ref.model_id, ref.revision)
    tok = AutoTokenizer.from_pretrained(ref.path)
    base = GenerateConfig(
        model=a.model,
        dataset=a.dataset,
        limit=a.limit,
        n=a.n,
        temperature=a.temperature,
        max_tokens=a.max_tokens,
        dtype=a.dtype,
        enforce_eager=a.enforce_eager,
        backend="vllm",
    )
    jobs, style = plan_jobs(load_problems(a.dataset, limit=a.limit), tok, base, set())
    prompts = [{"prompt_token_ids": j.prompt_token_ids} for j in jobs]
    print(
        f"{len(jobs)} sequences ({style} prompts, {sum(len(j.prompt_token_ids) for j in jobs)} prompt tokens), "
        f"max_tokens={a.max_tokens}, temperature={a.temperature}, model {ref.model_id}",
        flush=True,
    )

    vb = VllmBackend(ref.path, base)
    engine_t: list[float] = []
    run_inner = vb.run

    def timed_run(js, cfg):  # time spent inside btp's engine call, to isolate btp's bookkeeping
        t = time.perf_counter()
        res = run_inner(js, cfg)
        engine_t.append(time.perf_counter() - t)
        return res

    vb.run = timed_run
    load0 = os.getloadavg()[0]
    raw_params = SamplingParams(
        n=1, seed=base.seed, temperature=a.temperature, top_p=base.top_p, max_tokens=a.max_tokens
    )
    vb.llm.generate(prompts[:1], raw_params, use_tqdm=False)  # warm-up (first-call allocations)

    raw_t, btp_t, book_t, raw_tok, btp_tok, agree = [], [], [], 0, 0, None
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):
            t0 = time.perf_counter()
            outs = vb.llm.generate(prompts, raw_params, use_tqdm=False)
            raw_t.append(time.perf_counter() - t0)
            raw_tok = sum(len(o.outputs[0].token_ids) for o in outs)

            cfg = GenerateConfig(**{**base.__dict__, "results_dir": f"{tmp}/btp{r}"})
            engine_t.clear()
            t0 = time.perf_counter()
            path = generate(cfg, engine=vb, tokenizer=tok, model_info=info)
            btp_t.append(time.perf_counter() - t0)
            book_t.append(btp_t[-1] - sum(engine_t))
            recs = read_jsonl(path)
            btp_tok = sum(len(x["output_token_ids"]) for x in recs)
            if a.temperature == 0:
                by = {(x["problem_id"], x["sample"]): x["output_token_ids"] for x in recs}
                agree = sum(
                    by[(j.problem.problem_id, j.sample)] == list(o.outputs[0].token_ids) for j, o in zip(jobs, outs)
                )
        hf_t = hf_tok = None
        if not a.skip_hf:
            import torch

            from btp.models import load_model

            if a.hf_threads:
                torch.set_num_threads(a.hf_threads)

            lm = load_model(a.model, dtype=a.dtype, attn_implementation="sdpa")
            cfg = GenerateConfig(
                **{**base.__dict__, "results_dir": f"{tmp}/hf", "backend": "hf", "batch_size": len(jobs)}
            )
            t0 = time.perf_counter()
            path = generate(cfg, engine=HfBackend(lm.model, lm.tokenizer), tokenizer=tok, model_info=info)
            hf_t = time.perf_counter() - t0
            hf_tok = sum(len(x["output_token_ids"]) for x in read_jsonl(path))

    rt, bt = statistics.median(raw_t), statistics.median(btp_t)
    print(f"\n== results (median of {a.repeats} runs for vLLM paths)")
    raw_runs, btp_runs = [round(x, 3) for x in raw_t], [round(x, 3) for x in btp_t]
    print(f"raw LLM.generate : {rt:8.3f} s  {raw_tok:6d} tok  {raw_tok / rt:8.1f} tok/s   runs {raw_runs}")
    print(f"btp vLLM path    : {bt:8.3f} s  {btp_tok:6d} tok  {btp_tok / bt:8.1f} tok/s   runs {btp_runs}")
    print(f"btp overhead vs raw: {100 * (bt / rt - 1):+.1f}% time end to end (target <= 5%)")
    bk = statistics.median(book_t)
    print(
        f"btp bookkeeping outside the engine call: {bk:.3f} s = {100 * bk / rt:.2f}% of raw time "
        f"(runs {[round(x, 3) for x in book_t]})"
    )
    print(f"load average (1 min) at start / end: {load0:.1f} / {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    if agree is not None:
        print(f"greedy outputs identical (btp vs raw): {agree}/{len(jobs)}")
    if hf_t is not None:
        import torch

        print(
            f"btp HF backend   : {hf_t:8.3f} s  {hf_tok:6d} tok  {hf_tok / hf_t:8.1f} tok/s  "
            f"(batch {len(jobs)}, {torch.get_num_threads()} torch threads)"
        )
        print(f"vLLM (btp) speed-up over HF: {(btp_tok / bt) / (hf_tok / hf_t):.2f}x tok/s")


if __name__ == "__main__":  # vLLM's engine spawns processes
    main()
