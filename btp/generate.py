"""Stage: sample completions for a benchmark with vLLM's offline engine, transformers, or a vLLM server.

`python -m btp.generate --model smollm2-135m --dataset humaneval --n 1 --max-tokens 512`
writes `results/<model-slug>/<dataset>/generations.jsonl`, one record per (problem, sample), with the
exact prompt text and token ids, the output, its token ids and the extracted code. A rerun generates
only the missing pairs. Every (problem, sample) gets its own seed derived from `--seed`, so a resumed
run draws the same samples as an uninterrupted one would (vLLM; the HF backend seeds per batch).
`--backend server --base-url URL` sends the same token-id prompts, stops and seeds to an OpenAI-compatible
server (`run_inference.sh serve MODEL`) and keeps the token ids it reports.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from . import benchmarks, cli
from .benchmarks import Problem
from .cli import opt
from .models import DEFAULT_MODEL
from .prompts import STYLES, build_prompt, encode_prompt, extract
from .results import GENERATIONS, check_runs, dataset_dir
from .store import JsonlStore, UserError, provenance

# Config fields that change what a sample is; a resumed file must not mix values of these.
SAMPLE_KEY = (
    "temperature",
    "top_p",
    "max_tokens",
    "seed",
    "prompt_style",
    "chat_template_kwargs",
    "system_prompt",
    "variant",
    "backend",
    "dtype",
    "repetition_guard",
)
REPEATS = 3  # the repetition guard fires when the output's last N tokens occur this often in it


@dataclass
class GenerateConfig:
    model: str = opt(DEFAULT_MODEL, "HF id, local folder, or an embedded name")
    dataset: str = opt(benchmarks.DEFAULT, cli.DATASETS_HELP + " on one loaded engine")
    limit: int | None = opt(None, "first N problems", check=cli.at_least(1))
    n: int = opt(1, "samples per problem", check=cli.at_least(1))
    temperature: float = opt(0.0, "sampling temperature (0: greedy)", check=cli.at_least(0))
    top_p: float = opt(1.0, "nucleus sampling mass", check=cli.fraction)
    max_tokens: int = opt(512, "new tokens per sample (generation length)", check=cli.at_least(1))
    repetition_guard: int = opt(
        0,
        f"stop a sample once its last N tokens occur {REPEATS} times in its output "
        "(finish_reason 'repetition'; 0: off); hf stops there, vllm is cut there afterwards",
        check=cli.at_least(0),
    )
    seed: int = opt(0, "base of the per-(problem, sample) seeds")
    backend: str = opt(
        "auto", "auto: server with --base-url, else vllm if importable", choices=("auto", "vllm", "hf", "server")
    )
    results_dir: str = opt("results", "root of the results tree")
    output: str | None = opt(
        None,
        "write to this JSONL instead of results/<model>/<dataset>/generations.jsonl "
        "(one dataset; e.g. the arms of btp.pruned)",
    )
    prompt_style: str = opt(
        "auto", "auto: chat when the tokenizer has a chat template, else completion", choices=STYLES
    )
    chat_template_kwargs: dict = opt(
        help="JSON passed to the chat template, e.g. '{\"enable_thinking\": false}'", factory=dict
    )
    system_prompt: str | None = opt(None, "system message of chat prompts (default: the template's own)")
    variant: str | None = opt(None, "mbpp variant", choices=benchmarks.VARIANTS)
    data_file: str | None = opt(None, "local benchmark file (LiveCodeBench JSONL)")
    release: str = opt("v6", "LiveCodeBench release: vN, vA_vB, release_vN")
    start_date: str | None = opt(None, "LiveCodeBench contest_date >= YYYY-MM[-DD]")
    end_date: str | None = opt(None, "LiveCodeBench contest_date <= YYYY-MM[-DD]")
    # vLLM engine (offline); a server is sized where it starts (run_inference.sh serve)
    tensor_parallel_size: int = opt(1, "vLLM: GPUs per model (tensor parallel)", check=cli.at_least(1))
    pipeline_parallel_size: int = opt(1, "vLLM: pipeline stages", check=cli.at_least(1))
    data_parallel_size: int = opt(
        1, "offline vLLM refuses >1 in one process: serve with it and use --backend server", check=cli.at_least(1)
    )
    distributed_executor_backend: str | None = opt(
        None, "vLLM workers: mp (one node) or ray (multi-node: a running Ray cluster)", choices=("mp", "ray", "uni")
    )
    max_model_len: int | None = opt(None, "vLLM: context length (default: the model's)", check=cli.at_least(1))
    gpu_memory_utilization: float | None = opt(
        None, "vLLM: memory fraction (default: 0.9 on GPU, 0.3 on CPU)", check=cli.fraction
    )
    dtype: str = opt(
        "auto",
        "auto | float32 | bfloat16 | float16 (auto: the engine's choice; the dtype it loaded is recorded)",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    enforce_eager: bool = opt(False, "vLLM: skip compilation (faster start)")
    # sequences per engine call / write; 0 = all at once
    chunk_size: int = opt(512, "vLLM sequences per call and write; 0: all", check=cli.at_least(0))
    # transformers backend
    batch_size: int = opt(8, "HF backend batch size", check=cli.at_least(1))
    device: str | None = opt(None, "HF backend device (default: cuda when available)")
    # server backend: an OpenAI-compatible completions server (vLLM's api_server), local, remote or balanced
    base_url: str | None = opt(None, "server backend: the server's URL, e.g. http://localhost:8000")
    server_model: str | None = opt(None, "server backend: the name it serves the model under (default: btp's id)")
    max_concurrency: int = opt(8, "server backend: requests in flight at once", check=cli.at_least(1))
    retries: int = opt(
        5,
        "server backend: tries after a transient error (refused, 5xx, timeout); backoff 1, 2, 4.. s",
        check=cli.at_least(0),
    )
    request_timeout: float = opt(600.0, "server backend: seconds one request may take", check=cli.above(0))
    no_progress: bool = opt(False, "no progress bars")
    verbose: bool = opt(False, cli.VERBOSE_HELP)


@dataclass
class Job:
    problem: Problem
    sample: int
    prompt: str
    prompt_token_ids: list[int]
    style: str
    seed: int
    stops: tuple[str, ...] = ()  # the benchmark's stop strings (completion prompts; chat answers end their turn)


@dataclass(frozen=True)
class Completion:
    """One generated answer: its text, the exact output token ids, and why it ended (stop | length)."""

    text: str
    token_ids: list[int]
    finish_reason: str


def sample_seed(seed: int, problem_id: str, sample: int) -> int:
    """A stable per-(problem, sample) seed, independent of which other pairs run alongside."""
    return int.from_bytes(hashlib.sha256(f"{seed}|{problem_id}|{sample}".encode()).digest()[:4], "little") >> 1


def resolve_backend(name: str, base_url: str | None = None) -> str:
    if name == "auto":
        return "server" if base_url else "vllm" if importlib.util.find_spec("vllm") is not None else "hf"
    if name not in ("vllm", "hf", "server"):
        raise ValueError(f"backend must be vllm, hf, server or auto, got {name!r}")
    if name == "server" and not base_url:
        raise UserError("--backend server needs --base-url — e.g. http://localhost:8000 (run_inference.sh serve)")
    return name


def _on_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


# ---------------------------------------------------------------- repetition guard


def guard_cut(tokens: Sequence[int], n: int, times: int = REPEATS) -> int | None:
    """The length of the shortest prefix of `tokens` whose last `n` tokens occur `times` times in it (overlapping
    occurrences count), or None: where a degenerate loop is cut. n <= 0: never."""
    if n <= 0:
        return None
    seen: dict[tuple, int] = {}
    for t in range(n, len(tokens) + 1):
        key = tuple(tokens[t - n : t])
        seen[key] = seen.get(key, 0) + 1
        if seen[key] >= times:
            return t
    return None


def apply_guard(text: str, tokens: list[int], finish: str, n: int, decode) -> Completion:
    """An output cut where the repetition guard fires (finish_reason `repetition`), else unchanged."""
    cut = guard_cut(tokens, n)
    if cut is None or cut >= len(tokens) and finish == "stop":
        return Completion(text, tokens, finish)
    toks = tokens[:cut]
    return Completion(decode(toks), toks, "repetition")


# ---------------------------------------------------------------- backends


def _engine_dtype(cfg: GenerateConfig, sess: Session, path: str) -> str:
    """`--dtype auto` made definite before an engine loads, so that the dtype recorded is the one computed in:
    the HF backend's model as loaded (fp32 on CPU, bf16 on GPU); vLLM's the checkpoint's own (no per-weight casts,
    none of vLLM's per-weight warnings), float16 as bfloat16 on a CPU."""
    if cfg.dtype != "auto" or cfg.backend == "server":  # a server's dtype was chosen where it started
        return cfg.dtype
    if sess.engine is not None:  # given by the caller: as it says (an engine that does not say stays "auto")
        return getattr(sess.engine, "dtype", None) or cfg.dtype
    if sess.hf_model is not None:
        return _dtype_name(sess.hf_model.dtype) or "auto"
    from transformers import AutoConfig

    mc = AutoConfig.from_pretrained(path)
    stored = _dtype_name(getattr(mc, "dtype", None) or getattr(mc, "torch_dtype", None)) or "auto"
    return "bfloat16" if stored == "float16" and not _on_gpu() else stored


