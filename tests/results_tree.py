"""A small but real results tree for the check / plots / notebook tests: the real stages (their `main`s, in this
process) on the embedded model with tiny settings, built once per test session and shared read-only.

What it holds (model smollm2-135m, HF backend, 16 new tokens per sample so that nothing is expensive):
- humaneval: 2 problems x 2 samples (T=0.8), evaluated; entropy lens on all generations (regular, chain_code)
  and on the incorrect ones (regular: a second population); head ablation (regular, all generations, layers
  28-29, knockout with random controls and greedy); Taylor pruning (regular, all generations, 3 iterations);
  CMA-ES search on the Taylor run's samples and split (2 generations of 4, keep 210 heads: the Taylor set's size).
- mbpp: 2 problems x 1 sample (greedy), evaluated; entropy lens and head ablation on all generations (regular),
  so that datasets can be compared.
Generations are used with `--select all`/`incorrect` because the embedded model passes almost nothing.

Use: `from results_tree import results_tree, tree_copy` in a test module; `results_tree` is the tree's root
(`results_tree / MODEL_DIR / "humaneval" / ...`); `tree_copy(tmp_path)` gives a private copy to damage.
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from pathlib import Path

import pytest

MODEL = "smollm2-135m"
MAX_NEW = 16


def _stages(root: Path) -> list[tuple[str, list[str]]]:
    r = ["--results-dir", str(root), "--model", MODEL]
    gen = r + ["--backend", "hf", "--max-tokens", str(MAX_NEW)]
    he, mb = ["--dataset", "humaneval"], ["--dataset", "mbpp"]
    quiet = ["--no-progress"]
    small = ["--num-samples", "2", "--sample-max-tokens", "48"]
    abl = ["--layers", "28,29", "--knockout-ks", "1,2,4", "--random-seeds", "2", "--n-boot", "200"] + quiet
    return [
        ("generate", gen + he + ["--limit", "2", "--n", "2", "--temperature", "0.8"]),
        ("generate", gen + mb + ["--limit", "2", "--n", "1"]),
        ("evaluate", r + he + ["--workers", "2", "--n-boot", "200"]),
        ("evaluate", r + mb + ["--workers", "2", "--n-boot", "200"]),
        ("entropy_lens", r + he + ["--select", "all", "--mode", "regular"] + small + quiet),
        ("entropy_lens", r + he + ["--select", "all", "--mode", "chain_code"] + small + quiet),
        ("entropy_lens", r + he + ["--select", "incorrect", "--mode", "regular"] + small + quiet),
        ("entropy_lens", r + mb + ["--select", "all", "--mode", "regular"] + small + quiet),
        (
            "ablation",
            r + he + ["--select", "all", "--mode", "regular", "--greedy", "--greedy-candidates", "5"] + small + abl,
        ),
        ("ablation", r + mb + ["--select", "all", "--mode", "regular"] + small + abl),
        (
            "taylor",
            r
            + he
            + [
                "--select",
                "all",
                "--mode",
                "regular",
                "--sample-max-tokens",
                "48",
                "--num-iters",
                "3",
                "--prune-per-iter",
                "20",
                "--heldout",
                "1",
            ],
        ),
        # the Taylor run's samples and split: warm start and Taylor-pruned control (210 = 270 - 3 x 20 heads kept)
        (
            "cmaes_search",
            r
            + he
            + [
                "--select",
                "all",
                "--mode",
                "regular",
                "--sample-max-tokens",
                "48",
                "--heldout",
                "1",
                "--budget",
                "210",
                "--popsize",
                "4",
                "--max-generations",
                "2",
                "--control-draws",
                "2",
                "--n-boot",
                "200",
            ]
            + quiet,
        ),
    ]


def build(root: Path, log: list | None = None) -> Path:
    """Run the stages into `root`; returns `root`. `log` receives (stage, seconds)."""
    import importlib

    import torch

    root.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    if os.getloadavg()[0] > (os.cpu_count() or 1):
        # an oversubscribed machine (shared CI runners): OpenMP threads spin-waiting for a core cost far more
        # than a second thread gains (measured 3-6x slower forwards with 2 threads at load 10 on 2 cores)
        torch.set_num_threads(1)
    try:
        for stage, argv in _stages(root):
            mod = importlib.import_module(f"btp.{stage}")
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod.main(argv)
            if log is not None:
                log.append((stage, round(time.perf_counter() - t0, 1)))
    finally:
        torch.set_num_threads(threads)
    return root


def model_dir(root: Path) -> Path:
    dirs = [p for p in root.iterdir() if p.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


@pytest.fixture(scope="session")
def results_tree(tmp_path_factory) -> Path:
    """Built once per session (a module importing this fixture reuses the tree another built). For quick local
    iterations, BTP_TEST_RESULTS_TREE=DIR reuses a tree built earlier by `python tests/results_tree.py DIR`."""
    if os.environ.get("BTP_TEST_RESULTS_TREE"):
        return Path(os.environ["BTP_TEST_RESULTS_TREE"])
    base = tmp_path_factory.getbasetemp() / "results_tree"
    done = base / ".built"
    if not done.exists():
        if base.exists():
            shutil.rmtree(base)
        log: list = []
        build(base / "results", log)
        done.write_text(repr(log))
    return base / "results"


def tree_copy(src: Path, dst: Path) -> Path:
    """A private copy (mtimes kept, so staleness is as in the original)."""
    shutil.copytree(src, dst, copy_function=shutil.copy2)
    return dst


if __name__ == "__main__":  # build a tree by hand: python tests/results_tree.py OUT_DIR
    import sys

    log: list = []
    t = time.perf_counter()
    build(Path(sys.argv[1]), log)
    print(log, f"total {time.perf_counter() - t:.1f}s")
