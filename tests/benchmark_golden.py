"""Golden hashes of everything a benchmark decides, per problem: chat messages (system + user), completion
prompt, stop strings, reference outputs, the assembled program of several candidate solutions (text, mode,
tests, prelude, method class, output caps) and the verdicts its judging rules give on sample outputs.

`python tests/benchmark_golden.py --old > tests/fixtures/benchmark_golden.json` was run once against the code
before benchmarks became objects (the per-dataset branches in prompts/evaluate/sandbox); test_benchmarks.py
recomputes the records with today's code and asserts the same hashes: no behaviour change.
"""

from __future__ import annotations

import hashlib
import json
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

FIX = Path(__file__).resolve().parent / "fixtures" / "lcb_mini.jsonl"
SUITES = (("humaneval", None), ("mbpp", "full"), ("mbpp", "sanitized"), ("livecodebench", None))


class MessagesTokenizer:
    """Stands in for a chat tokenizer: the 'rendered' prompt is the message list itself, as JSON."""

    chat_template = "messages"

    def apply_chat_template(
        self, msgs: list, tokenize: bool = False, add_generation_prompt: bool = True, **kw: Any
    ) -> str:
        return json.dumps(msgs)


def candidates(p: Any) -> list[str]:
    """Solutions whose assembled programs are compared: the reference, a bare body, an unindented body,
    a full definition of the entry point, broken code, nothing."""
    out = ["", "x = (", "def nothing():\n    pass\n", "print(int(input()) + 1)\n"]
    if p.reference is not None:
        out.append(p.reference)
        if p.reference.startswith(p.text):
            body = p.reference[len(p.text) :]
            out += [body, textwrap.dedent(body)]
    if p.entry_point:
        out.append(f"import math\n\ndef {p.entry_point}(*args):\n    return math.pi\n")
        out.append(f"class Solution:\n    def {p.entry_point}(self, *args):\n        return (1, 2)\n")
    return out


def sample_outputs(test: Any) -> list[str]:
    """Outputs to judge against one test: its own expected text, near misses, junk."""
    exp = test["output"]
    return [
        exp,
        exp + "\n",
        " " + exp.strip() + " \n\n",
        exp + "\nextra",
        "1.0",
        "[1, 2]",
        "None",
        "<object at 0x1>",
        "true",
        "",
    ]


def record(p: Any, api: dict[str, Callable]) -> dict:
    tok = MessagesTokenizer()
    rec: dict[str, Any] = {
        "chat": api["build_prompt"](p, tok, "chat")[0],
        "chat_system": api["build_prompt"](p, tok, "chat", system_prompt="S")[0],
        "completion": api["build_prompt"](p, tok, "completion")[0],
        "stops": list(api["stops"](p)),
        "reference": [api["reference_output"](p, s) for s in ("chat", "completion")]
        if p.reference is not None
        else None,
        "programs": [],
    }
    for code in candidates(p):
        try:
            rec["programs"].append(api["program"](p, code))
        except ValueError as e:
            rec["programs"].append({"error": str(e)})
    return rec


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def records(load: Callable, api: dict[str, Callable], only: str | None = None) -> dict:
    out: dict[str, Any] = {}
    for ds, variant in SUITES:
        if only is not None and f"{ds}/{variant}" != only:
            continue
        kw = {"data_file": str(FIX)} if ds == "livecodebench" else {"variant": variant}
        probs = load(ds, **kw)
        out[f"{ds}/{variant}"] = {p.problem_id: digest(record(p, api)) for p in probs}
    return out


def _old_api() -> tuple[Callable, dict[str, Callable], dict]:
    """The original code: per-dataset branches in prompts.py and evaluate.py, LCB's prelude and
    `class Solution` rule inside the sandbox."""
    from btp import cli, evaluate, prompts, sandbox
    from btp.data import load_problems

    def program(p: Any, code: str) -> dict:
        prog = evaluate.build_program(p, code)
        rec = {
            "code": prog.code,
            "mode": prog.mode,
            "tests": list(prog.tests),
            "fn_name": prog.fn_name,
            "out_caps": list(prog.out_caps),
            "prelude": sandbox._LCB_PRELUDE if prog.mode != "script" else "",
            "solution_class": "Solution" if prog.mode == "functional" else None,
        }
        if prog.check:
            rec["verdicts"] = [[prog.check(i, o) for o in sample_outputs(t)] for i, t in enumerate(p.test_cases)]
        return rec

    api = {
        "build_prompt": prompts.build_prompt,
        "stops": prompts.completion_stops,
        "reference_output": prompts.reference_output,
        "program": program,
    }
    import argparse

    ap = argparse.ArgumentParser()
    cli.add_common(ap)
    names = next(a.choices for a in ap._actions if a.dest == "dataset")
    shared = {
        "names": list(names),
        "timeouts": [evaluate.DEFAULT_TIMEOUT[n] for n in names],
        "sizes": [
            len(load_problems("humaneval")),
            len(load_problems("mbpp")),
            len(load_problems("mbpp", variant="sanitized")),
        ],
    }
    return load_problems, api, shared


if __name__ == "__main__":
    if sys.argv[1:] != ["--old"]:
        raise SystemExit("usage: python tests/benchmark_golden.py --old  (with the original btp importable)")
    load, api, shared = _old_api()
    doc = {"about": __doc__.split("\n\n")[0], "shared": shared, "problems": records(load, api)}
    print(json.dumps(doc, indent=0, sort_keys=True))
