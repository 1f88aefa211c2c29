"""MBPP (Austin et al. 2021): the 500-problem test split (task ids 11-510) of `mbpp.jsonl` ("full", default) or
its 257 hand-verified ids in `sanitized-mbpp.json` ("sanitized"), both vendored.

Prompts: the chat message shows the task and its asserts; the completion prompt is a docstring with the task
and one assert (as bigcode's harness). Judging runs code + setup/imports + asserts, MBPP's own way.
"""

from __future__ import annotations

import ast
import builtins
import json
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

from ..sandbox import Program
from ..store import MalformedFileError
from .base import BENCH_DIR, Benchmark, Problem, need, read_jsonl

DATA_FILES = {"full": BENCH_DIR / "mbpp.jsonl", "sanitized": BENCH_DIR / "sanitized-mbpp.json"}
SIZES = {"full": 500, "sanitized": 257}
TEST_IDS = range(11, 511)  # the 500-problem test split (task ids 11-510)
# bigcode's stops without "\nclass": a reference defines a class after other code (Mbpp/342, a heap Node).
STOPS = ("\nassert", '\n"""', "\nprint", "\nif", "\n```")


def _parse(src: str) -> ast.Module:
    with warnings.catch_warnings():  # upstream code has invalid escapes like '\\w'
        warnings.simplefilter("ignore")
        return ast.parse(src)


def _same_program(a: str, b: str) -> bool:
    try:
        return ast.dump(_parse(a)) == ast.dump(_parse(b))
    except (SyntaxError, ValueError):
        return False


def _spaces_for_tabs(line: str) -> str:
    body = line.lstrip("\t ")
    return line[: len(line) - len(body)].expandtabs(4) + body


def teacher_text(code: str) -> str:
    """The reference as teacher-forced: Unix newlines (499 of the 500 test references carry `\\r\\n`), no
    trailing blanks on a line, and spaces for tab indentation (73 carry tabs); each change only where the
    program's AST stays the same (a blank inside a string literal is part of the program)."""
    text = code.replace("\r\n", "\n").replace("\r", "\n")
    for step in (
        lambda t: "\n".join(ln.rstrip() for ln in t.split("\n")).strip("\n"),
        lambda t: "\n".join(_spaces_for_tabs(ln) for ln in t.split("\n")),
    ):
        new = step(text)
        if new != text and _same_program(text, new):
            text = new
    return text


def entry_point(code: str, tests: list[str]) -> str | None:
    """The function the asserts call: the first called name that the reference defines,
    else the first called name at all (a few tests wrap the call, e.g. `set(f(x))`)."""
    defined: set[str] = set()
    try:
        defined = {
            n.name for n in _parse(code.replace("\r\n", "\n")).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))
        }
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


def judge_calls(test_code: str, reference: str) -> tuple[tuple[str, ...], str]:
    """(names of the program the asserts call, "") when a judge apart from the program can run them: every
    use of the program in the tests is a direct call of one of its functions; else ((), why not). Parses
    trusted text only (the tests, the reference), at load time."""
    try:
        tree = _parse(test_code)
    except SyntaxError as e:
        return (), f"tests do not parse ({e.msg})"
    own = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load)}
    own |= {
        a.asname or a.name.split(".")[0]
        for n in ast.walk(tree)
        if isinstance(n, (ast.Import, ast.ImportFrom))
        for a in n.names
    }
    own |= {
        n.name
        for n in ast.walk(tree)
        if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.Lambda)) and hasattr(n, "name")
    }
    defs = _top_defs(reference)
    builtin = set(dir(builtins)) - set(defs)  # a program's own `max` shadows the builtin in its tests
    loads = [n for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)]
    free = {n.id for n in loads} - own - builtin
    called = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    other = sorted({n.id for n in loads if n.id in free and id(n) not in called})
    if other:
        return (), f"the tests use {', '.join(other)} of the program other than by calling it"
    classes = sorted(n for n in free if defs.get(n) == "class")
    if classes:
        return (), f"the tests call class {', '.join(classes)} of the program"
    if not free:
        return (), "the tests call nothing of the program"
    return tuple(sorted(free)), ""


def _top_defs(code: str) -> dict[str, str]:
    """Top-level functions ("def") and classes ("class") of trusted code (a reference solution)."""
    try:
        body = _parse(code.replace("\r\n", "\n")).body
    except SyntaxError:
        return {}
    return {
        n.name: "class" if isinstance(n, ast.ClassDef) else "def"
        for n in body
        if isinstance(n, (ast.FunctionDef, ast.ClassDef))
    }


