"""LiveCodeBench (Jain et al. 2024): contest problems, stdin programs (AtCoder, Codeforces) or LeetCode-style
functions. Not vendored (release v6 is ~134 MB): read from the hub files of `livecodebench/code_generation_lite`
(plain JSONL, no loading script, which `datasets>=4` refuses) or from a local JSONL in the same format.

Prompts follow LiveCodeBench's own wording; judging follows its harness: every test runs after LCB's imports,
stdin outputs are compared line by line (numbers as Decimals), functions are called as methods of
`Solution` when the code defines it and their value (tuples as lists) must equal the expected JSON.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import re
import zlib
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from ..sandbox import Program
from ..store import MalformedFileError
from .base import Benchmark, Problem, need, read_jsonl

REPO = "livecodebench/code_generation_lite"
MAX_RELEASE = 6
DEFAULT_RELEASE = "v6"  # the 175 problems new in v6 (contest dates 2025-01..2025-04)
DEFAULT_SIZE = 175

# LiveCodeBench's own wording (lcb_runner/prompts/code_generation.py, generic chat style).
SYSTEM = (
    "You are an expert Python programmer. You will be given a question (problem specification) and will "
    "generate a correct Python program that matches the specification and passes all tests."
)
WITH_STARTER = (
    "You will use the following starter code to write the solution to the problem and enclose your "
    "code within delimiters."
)
WITHOUT_STARTER = (
    "Read the inputs from stdin solve the problem and write the answer to stdout (do not directly "
    "test on the sample inputs). Enclose your code within delimiters as follows. Ensure that when "
    "the python program runs, it reads the inputs, runs the algorithm and writes output to STDOUT."
)
STOPS = ("\n```",)

# LiveCodeBench runs stdin/functional programs after these imports; the same here, so programs that rely
# on them (e.g. `List`, `deque`, `inf` without importing) behave as under LCB's own harness.
MODULES = (
    "string",
    "re",
    "datetime",
    "collections",
    "heapq",
    "bisect",
    "copy",
    "math",
    "random",
    "statistics",
    "itertools",
    "functools",
    "operator",
    "io",
    "sys",
    "json",
    "builtins",
    "typing",
)
PRELUDE = (
    "".join(f"from {m} import *\n" for m in MODULES)
    + "".join(f"import {m}\n" for m in MODULES if m not in ("builtins", "typing"))
    + "sys.setrecursionlimit(50000)\n"
)


# ---------------------------------------------------------------- reading


class _StrOnly(pickle.Unpickler):
    """LCB private tests are a pickled JSON *string*; refuse anything that would import code."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} in LCB test data")


def decode_tests(raw: str | list, where: str = "") -> list[dict]:
    """Public/private LCB tests: a JSON list, or base64(zlib(pickle(JSON string)))."""
    if isinstance(raw, list):
        tests = raw
    else:
        try:
            tests = json.loads(raw)
        except json.JSONDecodeError:
            try:
                blob = zlib.decompress(base64.b64decode(raw))
                tests = json.loads(_StrOnly(io.BytesIO(blob)).load())
            except Exception as e:  # noqa: BLE001 - any failure is a malformed record
                raise MalformedFileError(f"{where}: tests are neither JSON nor base64/zlib/pickle ({e})") from None
    if not isinstance(tests, list) or not all(isinstance(t, dict) and {"input", "output"} <= t.keys() for t in tests):
        raise MalformedFileError(f"{where}: tests must be a list of {{input, output, testtype}} objects")
    return [{"input": t["input"], "output": t["output"], "testtype": t.get("testtype", "stdin")} for t in tests]


def release_files(release: str) -> list[str]:
    """Hub files of a release, as LiveCodeBench names them: `release_vN` = cumulative v1..vN,
    `vN` = only the problems new in vN, `vA_vB` = new in vA..vB. v1 lives in `test.jsonl`."""
    name = lambda k: "test.jsonl" if k == 1 else f"test{k}.jsonl"  # noqa: E731
    m = re.fullmatch(r"release_v(\d+)|v(\d+)|v(\d+)_v(\d+)|release_latest", release)
    if not m:
        raise ValueError(f"unknown LiveCodeBench release {release!r} (use vN, vA_vB, release_vN)")
    if release == "release_latest":
        lo, hi = 1, MAX_RELEASE
    elif m.group(1):
        lo, hi = 1, int(m.group(1))
    elif m.group(2):
        lo = hi = int(m.group(2))
    else:
        lo, hi = int(m.group(3)), int(m.group(4))
    if not 1 <= lo <= hi <= MAX_RELEASE:
        raise ValueError(f"LiveCodeBench release {release!r} out of range v1..v{MAX_RELEASE}")
    return [name(k) for k in range(lo, hi + 1)]


def _hub_paths(release: str) -> list[Path]:
    from huggingface_hub import hf_hub_download

    paths = []
    for f in release_files(release):
        try:
            paths.append(Path(hf_hub_download(REPO, f, repo_type="dataset")))
        except Exception as e:  # noqa: BLE001 - offline, gated, renamed: all need the same hint
            raise RuntimeError(
                f"could not fetch {f} of the dataset {REPO} from the Hugging Face hub "
                f"({type(e).__name__}: {e}); download it elsewhere and pass it as data_file "
                f"(--data-file)"
            ) from e
    return paths


def _date(s: str | None, what: str) -> str | None:
    if s is None:
        return None
    if not re.fullmatch(r"\d{4}-\d{2}(-\d{2})?", s):
        raise ValueError(f"{what} must be YYYY-MM or YYYY-MM-DD, got {s!r}")
    return s


