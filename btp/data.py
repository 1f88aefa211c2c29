"""Compatibility names for code written before benchmarks became objects: use `btp.benchmarks` instead.

`load_problems(name, ...)` is `btp.benchmarks.get(name).load(...)`; `Problem` and the readers live in
`btp/benchmarks/` beside the data they read.
"""

from __future__ import annotations

from . import benchmarks
from .benchmarks import BENCH_DIR, VENDORED_SHA256, Problem
from .benchmarks.livecodebench import decode_tests as decode_lcb_tests
from .benchmarks.livecodebench import release_files as lcb_release_files
from .benchmarks.mbpp import entry_point as mbpp_entry_point

DATASETS = benchmarks.NAMES


def load_problems(
    dataset: str,
    *,
    limit: int | None = None,
    variant: str | None = None,
    data_file: str | None = None,
    release: str | None = None,
    start_date: str | None = None,
    end_date: str | None = None,
) -> list[Problem]:
    """Problems of a benchmark in benchmark order (see `Benchmark.load`)."""
    return benchmarks.get(dataset).load(
        limit=limit, variant=variant, data_file=data_file, release=release, start_date=start_date, end_date=end_date
    )


__all__ = [
    "BENCH_DIR",
    "DATASETS",
    "VENDORED_SHA256",
    "Problem",
    "decode_lcb_tests",
    "lcb_release_files",
    "load_problems",
    "mbpp_entry_point",
]
