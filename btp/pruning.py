"""A pruned model, generated and judged: the one path btp.pruned's arms and CMA-ES's pass@1 fitness share.

The generation and judging flags every pruned model is run with (`GenFlags`, passed on to btp.generate and
btp.evaluate), the checkpoint of a head set made by weight surgery (`ensure_checkpoint`, cached by a hash of model,
revision, dtype and heads), the two stages run as `python -m` subprocesses of this very btp (`SubprocessRunner`:
stages never import each other, and a separate process gives each vLLM engine its memory back), and the pass
counts per problem read from an evaluations file (`arm_counts`).
"""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from . import benchmarks, cli, results
from .cli import opt
from .store import iter_jsonl

Head = tuple[int, int]


@dataclass
class GenFlags:
    """Generation and judging flags, the same for every arm (passed on to btp.generate / btp.evaluate)."""

    limit: int | None = opt(None, "first N problems (default: all of the dataset)", check=cli.at_least(1))
    n: int = opt(1, "samples per problem", check=cli.at_least(1))
    gen_max_tokens: int = opt(512, "new tokens per sample (every arm)", flag="max-tokens", check=cli.at_least(1))
    repetition_guard: int = opt(
        32,
        "stop a sample once its last N tokens occur 3 times in it (pruned models loop; 0: off)",
        check=cli.at_least(0),
    )
    temperature: float = opt(0.0, "sampling temperature (0: greedy)", check=cli.at_least(0))
    top_p: float = opt(1.0, "nucleus sampling mass", check=cli.fraction)
    backend: str = opt("auto", "vllm | hf | auto (vllm if importable)", choices=("auto", "vllm", "hf"))
    variant: str | None = opt(None, "mbpp variant", choices=benchmarks.VARIANTS)
    prompt_style: str = opt("auto", None, choices=("auto", "chat", "completion"))
    enforce_eager: bool = opt(True, "vLLM: compile (slower start)", flag="no-enforce-eager", invert=True)
    gpu_memory_utilization: float | None = opt(None, "vLLM (default 0.9 on GPU, 0.3 on CPU)", check=cli.fraction)
    batch_size: int = opt(8, "HF backend batch size", check=cli.at_least(1))
    eval_workers: int | None = opt(None, "parallel sandboxes (default: CPU cores)", check=cli.at_least(1))
    eval_timeout: float | None = opt(None, "CPU seconds per test (default: the benchmark's)", check=cli.above(0))

    @property
    def identity(self) -> dict:
        """The flags that change what is generated or judged (batch size, workers and memory do not)."""
        return {
            k: v for k, v in asdict(self).items() if k not in ("batch_size", "eval_workers", "gpu_memory_utilization")
        }

    @property
    def engine(self) -> str:
        """The engine every arm generates with: `auto` is vLLM if importable (as btp.generate resolves it), else
        transformers."""
        if self.backend != "auto":
            return self.backend
        import importlib.util

        return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"

    def generate_args(self, model: str, dataset: str, output: Path, seed: int, dtype: str, backend: str) -> list[str]:
        a = [
            "--model",
            model,
            "--dataset",
            dataset,
            "--output",
            str(output),
            "--n",
            str(self.n),
            "--max-tokens",
            str(self.gen_max_tokens),
            "--temperature",
            str(self.temperature),
            "--top-p",
            str(self.top_p),
            "--seed",
            str(seed),
            "--backend",
            backend,
            "--prompt-style",
            self.prompt_style,
            "--dtype",
            dtype,
            "--batch-size",
            str(self.batch_size),
            "--repetition-guard",
            str(self.repetition_guard),
        ]
        a += (
            _opt("--limit", self.limit)
            + _opt("--variant", self.variant)
            + _opt("--gpu-memory-utilization", self.gpu_memory_utilization)
        )
        return a + (["--enforce-eager"] if self.enforce_eager else [])

    def evaluate_args(self, label: str, dataset: str, generations: Path, seed: int, n_boot: int) -> list[str]:
        return (
            [
                "--model",
                label,
                "--dataset",
                dataset,
                "--input",
                str(generations),
                "--seed",
                str(seed),
                "--n-boot",
                str(n_boot),
            ]
            + _opt("--limit", self.limit)
            + _opt("--variant", self.variant)
            + _opt("--workers", self.eval_workers)
            + _opt("--timeout", self.eval_timeout)
        )


def _opt(flag: str, v) -> list[str]:
    return [] if v is None else [flag, str(v)]


class Runner(Protocol):
    def generate(self, args: list[str]) -> None: ...
    def evaluate(self, args: list[str]) -> None: ...


class SubprocessRunner:
    """The generate and evaluate stages as `python -m` subprocesses of this very btp (stages never import each
    other; a separate process also gives each vLLM engine its memory back)."""

    def _run(self, stage: str, args: list[str]) -> None:
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        cmd = [sys.executable, "-m", f"btp.{stage}", *args]
        print(f"[btp.pruned] $ {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, env=env)

    def generate(self, args: list[str]) -> None:
        self._run("generate", args)

    def evaluate(self, args: list[str]) -> None:
        self._run("evaluate", args)


def ensure_checkpoint(lm, heads: Sequence[Head], results_dir: str, dtype: str, provenance_: dict) -> Path:
    """The cached pruned checkpoint of these heads (made once by weight surgery; written to a temporary folder
    and renamed, so a killed save leaves no half checkpoint)."""
    from .heads import save_pruned

    d = results.checkpoint_dir(results_dir, results.checkpoint_key(lm.model_id, lm.revision, dtype, heads))
    if (d / "btp_pruning.json").exists():
        return d
    tmp = d.with_name(d.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_pruned(
        lm.model,
        lm.tokenizer,
        heads,
        tmp,
        provenance={**provenance_, "base_model": lm.model_id, "base_revision": lm.revision, "dtype": dtype},
    )
    shutil.rmtree(d, ignore_errors=True)
    tmp.rename(d)
    return d


def arm_counts(evaluations: Path, problems: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(samples n, passed c) per problem from an evaluations file (the last verdict of each program)."""
    last = (
        {(r["problem_id"], r["sample"]): bool(r["passed"]) for r in iter_jsonl(evaluations)}
        if evaluations.exists()
        else {}
    )
    n, c = Counter(), Counter()
    for (pid, _), ok in last.items():
        n[pid] += 1
        c[pid] += ok
    return np.array([n[p] for p in problems]), np.array([c[p] for p in problems])


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
