"""Prompts per benchmark (chat template or plain completion) and code extraction from outputs.

Chat prompts go through the model's own chat template (`add_generation_prompt=True`, extra template
options such as `enable_thinking` passed through). Completion prompts are the benchmarks' usual
base-model prompts: HumanEval's own prompt, MBPP's docstring + one test (as in bigcode's harness),
LiveCodeBench's question/starter-code/answer layout ending in an opened ```python block. A completion
output continues code that the prompt opened, so it is cut at the benchmark's stop sequences.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

from .data import Problem

STYLES = ("auto", "chat", "completion")

# LiveCodeBench's own wording (lcb_runner/prompts/code_generation.py, generic chat style).
LCB_SYSTEM = ("You are an expert Python programmer. You will be given a question (problem specification) and will "
              "generate a correct Python program that matches the specification and passes all tests.")
LCB_WITH_STARTER = ("You will use the following starter code to write the solution to the problem and enclose your "
                    "code within delimiters.")
LCB_WITHOUT_STARTER = ("Read the inputs from stdin solve the problem and write the answer to stdout (do not directly "
                       "test on the sample inputs). Enclose your code within delimiters as follows. Ensure that when "
                       "the python program runs, it reads the inputs, runs the algorithm and writes output to STDOUT.")

# Stop sequences of completion prompts (bigcode-evaluation-harness / Codex paper conventions). MBPP drops
# the harness's "\nclass": a reference defines a class after other code (Mbpp/342, a heap Node).
HUMANEVAL_STOPS = ("\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```")
MBPP_STOPS = ("\nassert", '\n"""', "\nprint", "\nif", "\n```")
LCB_STOPS = ("\n```",)

PY_LANGS = ("", "python", "py", "python3")
_FENCE = re.compile(r"^[ \t]*```[ \t]*([A-Za-z0-9_+.-]*)[^\n]*$", re.M)


# ---------------------------------------------------------------- prompt text

def user_message(problem: Problem) -> str:
    """The instruction an instruct model sees for a problem."""
    if problem.dataset == "humaneval":
        return ("Complete the following Python function. Reply with the complete function, including its "
                "signature and any imports it needs, in a single ```python code block.\n\n"
                f"```python\n{problem.text.rstrip()}\n```\n")
    if problem.dataset == "mbpp":
        tests = "\n".join(problem.meta.get("test_list", []))
        return (f"You are an expert Python programmer, and here is your task: {problem.text.strip()} "
                f"Your code should pass these tests:\n\n{tests}\n\n"
                "Write the solution in a single ```python code block.\n")
    if problem.dataset == "livecodebench":
        p = f"### Question:\n{problem.text}\n\n"
        if problem.starter_code:
            p += f"### Format: {LCB_WITH_STARTER}\n```python\n{problem.starter_code}\n```\n\n"
        else:
            p += f"### Format: {LCB_WITHOUT_STARTER}\n```python\n# YOUR CODE HERE\n```\n\n"
        return p + "### Answer: (use the provided format with backticks)\n\n"
    raise ValueError(f"no prompt for dataset {problem.dataset!r}")


def completion_prompt(problem: Problem) -> str:
    """Plain prompt for a base model; its output continues the code the prompt opens."""
    if problem.dataset == "humaneval":
        return problem.text
    if problem.dataset == "mbpp":
        tests = problem.meta.get("test_list") or [""]
        return f'"""\n{problem.text.strip()}\n{tests[0]}\n"""\n'
    if problem.dataset == "livecodebench":
        p = f"### Question\n{problem.text}\n\n"
        if problem.starter_code:
            p += f"### Starter Code\n{problem.starter_code}\n\n"
        else:
            p += "### Format\nRead the inputs from stdin, solve the problem and write the answer to stdout.\n\n"
        return p + "### Answer\n\n```python\n"
    raise ValueError(f"no prompt for dataset {problem.dataset!r}")


