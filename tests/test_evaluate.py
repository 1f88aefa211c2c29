"""The evaluate stage: every reference solution passes, benchmark semantics, LCB rules, summaries, resume."""

from __future__ import annotations

import ast
import builtins
import json
import textwrap
from pathlib import Path

import pytest

from btp.benchmarks.livecodebench import lines_equal as lcb_lines_equal
from btp.data import load_problems
from btp.evaluate import EvalConfig, build_program, code_sha, evaluate, main
from btp.sandbox import Limits, Sandbox
from btp.sandbox_child import assemble, value_equal
from btp.store import read_jsonl, write_json

LCB = str(Path(__file__).parent / "fixtures" / "lcb_mini.jsonl")


@pytest.fixture(scope="module")
def sb():
    with Sandbox(Limits(timeout=3.0), workers=2) as s:
        yield s


def _write(path: Path, recs: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


@pytest.mark.parametrize("dataset,n", [("humaneval", 164), ("mbpp", 500)])
def test_all_reference_solutions_pass(tmp_path, dataset, n):
    s = evaluate(EvalConfig(dataset=dataset, reference=True, results_dir=str(tmp_path), n_boot=200))
    assert s["n_problems"] == n and s["n_programs"] == n
    assert s["status_counts"] == {"passed": n}, [r for r in read_jsonl(s["evaluations"]) if not r["passed"]][:3]
    assert s["pass_at_k"]["pass@1"]["estimate"] == 1.0
    assert s["problems_never_passed"] == []
    recs = read_jsonl(Path(s["evaluations"]))
    assert len(recs) == n and all(r["isolation"] and r["cgroup"] for r in recs)
    # judged apart from the program, except where the benchmark says why not (MBPP's tests that build Node)
    fallback = [r["problem_id"] for r in recs if r["judge"] != "separate"]
    assert fallback == ([] if dataset == "humaneval" else ["Mbpp/367"]), fallback
    assert s["judge"] == {"separate": n - len(fallback), **{r["judge"]: 1 for r in recs if r["judge"] != "separate"}}
    assert s["suspicious"] == {"programs": 0, "by_flag": {}} and sum(s["cgroup"].values()) == n
    assert (Path(s["evaluations"]).parent / "summary.json").exists()


def test_lcb_comparison_rules():
    assert lcb_lines_equal("6\n", "6") is None
    assert lcb_lines_equal("  6  \n\n", "6\n") is None
    assert lcb_lines_equal("1.0 2.50\n", "1 2.5") is None  # Decimal equality per token
    assert lcb_lines_equal("12\n-20", "12\n-20\n") is None
    assert lcb_lines_equal("0.30000000000000004", "0.3") is not None  # no float tolerance beyond Decimal
    assert "lines" in lcb_lines_equal("1\n2", "1")
    assert lcb_lines_equal("a b", "a  b") is not None  # not numbers, and not equal as lines
    # the functional rule is a sandbox primitive now (run in the harness, never in the evaluator)
    assert value_equal("[0, 1]", "[0, 1]") is None
    assert value_equal("3", "3") is None and value_equal("True", "true") is None
    assert value_equal("[0, 2]", "[0, 1]") is not None
    assert value_equal("<object at 0x1>", "1") is not None


def test_humaneval_semantics(sb):
    probs = {p.problem_id: p for p in load_problems("humaneval")}
    p0 = probs["HumanEval/0"]
    canonical = p0.reference[len(p0.text) :]
    assert sb.run(build_program(p0, canonical)).passed  # a bare body completes the prompt
    import textwrap

    assert sb.run(build_program(p0, textwrap.dedent(canonical))).passed  # an unindented body too
    # a full solution that relies on a helper defined only in the prompt (HumanEval/38's encode_cyclic)
    p38 = probs["HumanEval/38"]
    full = "def decode_cyclic(s: str):\n    return encode_cyclic(encode_cyclic(s))\n"
    assert sb.run(build_program(p38, full)).passed
    assert "check(decode_cyclic)" in build_program(p38, full).judge
    wrong = sb.run(build_program(p0, "def has_close_elements(numbers, threshold):\n    return True\n"))
    assert wrong.status == "failed" and "assert" in wrong.error


def _old_humaneval_source(p, code: str) -> str:
    """The assembly evaluate did in its own process before (kept here to pin the bytes)."""

    def defines(c):
        try:
            tree = ast.parse(c)
        except SyntaxError:
            return False
        return any(isinstance(n, ast.FunctionDef) and n.name == p.entry_point for n in tree.body)

    def compiles(src):
        try:
            compile(src, "<candidate>", "exec", dont_inherit=True)
            return True
        except (SyntaxError, ValueError):
            return False

    if defines(code):
        head = p.text + "\n" + code
    else:
        head = p.text + code
        if not compiles(head) and compiles(p.text + textwrap.indent(code, "    ")):
            head = p.text + textwrap.indent(code, "    ")
    return f"{head}\n\n{p.test_code}\n\ncheck({p.entry_point})\n"


def test_assembled_sources_are_unchanged():
    """The sandbox assembles exactly the bytes evaluate assembled before, for HumanEval and MBPP."""
    for p in load_problems("humaneval"):
        body = p.reference[len(p.text) :]
        for code in (body, textwrap.dedent(body), p.reference, "def nothing():\n    pass\n", "x(", ""):
            prog = build_program(p, code)  # the program's part, then the tests (run apart, by its judge)
            src = assemble(prog.code, prog.head, prog.tail, prog.complete) + prog.judge
            assert src == _old_humaneval_source(p, code)
    for p in load_problems("mbpp", limit=50):
        prog = build_program(p, p.reference)
        src = assemble(prog.code, prog.head, prog.tail, prog.complete) + prog.judge
        assert src == f"{p.reference}\n\n{p.test_code}\n"


def test_mbpp_semantics(sb):
    p = load_problems("mbpp", limit=1)[0]
    assert sb.run(build_program(p, p.reference)).passed
    assert not sb.run(build_program(p, "def nothing():\n    pass\n")).passed


LCB_PROGRAMS = {
    "9001": [
        "class Solution:\n    def pairSum(self, nums: List[int], target: int) -> List[int]:\n"
        "        seen = {}\n        for i, x in enumerate(nums):\n            if target - x in seen:\n"
        "                return [seen[target - x], i]\n            seen[x] = i\n",
        "class Solution:\n    def pairSum(self, nums, target):\n        return [0, 1]\n",
    ],
    "abc390_a": [
        "n = int(input())\nprint(sum(map(int, input().split())))\n",
        "import sys\ndata = sys.stdin.buffer.read().split()\nprint(float(sum(map(int, data[1:]))))\n",
    ],
    "2044A": [
        "import sys\nt, *rest = open(0).read().split()\nfor i in range(int(t)):\n"
        "    print(int(rest[2 * i]) * int(rest[2 * i + 1]))\n",
        "t = int(input())\nfor _ in range(t):\n    a, b = map(int, input().split())\n    print(a + b)\n",
    ],
    "9002": ["class Solution:\n    def countDistinct(self, s: str) -> int:\n        return len(set(s))\n", ""],
}


def test_livecodebench_stdin_and_functional(tmp_path):
    recs = [
        {"problem_id": pid, "sample": i, "code": code}
        for pid, codes in LCB_PROGRAMS.items()
        for i, code in enumerate(codes)
    ]
    inp = _write(tmp_path / "lcb_programs.jsonl", recs)
    s = evaluate(EvalConfig(dataset="livecodebench", input=str(inp), data_file=LCB, n_boot=200))
    ev = {(r["problem_id"], r["sample"]): r for r in read_jsonl(tmp_path / "lcb_programs.evaluations.jsonl")}
    assert all(ev[(pid, 0)]["passed"] for pid in LCB_PROGRAMS), ev
    assert ev[("abc390_a", 1)]["passed"]  # prints 6.0 for 6: equal under LiveCodeBench's Decimal rule
    assert ev[("9001", 1)]["status"] == "failed" and ev[("9001", 1)]["tests_passed"] == 1
    assert ev[("2044A", 1)]["status"] == "failed" and "wrong answer" in ev[("2044A", 1)]["error"]
    assert ev[("9002", 1)]["status"] == "no_code"
    assert ev[("9001", 0)]["tests_total"] == 4
    assert s["n_problems"] == 4 and s["samples_per_problem"] == {"min": 2, "max": 2}
    assert s["pass_at_k"]["pass@1"]["estimate"] == pytest.approx((0.5 + 1 + 0.5 + 0.5) / 4)
    assert s["pass_at_k"]["pass@2"]["estimate"] == 1.0
    assert (tmp_path / "lcb_programs.summary.json").exists()
    with pytest.raises(ValueError, match="no reference"):
        evaluate(EvalConfig(dataset="livecodebench", reference=True, data_file=LCB, results_dir=str(tmp_path)))


def _no_parsing(*a, **k):
    raise AssertionError("the evaluator's process parsed or compiled text")


def test_the_evaluator_never_parses_model_code(sb, monkeypatch):
    """With ast.parse, ast.literal_eval and compile unusable in this process, HumanEval (bodies, full
    solutions, pathological sources), MBPP and LiveCodeBench (functional and stdin) still get right verdicts."""
    he = {p.problem_id: p for p in load_problems("humaneval", limit=3)}
    mb = load_problems("mbpp", limit=2)
    lcb = {p.problem_id: p for p in load_problems("livecodebench", data_file=LCB, release="v6")}
    p0 = he["HumanEval/0"]
    body = p0.reference[len(p0.text) :]
    cases = [
        (p0, body, "passed"),
        (p0, textwrap.dedent(body), "passed"),
        (p0, p0.reference, "passed"),
        (p0, "    return True\n", "failed"),
        (mb[0], mb[0].reference, "passed"),
        (mb[1], "x = (", "error"),
        (p0, "x = " + "(" * 200_000 + ")" * 200_000 + "\n", "error"),
        (p0, "x = " + "-" * 200_000 + "1\n", "error"),
        (p0, body + "# " + "a" * (50 << 20) + "\n", "passed"),
        (p0, body + "'\udc80'\n", "error"),
    ]
    cases += [(lcb[pid], codes[0], "passed") for pid, codes in LCB_PROGRAMS.items()]
    cases += [(lcb["9001"], LCB_PROGRAMS["9001"][1], "failed"), (lcb["2044A"], LCB_PROGRAMS["2044A"][1], "failed")]
    sb.run(build_program(p0, body))  # the sandbox's own (trusted) child code is compiled before the patch
    for mod, name in ((ast, "parse"), (ast, "literal_eval"), (builtins, "compile")):
        monkeypatch.setattr(mod, name, _no_parsing)
    got = dict(sb.map(build_program(p, code) for p, code, _ in cases))
    assert [got[i].status for i in range(len(cases))] == [want for _, _, want in cases], [
        (i, got[i].status, got[i].error[:200]) for i in range(len(cases))
    ]


def test_code_sha_is_total_and_odd_code_gets_a_verdict(tmp_path):
    assert code_sha("x = '\udc80'") != code_sha("x = '\udc81'")
    probs = load_problems("humaneval", limit=1)
    deep = probs[0].reference + "\nimport os\nfor i in range(1500):\n    os.mkdir('d')\n    os.chdir('d')\n"
    odd = ["x = '\udc80'\n", "x = " + "(" * 200_000 + ")" * 200_000 + "\n", probs[0].reference, deep]
    recs = [{"problem_id": probs[0].problem_id, "sample": i, "code": c} for i, c in enumerate(odd)]
    inp = tmp_path / "odd.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in recs))
    s = evaluate(EvalConfig(dataset="humaneval", input=str(inp), limit=1, n_boot=100, workers=1))
    ev = {r["sample"]: r for r in read_jsonl(tmp_path / "odd.evaluations.jsonl")}
    assert [ev[i]["status"] for i in range(4)] == ["error", "error", "passed", "passed"], ev
    assert s["n_programs"] == 4 and s["status_counts"] == {"error": 2, "passed": 2}


def test_attempts_are_flagged_and_counted(tmp_path):
    """What a program tried that no test needs is in its record and counted in summary.json."""
    p = load_problems("humaneval", limit=1)[0]
    body = p.reference[len(p.text) :].lstrip("\n")
    codes = [
        p.reference,
        "    import os\n    os.listdir('/')\n" + body,
        "    import os\n    if os.fork() == 0:\n        os._exit(0)\n    os.wait()\n" + body,
        "    import os\n    os._exit(0)\n",
    ]
    inp = _write(
        tmp_path / "a.jsonl", [{"problem_id": p.problem_id, "sample": i, "code": c} for i, c in enumerate(codes)]
    )
    s = evaluate(EvalConfig(dataset="humaneval", input=str(inp), limit=1, n_boot=100, workers=1))
    ev = {r["sample"]: r for r in read_jsonl(tmp_path / "a.evaluations.jsonl")}
    assert [ev[i]["suspicious"] for i in range(4)] == [[], ["lists outside its dir"], ["forks"], ["exits early"]]
    assert [ev[i]["passed"] for i in range(4)] == [True, True, True, False]
    assert s["suspicious"] == {"programs": 3, "by_flag": {"lists outside its dir": 1, "forks": 1, "exits early": 1}}
    assert s["judge"] == {"separate": 4}


def test_a_program_that_cannot_be_built_is_a_verdict(tmp_path, monkeypatch):
    """A failure to build one program's sandbox program is that program's error; the run completes."""
    import btp.evaluate as ev_mod

    probs = load_problems("humaneval", limit=2)
    real = ev_mod.build_program

    def build(p, code):
        if p.problem_id == probs[0].problem_id:
            raise ValueError("no way to judge this")
        return real(p, code)

    monkeypatch.setattr(ev_mod, "build_program", build)
    inp = _write(tmp_path / "b.jsonl", [{"problem_id": p.problem_id, "sample": 0, "code": p.reference} for p in probs])
    s = evaluate(EvalConfig(dataset="humaneval", input=str(inp), limit=2, n_boot=100, workers=1))
    ev = {r["problem_id"]: r for r in read_jsonl(tmp_path / "b.evaluations.jsonl")}
    assert ev[probs[0].problem_id]["status"] == "error" and "no way to judge" in ev[probs[0].problem_id]["error"]
    assert ev[probs[1].problem_id]["passed"] and s["status_counts"] == {"error": 1, "passed": 1}


def _fake_generations(root: Path, model: str, limit: int | None) -> Path:
    probs = load_problems("humaneval", limit=3)
    body = lambda p: p.reference[len(p.text) :]  # noqa: E731 - a completion-style body
    recs = [
        {"problem_id": probs[0].problem_id, "sample": 0, "code": body(probs[0])},
        {"problem_id": probs[0].problem_id, "sample": 1, "code": probs[0].reference},  # a full program
        {"problem_id": probs[1].problem_id, "sample": 0, "code": ""},  # no code
        {"problem_id": probs[1].problem_id, "sample": 1, "code": "def separate_paren_groups(s):\n    return []\n"},
    ]  # probs[2] has no generations at all: it still counts
    gen = _write(root / model / "humaneval" / "generations.jsonl", [{**r, "output": "..."} for r in recs])
    write_json(gen.with_name("generations.runs.json"), [{"run": "x", "config": {"limit": limit, "variant": None}}])
    return gen


def test_generations_summary_denominator_and_resume(tmp_path, sb):
    gen = _fake_generations(tmp_path, "org--tiny", limit=3)
    cfg = EvalConfig(dataset="humaneval", model="org/tiny", results_dir=str(tmp_path), n_boot=300)
    s = evaluate(cfg, sandbox=sb)
    ev_path = gen.with_name("evaluations.jsonl")
    ev = {(r["problem_id"], r["sample"]): r for r in read_jsonl(ev_path)}
    assert [ev[("HumanEval/0", i)]["status"] for i in (0, 1)] == ["passed", "passed"]
    assert ev[("HumanEval/1", 0)]["status"] == "no_code" and ev[("HumanEval/1", 1)]["status"] == "failed"
    assert s["n_problems"] == 3, "the generation run's limit sets the problem set"
    assert s["problems_without_programs"] == 1
    assert s["pass_at_k"]["pass@1"]["estimate"] == pytest.approx(1 / 3)  # (1 + 0 + 0) / 3
    assert set(s["pass_at_k"]) == {"pass@1", "pass@2"}
    assert s["status_counts"] == {"passed": 2, "no_code": 1, "failed": 1}
    summary = json.loads(gen.with_name("summary.json").read_text())
    assert summary["provenance"]["stage"] == "evaluate" and "denominator" in summary
    # resume: nothing new to judge; then a changed program is judged again and supersedes the old verdict
    n_lines = len(read_jsonl(ev_path))
    evaluate(cfg, sandbox=sb)
    assert len(read_jsonl(ev_path)) == n_lines
    recs = read_jsonl(gen)
    recs[3]["code"] = load_problems("humaneval", limit=2)[1].reference
    _write(gen, recs)
    s2 = evaluate(cfg, sandbox=sb)
    assert len(read_jsonl(ev_path)) == n_lines + 1
    assert s2["pass_at_k"]["pass@1"]["estimate"] == pytest.approx((1 + 0.5) / 3)
    # other judging settings may not be mixed into the same file
    with pytest.raises(ValueError, match="other settings"):
        evaluate(EvalConfig(dataset="humaneval", model="org/tiny", results_dir=str(tmp_path), timeout=7.0))
    # --force judges everything again under the new limits; later runs with those limits resume
    s3 = evaluate(
        EvalConfig(
            dataset="humaneval", model="org/tiny", results_dir=str(tmp_path), timeout=7.0, force=True, n_boot=300
        ),
        sandbox=sb,
    )
    assert s3["timeout_s"] == 7.0 and s3["pass_at_k"]["pass@1"]["estimate"] == pytest.approx(1.5 / 3)
    n_lines = len(read_jsonl(ev_path))
    evaluate(EvalConfig(dataset="humaneval", model="org/tiny", results_dir=str(tmp_path), timeout=7.0, n_boot=300))
    assert len(read_jsonl(ev_path)) == n_lines


def test_cli(tmp_path, capsys):
    probs = load_problems("mbpp", limit=2)
    inp = _write(
        tmp_path / "progs.jsonl", [{"problem_id": p.problem_id, "sample": 0, "code": p.reference} for p in probs]
    )
    assert main(["--dataset", "mbpp", "--input", str(inp), "--limit", "2", "--workers", "1", "--n-boot", "100"]) == 0
    out = capsys.readouterr().out
    assert "pass@1=1.0000" in out
    summary = json.loads((tmp_path / "progs.summary.json").read_text())
    assert summary["n_problems"] == 2 and summary["small_n"] is True
    # 2/2 passed: the bootstrap collapses to [1, 1]; the Wilson interval beside it does not (kept old keys too)
    p1 = summary["pass_at_k"]["pass@1"]
    assert p1["ci_low"] == p1["ci_high"] == 1.0 and p1["wilson_high"] == 1.0 and 0.1 < p1["wilson_low"] < 0.5
    assert f"Wilson [{p1['wilson_low']:.4f}, 1.0000]" in out
    assert "caveat: n = 2 problems < 10" in out
    bad = _write(tmp_path / "bad.jsonl", [{"problem_id": "Mbpp/11", "code": "x"}])
    with pytest.raises(Exception, match="bad.jsonl"):
        main(["--dataset", "mbpp", "--input", str(bad)])
    with pytest.raises(FileNotFoundError, match="generate"):
        main(["--dataset", "mbpp", "--model", "org/none", "--results-dir", str(tmp_path)])
