"""The benchmarks: one module per benchmark beside its data, one registry.

`get(name)` gives the `Benchmark` that owns everything the name means (loading, size, prompts, stops,
reference output, program assembly and judging rules, timeout); `NAMES` lists them in display order.
Adding a benchmark: a module defining `BENCHMARK` and one line in `_MODULES`.
"""

from __future__ import annotations

from ..store import UserError
from . import humaneval, livecodebench, mbpp
from .base import BENCH_DIR, LOAD_OPTIONS, Benchmark, Problem

_MODULES = (humaneval, mbpp, livecodebench)
_REGISTRY: dict[str, Benchmark] = {b.name: b for b in sorted((m.BENCHMARK for m in _MODULES), key=lambda b: b.order)}
if len(_REGISTRY) != len(_MODULES) or len({b.order for b in _REGISTRY.values()}) != len(_MODULES):
    raise ImportError("btp.benchmarks: two modules share a benchmark name or display order")
NAMES: tuple[str, ...] = tuple(_REGISTRY)  # display order: tables, plots, CLI choices
DEFAULT: str = humaneval.BENCHMARK.name  # what `--dataset` means when not given
VARIANTS: tuple[str, ...] = tuple(v for b in _REGISTRY.values() for v in b.variants)  # every `--variant` choice
# sha256 of the vendored files (also in README.md); tests check them.
VENDORED_SHA256 = {
    "HumanEval.jsonl.gz": "b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef",
    "mbpp.jsonl": "ccf64ceae9c5403bf50a044cb6d505bfd2a2963ee58338ba268fd65beab92a9f",
    "sanitized-mbpp.json": "ca95deaa9a01ef0a6f439f88bcf0dd3db3563d22f22aad6cae04ebb9a8d8c8e9",
}


def get(name: str) -> Benchmark:
    """The benchmark called `name`; ValueError naming the known ones otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise UserError(f"unknown dataset {name!r} — choose from {', '.join(NAMES)}") from None


def all() -> tuple[Benchmark, ...]:  # noqa: A001 - `benchmarks.all()` reads as intended
    """Every benchmark, in display order."""
    return tuple(_REGISTRY.values())


__all__ = [
    "BENCH_DIR",
    "DEFAULT",
    "LOAD_OPTIONS",
    "NAMES",
    "VARIANTS",
    "VENDORED_SHA256",
    "Benchmark",
    "Problem",
    "all",
    "get",
]