def completion_stops(problem: Problem) -> tuple[str, ...]:
    return {"humaneval": HUMANEVAL_STOPS, "mbpp": MBPP_STOPS, "livecodebench": LCB_STOPS}[problem.dataset]


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def build_prompt(problem: Problem, tokenizer: Any, style: str = "auto", chat_template_kwargs: dict | None = None,
                 system_prompt: str | None = None) -> tuple[str, str]:
    """(prompt text, style used). `auto` is chat when the tokenizer has a chat template.
    LiveCodeBench chat prompts carry LCB's system message unless `system_prompt` replaces it."""
    if style not in STYLES:
        raise ValueError(f"prompt style must be one of {STYLES}, got {style!r}")
    if style == "auto":
        style = "chat" if has_chat_template(tokenizer) else "completion"
    if style == "completion":
        return completion_prompt(problem), style
    if not has_chat_template(tokenizer):
        raise ValueError("style 'chat' needs a tokenizer with a chat template; use --prompt-style completion")
    system = system_prompt if system_prompt is not None else (LCB_SYSTEM if problem.dataset == "livecodebench" else None)
    user = user_message(problem)
    kw = dict(chat_template_kwargs or {})
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    try:
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **kw)
    except Exception:  # noqa: BLE001 - some templates (e.g. Gemma) refuse a system role
        if not system:
            raise
        msgs = [{"role": "user", "content": f"{system}\n\n{user}"}]
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **kw)
    return text, style


def encode_prompt(text: str, tokenizer: Any, style: str) -> list[int]:
    """Token ids exactly as fed: a chat template already holds its special tokens (BOS etc.)."""
    return list(tokenizer(text, add_special_tokens=(style == "completion"))["input_ids"])


# ---------------------------------------------------------------- extraction

@dataclass(frozen=True)
class Extracted:
    reasoning: str   # text before the final code block, including any <think> part
    code: str        # the final code block's content; "" when there is none
    code_start: int  # char offsets of `code` inside the output; -1 when there is no code
    code_end: int


def _opens_think(prompt: str) -> bool:
    """The prompt itself opened a <think> block (e.g. R1-style templates end in '<think>\\n')."""
    return prompt.rfind("<think>") > prompt.rfind("</think>")


def _blocks(text: str, base: int) -> list[tuple[str, int, int, int, bool]]:
    """Fenced blocks of `text`: (lang, fence_start, content_start, content_end, complete); offsets + base."""
    out = []
    pos = 0
    while True:
        m = _FENCE.search(text, pos)
        if not m:
            return out
        lang = m.group(1).lower()
        cs = m.end() + 1 if m.end() < len(text) else m.end()
        close = re.compile(r"^[ \t]*```[ \t\r]*$", re.M).search(text, cs)
        if close is None:
            out.append((lang, base + m.start(), base + cs, base + len(text), False))
            return out
        ce = max(cs, close.start() - 1)  # drop the newline before the closing fence
        out.append((lang, base + m.start(), base + cs, base + ce, True))
        pos = close.end()


def extract_code(output: str, *, stops: Sequence[str] | None = None, in_think: bool = False) -> Extracted:
    """The answer's code and where it sits in `output`.

    Chat outputs (stops=None): the last complete ```python / ```py / bare block after any closed
    <think> part; text after it is fine; a truncated output yields its unfinished block; no block
    (or an unclosed <think>, a draft there is not the answer) yields code "".
    Completion outputs (stops given): the prompt opened the code, so the code is the output up to the
    first stop sequence (or a closing fence).
    """
    think_end = output.rfind("</think>")
    if think_end >= 0:
        start = think_end + len("</think>")
    elif in_think or "<think>" in output:
        return Extracted(output, "", -1, -1)
    else:
        start = 0
    region = output[start:]
    if stops is not None:
        cut = len(region)
        if region.startswith("```"):
            cut = 0
        for s in stops:
            i = region.find(s)
            if 0 <= i < cut:
                cut = i
        return Extracted(output[:start], region[:cut], start, start + cut)
    blocks = [b for b in _blocks(region, start) if b[0] in PY_LANGS]
    complete = [b for b in blocks if b[4]]
    pick = complete[-1] if complete else (blocks[-1] if blocks and not blocks[-1][4] else None)
    if pick is None:
        return Extracted(output, "", -1, -1)
    _, fence, cs, ce, _ = pick
    return Extracted(output[:fence], output[cs:ce], cs, ce)


def extract(problem: Problem, output: str, style: str, prompt: str = "") -> Extracted:
    """`extract_code` with the rules of the prompt style and whether the prompt opened a <think>."""
    stops = completion_stops(problem) if style == "completion" else None
    return extract_code(output, stops=stops, in_think=_opens_think(prompt))


def reference_output(problem: Problem, style: str = "chat") -> str:
    """The assistant answer that teacher-forces the benchmark's reference solution; `extract`
    (same style) returns exactly the reference (HumanEval completion: its canonical body)."""
    if problem.reference is None:
        raise ValueError(f"{problem.problem_id}: {problem.dataset} has no reference solution")
    if style == "completion":
        if problem.dataset == "humaneval":
            return problem.reference[len(problem.text):]
        return problem.reference
    return f"```python\n{problem.reference}\n```"
