"""Stage: sample completions for a benchmark with vLLM's offline engine or transformers.

`python -m btp.generate --model smollm2-135m --dataset humaneval --n 1 --max-tokens 512`
writes `results/<model-slug>/<dataset>/generations.jsonl`, one record per (problem, sample), with the
exact prompt text and token ids, the output, its token ids and the extracted code. A rerun generates
only the missing pairs. Every (problem, sample) gets its own seed derived from `--seed`, so a resumed
run draws the same samples as an uninterrupted one would (vLLM; the HF backend seeds per batch).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

from tqdm import tqdm

from . import benchmarks, cli
from .benchmarks import Problem
from .cli import opt
from .models import DEFAULT_MODEL
from .prompts import STYLES, build_prompt, encode_prompt, extract
from .results import GENERATIONS, check_runs, dataset_dir
from .store import JsonlStore, provenance

# Config fields that change what a sample is; a resumed file must not mix values of these.
SAMPLE_KEY = ("temperature", "top_p", "max_tokens", "seed", "prompt_style", "chat_template_kwargs",
              "system_prompt", "variant", "backend", "dtype")


@dataclass
class GenerateConfig:
    model: str = opt(DEFAULT_MODEL, "HF id, local folder, or an embedded name")
    dataset: str = opt(benchmarks.DEFAULT, f"one of {benchmarks.NAMES}, or several comma-separated")
    limit: int | None = opt(None, "first N problems")
    n: int = opt(1, "samples per problem")
    temperature: float = opt(0.0, None)
    top_p: float = opt(1.0, None)
    max_tokens: int = opt(512, None)
    seed: int = opt(0, None)
    backend: str = opt("auto", "auto: vllm if importable", choices=("auto", "vllm", "hf"))   # vllm | hf | auto
    results_dir: str = opt("results", "root of the results tree")
    prompt_style: str = opt("auto", None, choices=STYLES)            # auto | chat | completion
    chat_template_kwargs: dict = opt(help='JSON passed to the chat template, e.g. \'{"enable_thinking": false}\'',
                                     factory=dict)
    system_prompt: str | None = opt(None, None)
    variant: str | None = opt(None, "mbpp variant", choices=benchmarks.VARIANTS)
    data_file: str | None = opt(None, "local benchmark file (LiveCodeBench JSONL)")
    release: str = opt("v6", "LiveCodeBench release: vN, vA_vB, release_vN")
    start_date: str | None = opt(None, "LiveCodeBench contest_date >= YYYY-MM[-DD]")
    end_date: str | None = opt(None, "LiveCodeBench contest_date <= YYYY-MM[-DD]")
    # vLLM engine
    tensor_parallel_size: int = opt(1, None)
    max_model_len: int | None = opt(None, None)
    gpu_memory_utilization: float | None = opt(None, "default 0.9 on GPU, 0.3 on CPU")
    dtype: str = opt("auto", "auto | float32 | bfloat16 | float16")
    enforce_eager: bool = opt(False, "vLLM: skip compilation (faster start)")
    # sequences per engine call / write; 0 = all at once
    chunk_size: int = opt(512, "vLLM sequences per call and write; 0: all")
    # transformers backend
    batch_size: int = opt(8, "HF backend batch size")
    device: str | None = opt(None, "HF backend device")


@dataclass
class Job:
    problem: Problem
    sample: int
    prompt: str
    prompt_token_ids: list[int]
    style: str
    seed: int


def sample_seed(seed: int, problem_id: str, sample: int) -> int:
    """A stable per-(problem, sample) seed, independent of which other pairs run alongside."""
    return int.from_bytes(hashlib.sha256(f"{seed}|{problem_id}|{sample}".encode()).digest()[:4], "little") >> 1


def resolve_backend(name: str) -> str:
    if name == "auto":
        return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"
    if name not in ("vllm", "hf"):
        raise ValueError(f"backend must be vllm, hf or auto, got {name!r}")
    return name


def _on_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


# ---------------------------------------------------------------- backends

class VllmBackend:
    """vLLM's offline engine: token-id prompts, one `LLM.generate` per chunk of (problem, sample) pairs."""

    name = "vllm"

    def __init__(self, path: str, cfg: GenerateConfig, llm: Any = None):
        if not _on_gpu():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default grabs far more
        from vllm import LLM

        gpu_util = cfg.gpu_memory_utilization or (0.9 if _on_gpu() else 0.3)
        self.llm = llm or LLM(model=str(path), tensor_parallel_size=cfg.tensor_parallel_size,
                              max_model_len=cfg.max_model_len, gpu_memory_utilization=gpu_util, dtype=cfg.dtype,
                              seed=cfg.seed, enforce_eager=cfg.enforce_eager)

    def run(self, jobs: Sequence[Job], cfg: GenerateConfig) -> list[tuple[str, list[int], str]]:
        from vllm import SamplingParams

        params = [SamplingParams(n=1, seed=j.seed, temperature=cfg.temperature, top_p=cfg.top_p,
                                 max_tokens=cfg.max_tokens) for j in jobs]
        outs = self.llm.generate([{"prompt_token_ids": j.prompt_token_ids} for j in jobs], params,
                                 use_tqdm=len(jobs) > 1)  # vLLM's bar shows live tokens/s
        res = []
        for o in outs:
            c = o.outputs[0]
            res.append((c.text, list(c.token_ids), "stop" if c.finish_reason == "stop" else "length"))
        return res

    def close(self) -> None:
        """Stop the engine's worker processes now, not in an atexit hook after the streams are closed."""
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()