def _dtype_name(dtype: Any) -> str | None:
    """ "bfloat16" for torch.bfloat16 or "bfloat16"; None when unknown."""
    return None if dtype is None else str(dtype).removeprefix("torch.")


class VllmBackend:
    """vLLM's offline engine: token-id prompts, one `LLM.generate` per chunk of (problem, sample) pairs."""

    name = "vllm"

    def __init__(self, path: str, cfg: GenerateConfig, llm: Any = None):
        if cfg.data_parallel_size > 1:
            raise UserError(
                f"--data-parallel-size {cfg.data_parallel_size}: vLLM's offline engine refuses data parallelism in "
                "one process — serve the model with it (run_inference.sh serve MODEL --data-parallel-size N) "
                "and generate with --backend server --base-url URL"
            )
        if not _on_gpu():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default grabs far more
        from vllm import LLM

        gpu_util = cfg.gpu_memory_utilization or (0.9 if _on_gpu() else 0.3)
        self.llm = llm or LLM(
            model=str(path),
            tensor_parallel_size=cfg.tensor_parallel_size,
            pipeline_parallel_size=cfg.pipeline_parallel_size,
            distributed_executor_backend=cfg.distributed_executor_backend,
            max_model_len=cfg.max_model_len,
            gpu_memory_utilization=gpu_util,
            dtype=cfg.dtype,
            seed=cfg.seed,
            enforce_eager=cfg.enforce_eager,
        )
        # the dtype the engine loaded (vLLM's "auto" resolves by the checkpoint and the platform), for provenance
        mc = getattr(getattr(self.llm, "llm_engine", None), "model_config", None)
        self.dtype = _dtype_name(getattr(mc, "dtype", None) or (None if cfg.dtype == "auto" else cfg.dtype))

    def run(self, jobs: Sequence[Job], cfg: GenerateConfig) -> list[Completion]:
        from vllm import SamplingParams

        # the stop string stays in the text, so that the text is the decoded token ids (whose last token holds it)
        params = [
            SamplingParams(
                n=1,
                seed=j.seed,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                max_tokens=cfg.max_tokens,
                stop=list(j.stops) or None,
                include_stop_str_in_output=True,
            )
            for j in jobs
        ]
        outs = self.llm.generate(
            [{"prompt_token_ids": j.prompt_token_ids} for j in jobs],
            params,
            use_tqdm=len(jobs) > 1 and not cfg.no_progress,
        )  # vLLM's bar shows live tokens/s
        res = []
        decode = lambda t: self.llm.get_tokenizer().decode(t, skip_special_tokens=True)
        for o in outs:
            c = o.outputs[0]
            # vLLM has no per-request stopping hook: the guard cuts afterwards, where hf would have stopped
            res.append(
                apply_guard(
                    c.text,
                    list(c.token_ids),
                    "stop" if c.finish_reason == "stop" else "length",
                    cfg.repetition_guard,
                    decode,
                )
            )
        return res

    def close(self) -> None:
        """Stop the engine's worker processes now, not in an atexit hook after the streams are closed."""
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()


