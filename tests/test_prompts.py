"""Prompt building (chat templates, completion prompts, LCB style) and code extraction."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from btp import benchmarks
from btp.benchmarks.livecodebench import SYSTEM as LCB_SYSTEM
from btp.benchmarks.livecodebench import WITH_STARTER as LCB_WITH_STARTER
from btp.benchmarks.livecodebench import WITHOUT_STARTER as LCB_WITHOUT_STARTER
from btp.data import load_problems
from btp.prompts import build_prompt, encode_prompt, extract, extract_code, reference_output

FIX = Path(__file__).parent / "fixtures" / "lcb_mini.jsonl"

# A ChatML template with Qwen3's `enable_thinking` switch, and one that refuses system messages (Gemma-like).
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
NO_SYSTEM = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def _tokenizer(template: str | None) -> PreTrainedTokenizerFast:
    """A real fast tokenizer (byte-level BPE without merges) so templates and encoding run for real."""
    tok = Tokenizer(models.BPE(vocab={chr(i): i for i in range(256)} | {"<s>": 256}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>")
    t.chat_template = template
    return t


@pytest.fixture(scope="module")
def he():
    return load_problems("humaneval", limit=3)


@pytest.fixture(scope="module")
def lcb():
    return load_problems("livecodebench", data_file=str(FIX))


def test_auto_style_follows_chat_template(he):
    text, style = build_prompt(he[0], _tokenizer(CHATML))
    assert style == "chat" and text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n")
    assert he[0].text.rstrip() in text and "```python" in text
    text, style = build_prompt(he[0], _tokenizer(None))
    assert (text, style) == (he[0].text, "completion")
    with pytest.raises(ValueError, match="chat template"):
        build_prompt(he[0], _tokenizer(None), style="chat")
    with pytest.raises(ValueError, match="style"):
        build_prompt(he[0], _tokenizer(CHATML), style="instruct")


def test_chat_template_kwargs_pass_through(he):
    tok = _tokenizer(CHATML)
    on, _ = build_prompt(he[0], tok, "chat")
    off, _ = build_prompt(he[0], tok, "chat", chat_template_kwargs={"enable_thinking": False})
    assert off == on + "<think>\n\n</think>\n\n"


def test_system_prompt_and_templates_without_system_role(lcb):
    text, _ = build_prompt(lcb[0], _tokenizer(CHATML), "chat")
    assert text.startswith(f"<|im_start|>system\n{LCB_SYSTEM}<|im_end|>")
    text, _ = build_prompt(lcb[0], _tokenizer(CHATML), "chat", system_prompt="Be brief.")
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>") and LCB_SYSTEM not in text
    text, _ = build_prompt(lcb[0], _tokenizer(NO_SYSTEM), "chat")  # system merged into the user turn
    assert text.startswith(f"<s><start_of_turn>user\n{LCB_SYSTEM}\n\n### Question:") and "system" not in text


def test_lcb_prompts_follow_livecodebench_style(lcb):
    tok = _tokenizer(CHATML)
    functional, stdin = lcb[0], lcb[1]
    f_text, _ = build_prompt(functional, tok, "chat")
    assert f"### Format: {LCB_WITH_STARTER}\n```python\n{functional.starter_code}\n```" in f_text
    assert "stdin" not in f_text and f_text.count("### Answer: (use the provided format with backticks)") == 1
    s_text, _ = build_prompt(stdin, tok, "chat")
    assert f"### Format: {LCB_WITHOUT_STARTER}\n```python\n# YOUR CODE HERE\n```" in s_text
    assert s_text.index("### Question:\n" + stdin.text) < s_text.index("### Format")
    c_text, style = build_prompt(functional, tok, "completion")
    assert style == "completion" and c_text.endswith("### Answer\n\n```python\n")
    assert f"### Starter Code\n{functional.starter_code}" in c_text


def test_mbpp_prompts_show_tests():
    p = load_problems("mbpp", limit=1)[0]
    chat, _ = build_prompt(p, _tokenizer(CHATML), "chat")
    assert all(t in chat for t in p.meta["test_list"]) and p.text in chat
    comp, _ = build_prompt(p, _tokenizer(CHATML), "completion")
    assert comp == f'"""\n{p.text}\n{p.meta["test_list"][0]}\n"""\n'


def test_encode_prompt_special_tokens(he):
    tok = _tokenizer(NO_SYSTEM)
    chat, _ = build_prompt(he[0], tok, "chat")
    ids = encode_prompt(chat, tok, "chat")
    assert ids[0] == 256 and ids.count(256) == 1 and tok.decode(ids) == chat  # BOS from the template only
    assert encode_prompt("ab", tok, "completion") == [97, 98]  # this tokenizer adds no BOS itself


# ---------------------------------------------------------------- extraction


def _check(out: str, code: str, reasoning: str | None = None, **kw):
    e = extract_code(out, **kw)
    assert e.code == code
    if code:
        assert out[e.code_start : e.code_end] == code
    else:
        assert (e.code_start, e.code_end) == (-1, -1)
    if reasoning is not None:
        assert e.reasoning == reasoning
    return e


def test_extract_last_python_block_with_text_after():
    out = "Plan.\n```python\nx = 1\n```\nBetter:\n```py\ndef f():\n    return 2\n```\nDone, it works."
    _check(out, "def f():\n    return 2", "Plan.\n```python\nx = 1\n```\nBetter:\n")


def test_extract_bare_and_other_languages():
    _check("Here:\n```\nprint(1)\n```", "print(1)", "Here:\n")
    # a shell block after the python block is not the answer; a ```Python3 tag counts
    _check("```Python3\na = 2\n```\nRun it:\n```bash\npython a.py\n```\n", "a = 2")
    _check("Only text, no code.", "", "Only text, no code.")
    _check("```text\nhello\n```", "")


def test_extract_truncated_block_and_empty_block():
    _check("Sure.\n```python\ndef f(x):\n    return x +", "def f(x):\n    return x +", "Sure.\n")
    _check("```python\nok = 1\n```\nAgain:\n```python\nok = 2\nwhile", "ok = 1")  # complete block wins
    e = extract_code("```python\n```")
    assert e.code == "" and e.code_start == 10 == e.code_end


def test_extract_think_blocks():
    draft = "<think>\nmaybe\n```python\ndraft = 1\n```\nhmm"
    _check(draft, "", draft)  # unfinished think: the draft is not the answer
    out = "<think>\n```python\ndraft = 1\n```\n</think>\n\n```python\nfinal = 2\n```"
    _check(out, "final = 2", "<think>\n```python\ndraft = 1\n```\n</think>\n\n")
    _check("<think>only thoughts</think>no code", "")
    # R1-style templates open <think> in the prompt: the output has only the closing tag
    _check("x\n```python\nd = 1\n```", "", in_think=True)
    _check("x\n</think>\n```python\nd = 1\n```", "d = 1", in_think=True)


def test_extract_completion_continuations():
    he = load_problems("humaneval", limit=1)[0]
    body = "    return any(abs(a - b) < threshold for a in numbers for b in numbers if a is not b)\n"
    e = extract(he, body + "\n\ndef main():\n    pass\n", "completion", he.text)
    assert e.code == body + "\n" and (e.code_start, e.reasoning) == (0, "")
    lcb = load_problems("livecodebench", data_file=str(FIX))[1]
    e = extract(lcb, "n = int(input())\nprint(sum(map(int, input().split())))\n```\n\nExplanation", "completion")
    assert e.code == "n = int(input())\nprint(sum(map(int, input().split())))"
    assert extract(lcb, "```\nrest", "completion").code == ""
    mbpp = load_problems("mbpp", limit=1)[0]
    assert extract(mbpp, "def f():\n  pass\nassert f() is None", "completion").code == "def f():\n  pass"


def test_extract_uses_prompt_think_state():
    he = load_problems("humaneval", limit=1)[0]
    out = "hmm\n```python\nx = 1\n```"
    assert extract(he, out, "chat", prompt="<|im_start|>assistant\n<think>\n").code == ""
    assert extract(he, out, "chat", prompt="<|im_start|>assistant\n<think>\n\n</think>\n\n").code == "x = 1"


@pytest.mark.parametrize("dataset,variant", [("humaneval", None), ("mbpp", "full"), ("mbpp", "sanitized")])
@pytest.mark.parametrize("style", ["chat", "completion"])
def test_reference_output_roundtrips_exactly(dataset, variant, style):
    for p in load_problems(dataset, variant=variant):
        out = reference_output(p, style)
        e = extract(p, out, style, build_prompt(p, _tokenizer(None), "completion")[0] if style == "completion" else "")
        ref = benchmarks.get(dataset).teacher_text(p)
        want = ref[len(p.text) :] if (dataset, style) == ("humaneval", "completion") else ref
        assert e.code == want and out[e.code_start : e.code_end] == want, p.problem_id
        if style == "chat":
            assert e.reasoning == "" and e.code_start == len("```python\n")


def test_reference_output_needs_a_reference(lcb):
    with pytest.raises(ValueError, match="no reference"):
        reference_output(lcb[0])
