"""Benchmarks as objects: the registry, byte-identical behaviour to the code before them (golden hashes),
program assembly, and no benchmark name outside btp/benchmarks/."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from benchmark_golden import SUITES, digest, record, records, sample_outputs

import btp
from btp import benchmarks, prompts
from btp.benchmarks import livecodebench
from btp.data import load_problems
from btp.evaluate import build_program
from btp.sandbox import Program
from btp.sandbox_child import assemble as _assemble
from btp.sandbox_child import value_equal


def assemble(prog: Program) -> str:
    """The source the sandbox runs for `prog` (the child's own assembly, called here on trusted test code),
    followed by the tests its judge runs apart: the same bytes whichever process runs the tests."""
    return _assemble(prog.code, prog.head, prog.tail, prog.complete) + prog.judge


GOLDEN = json.loads((Path(__file__).parent / "fixtures" / "benchmark_golden.json").read_text())


def _program(p: Any, code: str) -> dict:
    """Today's program in the golden record's terms: assembled text, the prelude and method class it
    carries, and the verdicts of its judging rule (a check callable or expected values)."""
    prog = build_program(p, code)
    rec = {
        "code": assemble(prog),
        "mode": prog.mode,
        "tests": list(prog.tests),
        "fn_name": prog.fn_name,
        "out_caps": list(prog.out_caps),
        "prelude": prog.prelude,
        "solution_class": prog.solution_class,
    }
    if prog.check or prog.expected:
        judge = prog.check or (lambda i, out: value_equal(out, prog.expected[i]))
        rec["verdicts"] = [[judge(i, o) for o in sample_outputs(t)] for i, t in enumerate(p.test_cases)]
    return rec


# the golden records hold the raw reference's rendering: teacher-forced text is tested in test_reference_*
API = {
    "build_prompt": prompts.build_prompt,
    "stops": lambda p: benchmarks.get(p.dataset).stops,
    "reference_output": lambda p, s: benchmarks.get(p.dataset).reference_output(p, s, code=p.reference),
    "program": _program,
}


def test_registry_names_order_and_errors():
    assert benchmarks.NAMES == ("humaneval", "mbpp", "livecodebench") == tuple(GOLDEN["shared"]["names"])
    assert [b.name for b in benchmarks.all()] == list(benchmarks.NAMES)
    assert [b.order for b in benchmarks.all()] == sorted(b.order for b in benchmarks.all())
    assert all(benchmarks.get(n).name == n for n in benchmarks.NAMES)
    with pytest.raises(ValueError, match=r"unknown dataset 'apps'.*humaneval.*mbpp.*livecodebench"):
        benchmarks.get("apps")
    assert benchmarks.VARIANTS == ("full", "sanitized")
    assert [benchmarks.get(n).timeout for n in benchmarks.NAMES] == GOLDEN["shared"]["timeouts"]


def test_sizes_match_what_load_returns():
    he, mbpp, lcb = benchmarks.all()
    assert [he.size(), mbpp.size(), mbpp.size("sanitized")] == GOLDEN["shared"]["sizes"] == [164, 500, 257]
    assert mbpp.size("full") == len(mbpp.load(variant="full")) and mbpp.size("plus") is None
    assert lcb.size() == lcb.size(release="v6") == 175  # the default window: release v6
    assert lcb.size(release="release_v6") is None and lcb.size(data_file="x.jsonl") is None
    assert lcb.size(start_date="2025-02") is None


def test_benchmark_facts():
    he, mbpp, lcb = benchmarks.all()
    assert he.has_references and mbpp.has_references and not lcb.has_references
    assert he.vendored and mbpp.vendored and not lcb.vendored
    assert lcb.system_prompt == livecodebench.SYSTEM and he.system_prompt is None is mbpp.system_prompt
    assert "variant" in mbpp.options and "release" in lcb.options and "variant" not in he.options


@pytest.mark.parametrize("suite", [f"{d}/{v}" for d, v in SUITES])
def test_same_prompts_stops_references_programs_and_verdicts_as_before(suite):
    """Every problem of HumanEval, MBPP (both variants) and the LCB fixture: the same records as the
    code before benchmark objects produced (tests/benchmark_golden.py --old)."""
    ds, variant = suite.split("/")
    new = records(load_problems, API, only=suite)[suite]
    old = GOLDEN["problems"][suite]
    assert sorted(new) == sorted(old)
    bad = [pid for pid in old if new[pid] != old[pid]]
    assert not bad, f"{len(bad)} problems differ, e.g. {bad[:5]}"


def test_golden_record_catches_a_change():
    """The record is sensitive: another stop string or system message changes its digest."""
    p = load_problems("livecodebench", data_file=str(Path(__file__).parent / "fixtures" / "lcb_mini.jsonl"))[0]
    base = digest(record(p, API))
    assert digest(record(p, {**API, "stops": lambda q: ("\n```", "\n#")})) != base
    prompt = lambda q, tok, style, **kw: prompts.build_prompt(q, tok, style, **({"system_prompt": "X"} | kw))  # noqa: E731
    assert digest(record(p, {**API, "build_prompt": prompt})) != base


def test_assemble_complete_rules():
    head = 'import math\n\ndef f(x):\n    """doc"""\n'
    prog = lambda code: Program(code, head=head, tail="\n#t\n", complete="f")  # noqa: E731
    assert assemble(prog("    return x\n")) == head + "    return x\n" + "\n#t\n"  # a body
    assert assemble(prog("return x\n")) == head + "    return x\n" + "\n#t\n"  # unindented body
    assert assemble(prog("def f(x):\n    return 1\n")) == head + "\ndef f(x):\n    return 1\n" + "\n#t\n"
    assert assemble(prog("def g(x):\n  pass\n")) == head + "def g(x):\n  pass\n" + "\n#t\n"  # not f: a body
    assert assemble(prog("x = (")) == head + "x = (" + "\n#t\n"  # neither compiles: left to the sandbox
    assert assemble(Program("a = 1", head="# h\n", tail="\n# t")) == "# h\na = 1\n# t"
    assert assemble(Program("a = 1")) == "a = 1"


def test_benchmark_programs():
    he = load_problems("humaneval", limit=1)[0]
    prog = benchmarks.get("humaneval").program(he, "    return True\n")
    assert (prog.head, prog.complete, prog.mode) == (he.text, he.entry_point, "script")
    assert prog.judge == f"\n\n{he.test_code}\n\ncheck({he.entry_point})\n" and prog.tail == ""
    assert (prog.judge_head, prog.calls) == (he.text, (he.entry_point,))
    mb = load_problems("mbpp", limit=1)[0]
    assert benchmarks.get("mbpp").program(mb, "x = 1") == Program(
        "x = 1", judge=f"\n\n{mb.test_code}\n", calls=(mb.entry_point,)
    )
    node = {p.problem_id: p for p in load_problems("mbpp")}["Mbpp/367"]  # its tests build the program's Node
    fb = benchmarks.get("mbpp").program(node, "x = 1")
    assert fb.judge == "" and fb.tail == f"\n\n{node.test_code}\n" and "class Node" in fb.fallback
    fn, sd = load_problems("livecodebench", data_file=str(Path(__file__).parent / "fixtures" / "lcb_mini.jsonl"))[:2]
    f = benchmarks.get("livecodebench").program(fn, "pass")
    assert (f.mode, f.solution_class, f.check, f.prelude) == ("functional", "Solution", None, livecodebench.PRELUDE)
    assert f.expected == tuple(t["output"] for t in fn.test_cases)
    s = benchmarks.get("livecodebench").program(sd, "pass")
    assert (s.mode, s.solution_class, s.expected) == ("stdin", None, ())
    assert s.check(0, sd.test_cases[0]["output"]) is None and "wrong answer" in s.check(0, "nope")


def test_value_equal_rule():
    assert value_equal("[0, 1]", "[0, 1]") is None and value_equal("True", "true") is None
    assert "expected [0, 1]" in value_equal("[0, 2]", "[0, 1]")
    assert "non-literal" in value_equal("<object at 0x1>", "1")


NAME_PATTERN = re.compile(r'"(humaneval|mbpp|livecodebench)"|dataset ==')


def test_no_benchmark_names_outside_benchmark_modules():
    root = Path(btp.__file__).parent
    hits = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] == "benchmarks":
            continue
        for no, line in enumerate(path.read_text().splitlines(), 1):
            if NAME_PATTERN.search(line):
                hits.append(f"btp/{rel}:{no}: {line.strip()}")
    assert not hits, "benchmark names belong in btp/benchmarks/:\n" + "\n".join(hits)


def test_benchmark_modules_are_beside_their_data():
    d = Path(benchmarks.__file__).parent
    assert {
        "humaneval.py",
        "mbpp.py",
        "livecodebench.py",
        "HumanEval.jsonl.gz",
        "mbpp.jsonl",
        "sanitized-mbpp.json",
    } <= {p.name for p in d.iterdir()}
    assert livecodebench.PRELUDE.startswith("from string import *\n")


def test_mbpp_teacher_text_is_normalised_and_the_same_program():
    """Issue 12.1: 499 of 500 MBPP references carry CRLF, 73 tabs; the teacher-forced text has Unix newlines, no
    trailing blanks and space indentation, parses to the same AST, and the evaluator keeps the raw reference."""
    import ast

    mbpp = benchmarks.get("mbpp")
    probs = mbpp.load()
    assert sum("\r\n" in p.reference for p in probs) == 499 and sum("\t" in p.reference for p in probs) == 73
    for p in probs:
        t = mbpp.teacher_text(p)
        assert "\r" not in t and all(ln == ln.rstrip() for ln in t.split("\n")), p.problem_id
        assert ast.dump(ast.parse(t)) == ast.dump(ast.parse(p.reference.replace("\r\n", "\n"))), p.problem_id
        assert "\r" not in prompts.reference_output(p, "chat") and "\r" not in prompts.reference_output(p, "completion")
    assert sum(not ln.startswith("\t") for p in probs for ln in mbpp.teacher_text(p).split("\n")) > 0
    assert sum(ln.startswith("\t") for p in probs for ln in mbpp.teacher_text(p).split("\n")) == 0
    assert build_program(probs[0], probs[0].reference).code == probs[0].reference  # judged raw
    he = benchmarks.get("humaneval").load(limit=3)
    assert all(benchmarks.get("humaneval").teacher_text(p) == p.reference for p in he)