class ServerBackend:
    """An OpenAI-compatible completions server (vLLM's api_server): the offline engine's token-id prompts, seeds,
    stop strings and sampling values, sent explicitly (a server fills unset ones from the model's
    generation_config), `--max-concurrency` requests at once with retries; the prompt and output token ids are
    the ones the server reports (`return_token_ids`), and a prompt it fed otherwise than btp's ids is refused."""

    name = "server"

    def __init__(self, cfg: GenerateConfig, model_id: str, tokenizer: Any, client: Any = None):
        from .service import Client

        self.client = client or Client(cfg.base_url, retries=cfg.retries, timeout=cfg.request_timeout)
        self.tok, self.url = tokenizer, self.client.base_url
        served = {m["id"]: m for m in self.client.get("/v1/models")["data"]}
        self.model = cfg.server_model or model_id
        if self.model not in served:
            raise UserError(
                f"server {self.url} serves {sorted(served)}, not {self.model!r} — pass --server-model NAME "
                "(and --model for the tokenizer btp builds the prompts with)"
            )
        self.root = served[self.model].get("root")
        self.version = self._ask("/version", None, "version")  # vLLM's; None where a server has no such path

    def stamp(self, job: Job | None) -> dict:
        """What the records came from: URL, served name and its root, the server's version, and whether the
        server tokenises btp's first prompt text as btp does (btp sends its own ids either way)."""
        return {
            "url": self.url,
            "model": self.model,
            "root": self.root,
            "version": self.version,
            "tokenizer_agrees": None if job is None else self._tokenizer_agrees(job),
        }

    def _ask(self, path: str, body: dict | None, key: str) -> Any:
        """`key` of a vLLM-only endpoint's answer, None where the server has no such endpoint."""
        from .service import ServerGone

        try:
            return self.client.request(path, body)[key]
        except ServerGone:
            raise
        except (UserError, KeyError, TypeError):
            return None

    def _tokenizer_agrees(self, job: Job) -> bool | None:
        body = {"model": self.model, "prompt": job.prompt, "add_special_tokens": job.style == "completion"}
        theirs = self._ask("/tokenize", body, "tokens")
        if theirs is None:
            return None
        if theirs != job.prompt_token_ids:
            at = next((i for i, (a, b) in enumerate(zip(theirs, job.prompt_token_ids)) if a != b), len(theirs))
            print(
                f"[btp.generate] warning: {self.url} tokenises the prompt of {job.problem.problem_id} otherwise than "
                f"btp's tokenizer (first difference at token {at}); btp sends its own token ids",
                file=sys.stderr,
            )
        return theirs == job.prompt_token_ids

    def _one(self, job: Job, cfg: GenerateConfig) -> Completion:
        body = {
            "model": self.model,
            "prompt": job.prompt_token_ids,
            "n": 1,
            "seed": job.seed,
            "temperature": cfg.temperature,
            "top_p": cfg.top_p,
            "top_k": 0,
            "min_p": 0.0,
            "repetition_penalty": 1.0,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "max_tokens": cfg.max_tokens,
            "stop": list(job.stops) or None,
            "include_stop_str_in_output": True,  # as the offline engine: the text is the decoded token ids
            "skip_special_tokens": True,
            "return_token_ids": True,
        }
        pid = job.problem.problem_id
        try:
            c = self.client.post("/v1/completions", body)["choices"][0]
        except UserError as e:
            if len(job.stops) > 4 and "body.stop" in str(e):  # vLLM's default limit
                raise UserError(
                    f"server {self.url} takes at most 4 stop strings, {job.problem.dataset} has {len(job.stops)} — "
                    "start it with VLLM_MAX_STOP_STRINGS=32 in its environment (run_inference.sh serve does)"
                ) from None
            raise
        if c.get("prompt_token_ids") is None or c.get("token_ids") is None:
            raise UserError(f"server {self.url} reports no token ids — serve with vLLM >= 0.10.2 (return_token_ids)")
        if list(c["prompt_token_ids"]) != job.prompt_token_ids:
            raise UserError(f"server {self.url} fed {pid} other prompt ids than btp sent — check the served model")
        if c.get("finish_reason") not in ("stop", "length"):
            raise UserError(f"server {self.url} ended {pid} with {c.get('finish_reason')!r} — rerun to resume")
        decode = lambda t: self.tok.decode(t, skip_special_tokens=True)
        return apply_guard(c["text"], list(c["token_ids"]), c["finish_reason"], cfg.repetition_guard, decode)

    def stream(self, jobs: Sequence[Job], cfg: GenerateConfig) -> Iterator[list[tuple[Job, Completion]]]:
        """[(job, completion)] as each request finishes: a record is saved as soon as its answer is in."""
        from .service import bounded_map

        for j, c in bounded_map(lambda j: self._one(j, cfg), jobs, cfg.max_concurrency):
            yield [(j, c)]

    def run(self, jobs: Sequence[Job], cfg: GenerateConfig) -> list[Completion]:
        got = {id(j): c for pairs in self.stream(jobs, cfg) for j, c in pairs}
        return [got[id(j)] for j in jobs]


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
        self.dtype = _dtype_name(getattr(model, "dtype", None))  # as models.load_model resolved it: never "auto"

    def run(self, jobs: Sequence[Job], cfg: GenerateConfig) -> list[Completion]:
        import torch
        from transformers import GenerationConfig

        width = max(len(j.prompt_token_ids) for j in jobs)
        ids = torch.full((len(jobs), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for i, j in enumerate(jobs):  # left padding: the last prompt token sits at the same column
            ids[i, width - len(j.prompt_token_ids) :] = torch.tensor(j.prompt_token_ids)
            mask[i, width - len(j.prompt_token_ids) :] = 1
        sample = cfg.temperature > 0
        # explicit values: HF fills unset ones from the model's generation_config (top_k, penalties), vLLM does not
        kw = dict(top_k=0, top_p=cfg.top_p, temperature=cfg.temperature) if sample else {}
        stop_strings = sorted({s for j in jobs for s in j.stops})
        if stop_strings:
            kw["stop_strings"] = stop_strings
        gc = GenerationConfig(
            max_new_tokens=cfg.max_tokens,
            do_sample=sample,
            eos_token_id=self.eos,
            pad_token_id=self.pad,
            repetition_penalty=1.0,
            **kw,
        )
        criteria = [_GuardStop(cfg.repetition_guard, width)] if cfg.repetition_guard > 0 else None
        if sample:
            torch.manual_seed(jobs[0].seed)  # one generator per batch: reproducible for the same batches
        dev = self.model.device
        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids.to(dev),
                attention_mask=mask.to(dev),
                generation_config=gc,
                stopping_criteria=criteria,
                **({"tokenizer": self.tok} if stop_strings else {}),
            )
        # decoded as samples.char_to_token_span decodes: character offsets into it are token positions
        decode = lambda t: self.tok.decode(t, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        res = []
        for j, row in zip(jobs, out[:, width:].tolist()):
            stop = next((k for k, t in enumerate(row) if t in self.eos), None)
            toks = row if stop is None else row[: stop + 1]
            at = self._stop_at(toks, j.stops)
            if at is not None:  # the row stopped at a stop string: what follows it is padding
                toks, stop = toks[:at], at - 1
            res.append(
                apply_guard(decode(toks), toks, "length" if stop is None else "stop", cfg.repetition_guard, decode)
            )
        return res

    def _stop_at(self, toks: list[int], stops: Sequence[str]) -> int | None:
        """The shortest prefix length of `toks` whose text holds a stop string (as vLLM stops), None if none does."""
        dec = lambda k: self.tok.decode(
            toks[:k],
            skip_special_tokens=True,  # noqa: E731
            clean_up_tokenization_spaces=False,
        )
        if not stops or not any(s in dec(len(toks)) for s in stops):
            return None
        lo, hi = 1, len(toks)
        while lo < hi:
            mid = (lo + hi) // 2
            if any(s in dec(mid) for s in stops):
                hi = mid
            else:
                lo = mid + 1
        return lo


class _GuardStop:
    """transformers stopping criterion of the repetition guard: per row, counts each new trailing n-gram once
    (incremental, so a step costs O(n) per row); a row stops when its trailing n-gram reaches `REPEATS`."""

    def __init__(self, n: int, start: int):
        self.n, self.start, self.seen, self.done = n, start, [], []

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        rows = input_ids[:, self.start :]
        if not self.seen:
            self.seen, self.done = [{} for _ in range(rows.shape[0])], [False] * rows.shape[0]
        if rows.shape[1] >= self.n:
            for b, tail in enumerate(rows[:, -self.n :].tolist()):
                key = tuple(tail)
                self.seen[b][key] = self.seen[b].get(key, 0) + 1
                self.done[b] = self.done[b] or self.seen[b][key] >= REPEATS
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)


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
        check_runs(store.path, cfg, SAMPLE_KEY, what="samples", hint="use another --results-dir or delete the file")


def plan_jobs(problems: Sequence[Problem], tokenizer: Any, cfg: GenerateConfig, done: set) -> tuple[list[Job], str]:
    jobs, style = [], cfg.prompt_style
    for p in problems:
        missing = [s for s in range(cfg.n) if (p.problem_id, s) not in done]
        if not missing:
            continue
        text, style = build_prompt(p, tokenizer, cfg.prompt_style, cfg.chat_template_kwargs or None, cfg.system_prompt)
        ids = encode_prompt(text, tokenizer, style)
        stops = completion_stops(p.dataset, style)
        jobs += [Job(p, s, text, ids, style, sample_seed(cfg.seed, p.problem_id, s), stops) for s in missing]
    return jobs, style


def completion_stops(dataset: str, style: str) -> tuple[str, ...]:
    """Where the engine stops a completion: the benchmark's stop strings (the code the prompt opened ends there);
    none for chat prompts, whose answers end their turn."""
    return tuple(benchmarks.get(dataset).stops) if style == "completion" else ()


def make_record(job: Job, c: Completion) -> dict:
    e = extract(job.problem, c.text, job.style, job.prompt)
    return {
        "problem_id": job.problem.problem_id,
        "sample": job.sample,
        "prompt": job.prompt,
        "prompt_token_ids": job.prompt_token_ids,
        "output": c.text,
        "output_token_ids": c.token_ids,
        "reasoning": e.reasoning,
        "code": e.code,
        "code_start": e.code_start,
        "code_end": e.code_end,
        "finish_reason": c.finish_reason,
        "prompt_style": job.style,
        "seed": job.seed,
    }


def _finished(engine: Any, chunk: list[Job], cfg: GenerateConfig) -> Iterable[list[tuple[Job, Completion]]]:
    """Lists of (job, completion) to save: as each finishes where the engine streams (a server), else the chunk."""
    if hasattr(engine, "stream"):
        return engine.stream(chunk, cfg)
    return [list(zip(chunk, engine.run(chunk, cfg)))]


def _chunks(jobs: list[Job], size: int) -> Iterator[list[Job]]:
    size = size if size > 0 else max(1, len(jobs))
    for i in range(0, len(jobs), size):
        yield jobs[i : i + size]


@dataclass
class Session:
    """What one process loads once and reuses across datasets: tokenizer, engine, model identity."""

    model_info: tuple | None = None  # (local folder, model id, revision)
    tokenizer: Any = None
    engine: Any = None  # VllmBackend | HfBackend, built on first need
    hf_model: Any = None


def _open(cfg: GenerateConfig, sess: Session, weights: bool = True) -> None:
    if sess.model_info is not None and sess.tokenizer is not None:
        return
    if cfg.backend == "hf" and sess.engine is None and weights:
        from .models import load_model

        lm = load_model(
            cfg.model, dtype=None if cfg.dtype == "auto" else cfg.dtype, device=cfg.device, attn_implementation="auto"
        )  # generation needs no hooks
        sess.model_info, sess.tokenizer, sess.hf_model = (
            (str(lm.path), lm.model_id, lm.revision),
            lm.tokenizer,
            lm.model,
        )
    else:
        sess.model_info = sess.model_info or _resolve_model(cfg.model)
        if sess.tokenizer is None:
            from transformers import AutoTokenizer

            sess.tokenizer = AutoTokenizer.from_pretrained(sess.model_info[0])


def generate(
    cfg: GenerateConfig,
    *,
    engine: Any = None,
    tokenizer: Any = None,
    model_info: tuple | None = None,
    session: Session | None = None,
    check_only: bool = False,
) -> Path:
    """Run the stage; returns the generations.jsonl path. `engine` (a VllmBackend/HfBackend), `tokenizer`
    and `model_info` (path, model id, revision), or a `session`, let callers reuse a loaded model.
    `check_only` (`--check-done`): generate nothing, load no weights; exit cli.NOT_DONE when samples are missing."""
    sess = session or Session(model_info, tokenizer, engine)
    backend = resolve_backend(cfg.backend, cfg.base_url) if sess.engine is None else sess.engine.name
    cfg = replace(cfg, backend=backend)
    bench = benchmarks.get(cfg.dataset)
    if cfg.prompt_style not in STYLES:
        raise ValueError(f"prompt style must be one of {STYLES}")
    if cfg.n < 1 or cfg.max_tokens < 1:
        raise ValueError("--n and --max-tokens must be >= 1")
    problems = bench.load(
        limit=cfg.limit,
        variant=cfg.variant,
        data_file=cfg.data_file,
        release=cfg.release,
        start_date=cfg.start_date,
        end_date=cfg.end_date,
    )
    _open(cfg, sess, weights=not check_only)
    path, model_id, revision = sess.model_info
    # the dtype the engine computes in, resolved before it loads: recorded in the config (a sample's identity)
    cfg = replace(cfg, dtype=_engine_dtype(cfg, sess, path))
    out = Path(cfg.output) if cfg.output else dataset_dir(cfg.results_dir, model_id, cfg.dataset) / GENERATIONS
    out.parent.mkdir(parents=True, exist_ok=True)
    store = JsonlStore(out, ("problem_id", "sample"))
    conf = asdict(cfg)
    _check_same_sampling(store, conf)
    jobs, style = plan_jobs(problems, sess.tokenizer, cfg, store.done())
    total = len(problems) * cfg.n
    print(
        f"[btp.generate] {model_id} {cfg.dataset}: {len(problems)} problems x {cfg.n} samples, "
        f"{total - len(jobs)} done, {len(jobs)} to generate ({cfg.backend}, {style} prompts) -> {out}",
        file=sys.stderr,
    )
    if not jobs:
        return out
    if check_only:
        cli.not_done("generate", f"{len(jobs)} of {total} {cfg.dataset} samples to generate in {out}")
    cli.interrupt_note(
        lambda: f"{len(store.done())}/{total} {cfg.dataset} samples generated and saved in {out}; rerun to resume"
    )
    if sess.engine is None:
        if cfg.backend == "server":
            sess.engine = ServerBackend(cfg, model_id, sess.tokenizer)
        else:
            sess.engine = HfBackend(sess.hf_model, sess.tokenizer) if cfg.backend == "hf" else VllmBackend(path, cfg)
    engine = sess.engine
    server = {"server": engine.stamp(jobs[0])} if engine.name == "server" else {}
    store.begin_run(
        provenance(
            stage="generate",
            model=model_id,
            revision=revision,
            dataset=cfg.dataset,
            seed=cfg.seed,
            config=conf,
            model_path=path,
            dtype=getattr(engine, "dtype", None),  # what the engine computes in (config.dtype: as asked)
            prompt_style=style,
            stop=list(completion_stops(cfg.dataset, style)),
            **server,
        )
    )
    if cfg.backend == "hf":  # similar lengths per batch waste less padding
        jobs.sort(key=lambda j: len(j.prompt_token_ids))
    size = cfg.batch_size if cfg.backend == "hf" else cfg.chunk_size
    n_tok, t0 = 0, time.perf_counter()
    bar = tqdm(total=len(jobs), desc=f"generate {cfg.dataset}", unit="seq", dynamic_ncols=True, disable=cfg.no_progress)
    with bar:
        for chunk in _chunks(jobs, size):
            for pairs in _finished(engine, chunk, cfg):
                store.append([make_record(j, c) for j, c in pairs])
                n_tok += sum(len(c.token_ids) for _, c in pairs)
                bar.update(len(pairs))
                bar.set_postfix(tok_s=f"{n_tok / (time.perf_counter() - t0):.1f}")
    return out


# ---------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    ap = cli.parser("generate", __doc__.split("\n\n")[0])
    cli.add_common(ap, dataset=False)  # --model, --results-dir, --seed
    cli.add_flags(ap, GenerateConfig)  # the rest, with its defaults and help from the dataclass
    return ap


def parse_config(argv: Sequence[str] | None = None) -> GenerateConfig:
    return cli.config_from(GenerateConfig, cli.parse(_parser(), argv))


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """`--dataset a,b,c` runs several benchmarks on one loaded engine (`--data-file` then only
    applies to those whose data is not vendored: livecodebench)."""
    ap = _parser()
    cli.add_check_done(ap)
    args = cli.parse(ap, argv)
    cfg = cli.config_from(GenerateConfig, args)
    names = [d.strip() for d in cfg.dataset.split(",") if d.strip()]
    bad = [d for d in names if d not in benchmarks.NAMES]
    if bad or not names:
        raise SystemExit(
            f"unknown --dataset {', '.join(bad) or cfg.dataset!r} — choose from {', '.join(benchmarks.NAMES)}"
        )
    if cfg.output and len(names) > 1:
        raise SystemExit("--output takes one --dataset — give one, or leave --output out")
    sess, outs = Session(), []
    try:
        for ds in names:
            data_file = cfg.data_file if len(names) == 1 or not benchmarks.get(ds).vendored else None
            outs.append(
                generate(replace(cfg, dataset=ds, data_file=data_file), session=sess, check_only=args.check_done)
            )
            print(outs[-1])
    finally:
        if hasattr(sess.engine, "close"):
            sess.engine.close()
    return outs


if __name__ == "__main__":  # vLLM's engine spawns processes that re-import this module
    cli.entry("generate", main)
