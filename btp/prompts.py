"""Prompt rendering (chat template or plain completion) and code extraction from outputs.

Chat prompts go through the model's own chat template (`add_generation_prompt=True`, extra template
options such as `enable_thinking` passed through). What a prompt says, and where a completion's code
stops, is the benchmark's (`btp.benchmarks`): its user message, system message, completion prompt and
stop strings. A completion output continues code that the prompt opened, so it is cut at those stops.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import benchmarks
from .benchmarks import Problem

STYLES = ("auto", "chat", "completion")
PY_LANGS = ("", "python", "py", "python3")
_FENCE = re.compile(r"^[ \t]*```[ \t]*([A-Za-z0-9_+.-]*)[^\n]*$", re.M)


# ---------------------------------------------------------------- prompt text


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def build_prompt(
    problem: Problem,
    tokenizer: Any,
    style: str = "auto",
    chat_template_kwargs: dict | None = None,
    system_prompt: str | None = None,
) -> tuple[str, str]:
    """(prompt text, style used). `auto` is chat when the tokenizer has a chat template. Chat prompts
    carry the benchmark's system message (LiveCodeBench has one) unless `system_prompt` replaces it."""
    if style not in STYLES:
        raise ValueError(f"prompt style must be one of {STYLES}, got {style!r}")
    if style == "auto":
        style = "chat" if has_chat_template(tokenizer) else "completion"
    if style == "completion":
        return benchmarks.get(problem.dataset).completion_prompt(problem), style
    if not has_chat_template(tokenizer):
        raise ValueError("style 'chat' needs a tokenizer with a chat template; use --prompt-style completion")
    return _chat(problem, tokenizer, dict(chat_template_kwargs or {}), system_prompt), style


def _chat(problem: Problem, tokenizer: Any, kw: dict, system_prompt: str | None, answer: str | None = None) -> str:
    """The chat template's rendering of the benchmark's messages: with a generation prompt, or (`answer`) with a
    finished assistant turn holding `answer`."""
    bench = benchmarks.get(problem.dataset)
    system = system_prompt if system_prompt is not None else bench.system_prompt
    user = bench.user_message(problem)
    tail = [] if answer is None else [{"role": "assistant", "content": answer}]
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}] + tail
    try:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=answer is None, **kw)
    except Exception:  # noqa: BLE001 - some templates (e.g. Gemma) refuse a system role
        if not system:
            raise
        msgs = [{"role": "user", "content": f"{system}\n\n{user}"}] + tail
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=answer is None, **kw)


EMPTY_THINK_CLOSE = "\n</think>\n\n"  # closes a think block the generation prompt opened, with nothing in it


def assistant_turn(
    problem: Problem,
    tokenizer: Any,
    prompt: str,
    answer: str,
    chat_template_kwargs: dict | None = None,
    system_prompt: str | None = None,
) -> tuple[str, str]:
    """(text, turn end): what follows the generation prompt `prompt` when the model gives `answer` and ends its
    turn, as the chat template renders a finished answer with the generator's options. `text` holds whatever the
    template puts before the answer (Qwen3: an empty think block) or, where the prompt opened a think block that the
    template's rendering of a finished answer omits (DeepSeek-R1-Distill, QwQ), an empty closed one; `turn end` is the
    template's end of an assistant turn (`<|im_end|>`, `<|eot_id|>`, ..., not always the tokenizer's EOS), without
    the formatting after it that the model does not generate."""
    full = _chat(problem, tokenizer, dict(chat_template_kwargs or {}), system_prompt, answer)
    at = full.rfind(answer)
    if at < 0:
        raise ValueError("the chat template does not render the assistant's answer verbatim")
    turn_end = full[at + len(answer) :].rstrip()
    if full.startswith(prompt) and len(prompt) <= at:
        return full[len(prompt) : at + len(answer)], turn_end
    return (EMPTY_THINK_CLOSE if _opens_think(prompt) else "") + answer, turn_end


def encode_prompt(text: str, tokenizer: Any, style: str) -> list[int]:
    """Token ids exactly as fed: a chat template already holds its special tokens (BOS etc.)."""
    return list(tokenizer(text, add_special_tokens=(style == "completion"))["input_ids"])


# ---------------------------------------------------------------- extraction


@dataclass(frozen=True)
class Extracted:
    reasoning: str  # text before the final code block, including any <think> part
    code: str  # the final code block's content; "" when there is none
    code_start: int  # char offsets of `code` inside the output; -1 when there is no code
    code_end: int


def _opens_think(prompt: str) -> bool:
    """The prompt itself opened a <think> block (e.g. R1-style templates end in '<think>\\n')."""
    return prompt.rfind("<think>") > prompt.rfind("</think>")


@dataclass(frozen=True)
class _Block:
    """A fenced block; offsets into the whole output."""

    lang: str
    fence: int  # where its opening fence starts
    start: int  # its content
    end: int
    complete: bool  # it has a closing fence


def _blocks(text: str, base: int) -> list[_Block]:
    """Fenced blocks of `text`; offsets + base."""
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
            out.append(_Block(lang, base + m.start(), base + cs, base + len(text), False))
            return out
        ce = max(cs, close.start() - 1)  # drop the newline before the closing fence
        out.append(_Block(lang, base + m.start(), base + cs, base + ce, True))
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
    blocks = [b for b in _blocks(region, start) if b.lang in PY_LANGS]
    complete = [b for b in blocks if b.complete]
    pick = complete[-1] if complete else (blocks[-1] if blocks and not blocks[-1].complete else None)
    if pick is None:
        return Extracted(output, "", -1, -1)
    return Extracted(output[: pick.fence], output[pick.start : pick.end], pick.start, pick.end)


def extract(problem: Problem, output: str, style: str, prompt: str = "") -> Extracted:
    """`extract_code` with the rules of the prompt style and whether the prompt opened a <think>."""
    stops = benchmarks.get(problem.dataset).stops if style == "completion" else None
    return extract_code(output, stops=stops, in_think=_opens_think(prompt))


def reference_output(problem: Problem, style: str = "chat") -> str:
    """The assistant answer that teacher-forces the benchmark's reference solution; `extract`
    (same style) returns exactly the reference (HumanEval completion: its canonical body)."""
    return benchmarks.get(problem.dataset).reference_output(problem, style)