def read_problems(paths: list[Path], start: str | None, end: str | None) -> list[Problem]:
    start, end = _date(start, "start_date"), _date(end, "end_date")
    out = []
    for path in paths:
        for i, r in read_jsonl(path):
            where = f"{path}:{i}"
            need(r, ("question_id", "question_content", "public_test_cases", "contest_date"), where)
            day = str(r["contest_date"])[:10]
            if (start and day < start) or (end and day[: len(end)] > end):
                continue
            public = decode_tests(r["public_test_cases"], where + " public_test_cases")
            private = decode_tests(r.get("private_test_cases") or "[]", where + " private_test_cases")
            meta_raw = r.get("metadata") or "{}"
            try:
                md = json.loads(meta_raw) if isinstance(meta_raw, str) else dict(meta_raw)
            except json.JSONDecodeError as e:
                raise MalformedFileError(f"{where}: metadata is not JSON ({e.msg})") from None
            func = md.get("func_name") if any(t["testtype"] == "functional" for t in public + private) else None
            out.append(
                Problem(
                    problem_id=str(r["question_id"]),
                    dataset="livecodebench",
                    text=r["question_content"],
                    entry_point=func,
                    test_code="",
                    test_cases=tuple(public + private),
                    reference=None,
                    starter_code=r.get("starter_code") or "",
                    meta={
                        "platform": r.get("platform"),
                        "contest_id": r.get("contest_id"),
                        "contest_date": r["contest_date"],
                        "difficulty": r.get("difficulty"),
                        "question_title": r.get("question_title"),
                        "n_public_tests": len(public),
                        "metadata": md,
                        "source": f"{path.name}",
                    },
                )
            )
    return out


# ---------------------------------------------------------------- judging


def lines_equal(got: str, expected: str) -> str | None:
    """LiveCodeBench's stdout rule: strip both, split into lines, strip each; the line counts must match
    and each line must be equal, or equal as a list of Decimals (so 1.0 == 1, 2.50 == 2.5). None = ok."""
    g = [x.strip() for x in got.strip().split("\n")]
    e = [x.strip() for x in expected.strip().split("\n")]
    if len(g) != len(e):
        return f"wrong answer: {len(g)} output lines, expected {len(e)}"
    for i, (a, b) in enumerate(zip(g, e)):
        if a == b:
            continue
        try:
            if [Decimal(t) for t in a.split()] == [Decimal(t) for t in b.split()]:
                continue
        except InvalidOperation:
            pass
        return f"wrong answer at line {i + 1}: {a[:100]!r} != {b[:100]!r}"
    return None


@dataclass(frozen=True)
class LiveCodeBench(Benchmark):
    def read(
        self, *, data_file: Path | None, release: str | None, start_date: str | None, end_date: str | None, **_: object
    ) -> list[Problem]:
        paths = [data_file] if data_file else _hub_paths(release or DEFAULT_RELEASE)
        return read_problems(paths, start_date, end_date)

    def size(
        self,
        variant: str | None = None,
        *,
        release: str | None = None,
        data_file: str | None = None,
        start_date: str | None = None,
        end_date: str | None = None,
    ) -> int | None:
        plain = not data_file and not start_date and not end_date
        return DEFAULT_SIZE if plain and (release or DEFAULT_RELEASE) == DEFAULT_RELEASE else None

    def user_message(self, problem: Problem) -> str:
        p = f"### Question:\n{problem.text}\n\n"
        if problem.starter_code:
            p += f"### Format: {WITH_STARTER}\n```python\n{problem.starter_code}\n```\n\n"
        else:
            p += f"### Format: {WITHOUT_STARTER}\n```python\n# YOUR CODE HERE\n```\n\n"
        return p + "### Answer: (use the provided format with backticks)\n\n"

    def completion_prompt(self, problem: Problem) -> str:
        p = f"### Question\n{problem.text}\n\n"
        if problem.starter_code:
            p += f"### Starter Code\n{problem.starter_code}\n\n"
        else:
            p += "### Format\nRead the inputs from stdin, solve the problem and write the answer to stdout.\n\n"
        return p + "### Answer\n\n```python\n"

    def program(self, problem: Problem, code: str) -> Program:
        """One sandbox test per LCB test, each with its own time limit and an output cap of 1 MiB plus
        twice the expected output."""
        tests = problem.test_cases
        if not tests:
            raise ValueError(f"{problem.problem_id}: LiveCodeBench problem without test cases")
        expected = tuple(t["output"] for t in tests)
        caps = tuple((1 << 20) + 2 * len(e.encode()) for e in expected)
        if tests[0]["testtype"] == "functional":
            if not problem.entry_point:
                raise ValueError(f"{problem.problem_id}: functional tests but no func_name in the metadata")
            try:
                args = tuple([json.loads(line) for line in t["input"].split("\n")] for t in tests)
            except json.JSONDecodeError as e:
                raise ValueError(f"{problem.problem_id}: functional test input is not JSON lines ({e})") from None
            return Program(
                code,
                mode="functional",
                tests=args,
                fn_name=problem.entry_point,
                out_caps=caps,
                prelude=PRELUDE,
                solution_class="Solution",
                expected=expected,
            )
        return Program(
            code,
            mode="stdin",
            tests=tuple(t["input"] for t in tests),
            out_caps=caps,
            prelude=PRELUDE,
            check=lambda i, out: lines_equal(out, expected[i]),
        )


# 6 s per test, as LiveCodeBench
BENCHMARK = LiveCodeBench(
    name="livecodebench",
    order=2,
    timeout=6.0,
    stops=STOPS,
    system_prompt=SYSTEM,
    options=("limit", "data_file", "release", "start_date", "end_date"),
    has_references=False,
    vendored=False,
)
