"""What every benchmark module shares: the `Problem` record, the JSONL reader, and the `Benchmark` base class.

A benchmark is one object (`btp.benchmarks.get(name)`) that owns everything its name means: where its
problems come from and how many there are, its prompts and stop strings, its reference answers, how a
candidate solution becomes a sandbox `Program`, and its default time limit. Nothing outside
`btp/benchmarks/` branches on a benchmark's name.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..sandbox import Program
from ..store import MalformedFileError, iter_jsonl

BENCH_DIR = Path(__file__).resolve().parent  # the vendored data files live beside their modules
LOAD_OPTIONS = ("limit", "variant", "data_file", "release", "start_date", "end_date")  # keywords of `load`


@dataclass(frozen=True)
class Problem:
    problem_id: str  # "HumanEval/0", "Mbpp/11", LiveCodeBench: its question_id
    dataset: str  # the benchmark's name (btp.benchmarks.NAMES)
    text: str  # HumanEval prompt, MBPP text, LCB question_content
    entry_point: str | None  # function the tests call; None for stdin problems
    test_code: str  # HumanEval `test`; MBPP setup/imports + asserts; LCB ""
    test_cases: tuple = field(default=(), hash=False)  # LCB: ({"input","output","testtype"}, ...) public then private
    reference: str | None = None  # complete reference program where the benchmark has one
    starter_code: str = ""
    meta: dict = field(default_factory=dict, hash=False, compare=False)


# ---------------------------------------------------------------- readers


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, record) of a benchmark JSONL file, plain or gzipped, read strictly (store's one reader)."""
    return iter_jsonl(path, tolerate_torn_tail=False, line_numbers=True)


def need(rec: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in rec]
    if missing:
        raise MalformedFileError(f"{where}: record lacks fields {missing}")


# ---------------------------------------------------------------- the benchmark object


@dataclass(frozen=True)
class Benchmark:
    """One benchmark. Data (name, order, limits, stops ...) are fields set where the module builds its
    instance; rules that need code are methods its subclass overrides."""

    name: str
    order: int  # position in tables, plots and CLI choices (NAMES is sorted by it)
    timeout: float  # default CPU seconds per test (the sandbox's wall limit is 3x + 1 s)
    stops: tuple[str, ...]  # where a completion-style output's code ends
    system_prompt: str | None = None  # default system message of chat prompts
    variants: tuple[str, ...] = ()  # problem sets of `load(variant=...)`; the first is the default
    options: tuple[str, ...] = ("limit", "data_file")  # keywords of `load` that change what it returns
    has_references: bool = True  # every problem carries a reference solution (`--reference`)
    vendored: bool = True  # data ships in btp/benchmarks/; if not, `--data-file` is for this one

    # ------------------------------------------------------------ problems

    def load(
        self,
        *,
        limit: int | None = None,
        variant: str | None = None,
        data_file: str | None = None,
        release: str | None = None,
        start_date: str | None = None,
        end_date: str | None = None,
    ) -> list[Problem]:
        """Problems in benchmark order; `limit` takes the first N. Options a benchmark does not use are
        ignored (callers pass one set of options to any benchmark)."""
        if data_file is not None and not Path(data_file).is_file():
            raise FileNotFoundError(
                f"--data-file {data_file} does not exist — give the path of an existing "
                f"{self.name} data file, or leave --data-file out"
            )
        probs = self.read(
            variant=variant,
            data_file=Path(data_file) if data_file else None,
            release=release,
            start_date=start_date,
            end_date=end_date,
        )
        if limit is not None:
            if limit < 0:
                raise ValueError(f"limit must be >= 0, got {limit}")
            probs = probs[:limit]
        return probs

    def read(
        self,
        *,
        variant: str | None,
        data_file: Path | None,
        release: str | None,
        start_date: str | None,
        end_date: str | None,
    ) -> list[Problem]:
        """Every problem of the (variant of the) benchmark, from `data_file` or the default source."""
        raise NotImplementedError

    def size(
        self,
        variant: str | None = None,
        *,
        release: str | None = None,
        data_file: str | None = None,
        start_date: str | None = None,
        end_date: str | None = None,
    ) -> int | None:
        """Problems `load` returns without a limit, when known without loading; None when not."""
        raise NotImplementedError

    # ------------------------------------------------------------ prompts

    def user_message(self, problem: Problem) -> str:
        """The instruction an instruct model sees."""
        raise NotImplementedError

    def completion_prompt(self, problem: Problem) -> str:
        """Plain prompt for a base model; its output continues the code the prompt opens."""
        raise NotImplementedError

    def teacher_text(self, problem: Problem) -> str:
        """The reference as teacher-forced for analysis (`reference_output`); the evaluator judges the raw
        `problem.reference`. A benchmark whose references carry artefacts of their source (line endings, trailing
        blanks) overrides this to score the model on the program, not on the artefacts."""
        if problem.reference is None:
            raise ValueError(f"{problem.problem_id}: {problem.dataset} has no reference solution")
        return problem.reference

    def reference_output(self, problem: Problem, style: str = "chat", code: str | None = None) -> str:
        """The assistant answer that teacher-forces `code` (default: `teacher_text`); `prompts.extract` (same
        style) returns exactly that code."""
        code = self.teacher_text(problem) if code is None else code
        if style == "completion":
            return code
        return f"```python\n{code}\n```"

    # ------------------------------------------------------------ judging

    def program(self, problem: Problem, code: str) -> Program:
        """The sandbox program that judges `code` as a solution of `problem`."""
        raise NotImplementedError