class HfBackend:
    """transformers `generate` on left-padded batches with their attention masks; stops at EOS."""

    name = "hf"

    def __init__(self, model: Any, tokenizer: Any):
        self.model, self.tok = model, tokenizer
        eos = model.generation_config.eos_token_id
        eos = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
            eos.append(tokenizer.eos_token_id)
        if not eos:
            raise ValueError("model and tokenizer define no EOS token; the HF backend could never stop")
        self.eos = eos
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]

    def run(self, jobs: Sequence[Job], cfg: GenerateConfig) -> list[tuple[str, list[int], str]]:
        import torch
        from transformers import GenerationConfig

        width = max(len(j.prompt_token_ids) for j in jobs)
        ids = torch.full((len(jobs), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for i, j in enumerate(jobs):  # left padding: the last prompt token sits at the same column
            ids[i, width - len(j.prompt_token_ids):] = torch.tensor(j.prompt_token_ids)
            mask[i, width - len(j.prompt_token_ids):] = 1
        sample = cfg.temperature > 0
        # explicit values: HF fills unset ones from the model's generation_config (top_k, penalties), vLLM does not
        kw = dict(top_k=0, top_p=cfg.top_p, temperature=cfg.temperature) if sample else {}
        gc = GenerationConfig(max_new_tokens=cfg.max_tokens, do_sample=sample, eos_token_id=self.eos,
                              pad_token_id=self.pad, repetition_penalty=1.0, **kw)
        if sample:
            torch.manual_seed(jobs[0].seed)  # one generator per batch: reproducible for the same batches
        dev = self.model.device
        with torch.no_grad():
            out = self.model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), generation_config=gc)
        res = []
        for row in out[:, width:].tolist():
            stop = next((k for k, t in enumerate(row) if t in self.eos), None)
            toks = row if stop is None else row[: stop + 1]
            res.append((self.tok.decode(toks, skip_special_tokens=True), toks, "length" if stop is None else "stop"))
        return res


# ---------------------------------------------------------------- the stage

def _resolve_model(name: str) -> tuple[str, str, str | None]:
    """(local folder, model id, revision) without loading weights."""
    from .models import resolve_model_path

    r = resolve_model_path(name)
    if isinstance(r, (tuple, list)):
        return str(r[0]), str(r[1]), (r[2] if len(r) > 2 else None)
    return str(r.path), str(r.model_id), getattr(r, "revision", None)


def _check_same_sampling(store: JsonlStore, cfg: dict) -> None:
    """Refuse to append samples drawn with other sampling settings to an existing file."""
    if store.path.exists():
        check_runs(store.path, cfg, SAMPLE_KEY, what="samples",
                   hint="use another --results-dir or delete the file")


def plan_jobs(problems: Sequence[Problem], tokenizer: Any, cfg: GenerateConfig, done: set) -> tuple[list[Job], str]:
    jobs, style = [], cfg.prompt_style
    for p in problems:
        missing = [s for s in range(cfg.n) if (p.problem_id, s) not in done]
        if not missing:
            continue
        text, style = build_prompt(p, tokenizer, cfg.prompt_style, cfg.chat_template_kwargs or None, cfg.system_prompt)
        ids = encode_prompt(text, tokenizer, style)
        jobs += [Job(p, s, text, ids, style, sample_seed(cfg.seed, p.problem_id, s)) for s in missing]
    return jobs, style


def make_record(job: Job, text: str, token_ids: list[int], finish: str) -> dict:
    e = extract(job.problem, text, job.style, job.prompt)
    return {"problem_id": job.problem.problem_id, "sample": job.sample, "prompt": job.prompt,
            "prompt_token_ids": job.prompt_token_ids, "output": text, "output_token_ids": token_ids,
            "reasoning": e.reasoning, "code": e.code, "code_start": e.code_start, "code_end": e.code_end,
            "finish_reason": finish, "prompt_style": job.style, "seed": job.seed}


def _chunks(jobs: list[Job], size: int) -> Iterator[list[Job]]:
    size = size if size > 0 else max(1, len(jobs))
    for i in range(0, len(jobs), size):
        yield jobs[i:i + size]


@dataclass
class Session:
    """What one process loads once and reuses across datasets: tokenizer, engine, model identity."""
    model_info: tuple | None = None   # (local folder, model id, revision)
    tokenizer: Any = None
    engine: Any = None                # VllmBackend | HfBackend, built on first need
    hf_model: Any = None