def read_full(path: Path) -> list[Problem]:
    out = []
    for i, r in read_jsonl(path):
        need(r, ("task_id", "text", "code", "test_list"), f"{path}:{i}")
        if r["task_id"] not in TEST_IDS:
            continue
        setup = r.get("test_setup_code") or ""
        test_code = (setup + "\n" if setup else "") + "\n".join(r["test_list"])
        calls, why = judge_calls(test_code, r["code"])
        out.append(
            Problem(
                problem_id=f"Mbpp/{r['task_id']}",
                dataset="mbpp",
                text=r["text"],
                entry_point=entry_point(r["code"], r["test_list"]),
                test_code=test_code,
                reference=r["code"],
                meta={
                    "variant": "full",
                    "test_list": list(r["test_list"]),
                    "challenge_test_list": list(r.get("challenge_test_list") or []),
                    "test_setup_code": setup,
                    "license": "CC-BY-4.0",
                    "judge_calls": calls,
                    "in_process": why,
                },
            )
        )
    return out


def read_sanitized(path: Path) -> list[Problem]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise MalformedFileError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, list):
        raise MalformedFileError(f"{path}: expected a JSON array of problems")
    out = []
    for j, r in enumerate(data):
        need(r, ("task_id", "prompt", "code", "test_list"), f"{path}: record {j}")
        if r["task_id"] not in TEST_IDS:
            continue
        imports = list(r.get("test_imports") or [])
        test_code = "\n".join(imports + list(r["test_list"]))
        calls, why = judge_calls(test_code, r["code"])
        out.append(
            Problem(
                problem_id=f"Mbpp/{r['task_id']}",
                dataset="mbpp",
                text=r["prompt"],
                entry_point=entry_point(r["code"], r["test_list"]),
                test_code=test_code,
                reference=r["code"],
                meta={
                    "variant": "sanitized",
                    "test_list": list(r["test_list"]),
                    "challenge_test_list": [],
                    "test_imports": imports,
                    "license": "CC-BY-4.0",
                    "judge_calls": calls,
                    "in_process": why,
                },
            )
        )
    return sorted(out, key=lambda p: int(p.problem_id.split("/")[1]))


@dataclass(frozen=True)
class Mbpp(Benchmark):
    def read(self, *, variant: str | None, data_file: Path | None, **_: object) -> list[Problem]:
        variant = variant or self.variants[0]
        if variant not in self.variants:
            raise ValueError(f"mbpp variant must be 'full' or 'sanitized', got {variant!r}")
        reader = read_full if variant == "full" else read_sanitized
        return reader(data_file or DATA_FILES[variant])

    def size(self, variant: str | None = None, **_: object) -> int | None:
        return SIZES.get(variant or self.variants[0])

    def user_message(self, problem: Problem) -> str:
        tests = "\n".join(problem.meta.get("test_list", []))
        return (
            f"You are an expert Python programmer, and here is your task: {problem.text.strip()} "
            f"Your code should pass these tests:\n\n{tests}\n\n"
            "Write the solution in a single ```python code block.\n"
        )

    def completion_prompt(self, problem: Problem) -> str:
        tests = problem.meta.get("test_list") or [""]
        return f'"""\n{problem.text.strip()}\n{tests[0]}\n"""\n'

    def teacher_text(self, problem: Problem) -> str:
        return teacher_text(super().teacher_text(problem))

    def program(self, problem: Problem, code: str) -> Program:
        """The asserts run in a separate judge that calls the program's functions with plain values; where
        they use the program otherwise (its classes, its globals), in the program's process, and say so."""
        calls, why = problem.meta["judge_calls"], problem.meta["in_process"]
        if why:
            return replace(self.in_process(problem, code), fallback=why)
        return Program(code, judge=f"\n\n{problem.test_code}\n", calls=calls)

    def in_process(self, problem: Problem, code: str) -> Program:
        """The program with its asserts in its own process, MBPP's own way."""
        return Program(code, tail=f"\n\n{problem.test_code}\n")


# 6 s per test: the slowest reference, Mbpp/123, needs ~3 s of CPU
BENCHMARK = Mbpp(
    name="mbpp",
    order=1,
    timeout=6.0,
    stops=STOPS,
    variants=("full", "sanitized"),
    options=("limit", "variant", "data_file"),
)