def _open(cfg: GenerateConfig, sess: Session) -> None:
    if sess.model_info is not None and sess.tokenizer is not None:
        return
    if cfg.backend == "hf" and sess.engine is None:
        from .models import load_model

        lm = load_model(cfg.model, dtype=None if cfg.dtype == "auto" else cfg.dtype, device=cfg.device,
                        attn_implementation="auto")  # generation needs no hooks
        sess.model_info, sess.tokenizer, sess.hf_model = (str(lm.path), lm.model_id, lm.revision), lm.tokenizer, lm.model
    else:
        sess.model_info = sess.model_info or _resolve_model(cfg.model)
        if sess.tokenizer is None:
            from transformers import AutoTokenizer

            sess.tokenizer = AutoTokenizer.from_pretrained(sess.model_info[0])


def generate(cfg: GenerateConfig, *, engine: Any = None, tokenizer: Any = None, model_info: tuple | None = None,
             session: Session | None = None) -> Path:
    """Run the stage; returns the generations.jsonl path. `engine` (a VllmBackend/HfBackend), `tokenizer`
    and `model_info` (path, model id, revision), or a `session`, let callers reuse a loaded model."""
    sess = session or Session(model_info, tokenizer, engine)
    cfg = replace(cfg, backend=resolve_backend(cfg.backend) if sess.engine is None else sess.engine.name)
    bench = benchmarks.get(cfg.dataset)
    if cfg.prompt_style not in STYLES:
        raise ValueError(f"prompt style must be one of {STYLES}")
    if cfg.n < 1 or cfg.max_tokens < 1:
        raise ValueError("--n and --max-tokens must be >= 1")
    problems = bench.load(limit=cfg.limit, variant=cfg.variant, data_file=cfg.data_file, release=cfg.release,
                          start_date=cfg.start_date, end_date=cfg.end_date)
    _open(cfg, sess)
    path, model_id, revision = sess.model_info
    out = dataset_dir(cfg.results_dir, model_id, cfg.dataset) / GENERATIONS
    store = JsonlStore(out, ("problem_id", "sample"))
    conf = asdict(cfg)
    _check_same_sampling(store, conf)
    jobs, style = plan_jobs(problems, sess.tokenizer, cfg, store.done())
    total = len(problems) * cfg.n
    print(f"[btp.generate] {model_id} {cfg.dataset}: {len(problems)} problems x {cfg.n} samples, "
          f"{total - len(jobs)} done, {len(jobs)} to generate ({cfg.backend}, {style} prompts) -> {out}",
          file=sys.stderr)
    if not jobs:
        return out
    if sess.engine is None:
        sess.engine = HfBackend(sess.hf_model, sess.tokenizer) if cfg.backend == "hf" else VllmBackend(path, cfg)
    engine = sess.engine
    store.begin_run(provenance(stage="generate", model=model_id, revision=revision, dataset=cfg.dataset,
                               seed=cfg.seed, config=conf, model_path=path))
    if cfg.backend == "hf":  # similar lengths per batch waste less padding
        jobs.sort(key=lambda j: len(j.prompt_token_ids))
    size = cfg.batch_size if cfg.backend == "hf" else cfg.chunk_size
    n_tok, t0 = 0, time.perf_counter()
    with tqdm(total=len(jobs), desc=f"generate {cfg.dataset}", unit="seq", dynamic_ncols=True) as bar:
        for chunk in _chunks(jobs, size):
            res = engine.run(chunk, cfg)
            store.append([make_record(j, *r) for j, r in zip(chunk, res)])
            n_tok += sum(len(r[1]) for r in res)
            bar.update(len(chunk))
            bar.set_postfix(tok_s=f"{n_tok / (time.perf_counter() - t0):.1f}")
    return out


# ---------------------------------------------------------------- CLI

def _parser() -> argparse.ArgumentParser:
    ap = cli.parser("generate", __doc__.split("\n\n")[0])
    cli.add_common(ap, dataset=False)  # --model, --results-dir, --seed
    cli.add_flags(ap, GenerateConfig)   # the rest, with its defaults and help from the dataclass
    return ap


def parse_config(argv: Sequence[str] | None = None) -> GenerateConfig:
    return cli.config_from(GenerateConfig, cli.parse(_parser(), argv))


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """`--dataset a,b,c` runs several benchmarks on one loaded engine (`--data-file` then only
    applies to those whose data is not vendored: livecodebench)."""
    cfg = parse_config(argv)
    names = [d.strip() for d in cfg.dataset.split(",") if d.strip()]
    bad = [d for d in names if d not in benchmarks.NAMES]
    if bad or not names:
        raise SystemExit(f"--dataset: unknown {bad or cfg.dataset!r}; choose from {benchmarks.NAMES}")
    sess, outs = Session(), []
    try:
        for ds in names:
            data_file = cfg.data_file if len(names) == 1 or not benchmarks.get(ds).vendored else None
            outs.append(generate(replace(cfg, dataset=ds, data_file=data_file), session=sess))
            print(outs[-1])
    finally:
        if hasattr(sess.engine, "close"):
            sess.engine.close()
    return outs


if __name__ == "__main__":  # vLLM's engine spawns processes that re-import this module
    main()
