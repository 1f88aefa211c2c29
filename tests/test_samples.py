"""Analysis samples from a (fake, store-written) results tree and from reference solutions, with the real
SmolLM2 tokenizer: populations, deterministic choice, code spans, left cuts, notes and errors."""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import pytest

from btp.results import dataset_dir
from btp.samples import SampleConfig, SampleSet, add_sample_args, config_from_args, load_samples
from btp.store import JsonlStore, MalformedFileError, provenance

MODEL = "org/tiny-coder"
DS = "humaneval"
PIDS = ["HumanEval/3", "HumanEval/1", "HumanEval/7", "HumanEval/2"]  # file order, not sorted


@pytest.fixture(scope="module")
def tok():
    from btp.models import load_tokenizer

    return load_tokenizer()


def _code(pid: str, k: int) -> str:
    n = pid.split("/")[1]
    return f"def f{n}(x):\n    y = x * {k + 2}\n    return y + {n}\n"


def _output(pid: str, k: int) -> str:
    return (
        f"Let me think about problem {pid}. I multiply by {k + 2} and add.\n```python\n{_code(pid, k)}```\nThat is all."
    )


def _passed(pid: str, k: int) -> bool:
    return (PIDS.index(pid) + k) % 2 == 0


def write_tree(root, tok, *, evaluations=True, extra: list[dict] | None = None):
    """generations.jsonl (2 samples per problem) and evaluations.jsonl, written through the store."""
    d = dataset_dir(root, MODEL, DS)
    gens = JsonlStore(d / "generations.jsonl")
    gens.begin_run(provenance(stage="generate", model=MODEL, dataset=DS))
    recs = []
    for pid in PIDS:
        p_ids = tok(f"<|im_start|>user\nSolve {pid}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)[
            "input_ids"
        ]
        for k in range(2):
            out, code = _output(pid, k), _code(pid, k)
            start = out.index(code)
            recs.append(
                {
                    "problem_id": pid,
                    "sample": k,
                    "prompt_token_ids": p_ids,
                    "output": out,
                    "output_token_ids": tok(out, add_special_tokens=False)["input_ids"],
                    "code": code,
                    "code_start": start,
                    "code_end": start + len(code),
                }
            )
    gens.append(recs + (extra or []))
    if evaluations:
        ev = JsonlStore(d / "evaluations.jsonl")
        ev.begin_run(provenance(stage="evaluate", model=MODEL, dataset=DS))
        ev.append(
            [
                {"problem_id": r["problem_id"], "sample": r["sample"], "passed": _passed(r["problem_id"], r["sample"])}
                for r in recs
            ]
        )
    return d


def load(root, tok, **kw) -> SampleSet:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_samples(root, MODEL, DS, SampleConfig(**kw), tok)


def keys(ss: SampleSet) -> list[tuple[str, int]]:
    return [(s.problem_id, s.sample) for s in ss.samples]


# ---------------------------------------------------------------- populations and choice


def test_select_populations(tmp_path, tok):
    write_tree(tmp_path, tok)
    allk = [(p, k) for p in PIDS for k in range(2)]
    correct, incorrect, every = (load(tmp_path, tok, select=s) for s in ("correct", "incorrect", "all"))
    assert keys(correct) == [k for k in allk if _passed(*k)]
    assert keys(incorrect) == [k for k in allk if not _passed(*k)]
    assert keys(every) == allk  # in file order
    assert correct.config.stem == "regular" and incorrect.config.stem == "regular-incorrect"
    assert every.info["population"] == "generations:all" and every.describe()["problem_ids"] == [p for p, _ in allk]


def test_choice_is_deterministic_and_spreads_over_problems(tmp_path, tok):
    write_tree(tmp_path, tok)
    picks = [keys(load(tmp_path, tok, select="all", num_samples=3, seed=s)) for s in range(8)]
    assert picks[0] == keys(load(tmp_path, tok, select="all", num_samples=3, seed=0))
    assert len({tuple(p) for p in picks}) > 1  # the seed matters
    for p in picks:
        assert len(p) == 3 and len({pid for pid, _ in p}) == 3  # one sample per problem before a second
        assert p == sorted(p, key=lambda k: (PIDS.index(k[0]), k[1]))
    five = keys(load(tmp_path, tok, select="all", num_samples=5, seed=0))
    assert set(picks[0]) <= set(five) and len({pid for pid, _ in five}) == 4


def test_fewer_than_asked_says_so(tmp_path, tok):
    write_tree(tmp_path, tok)
    with pytest.warns(UserWarning, match="asked for 10 samples, only 4 exist"):
        ss = load_samples(tmp_path, MODEL, DS, SampleConfig(select="incorrect", num_samples=10), tok)
    assert len(ss) == 4 and ss.info["asked"] == 10 and any("asked for 10" in n for n in ss.info["notes"])


# ---------------------------------------------------------------- scored spans


def test_chain_code_scores_exactly_the_code(tmp_path, tok):
    write_tree(tmp_path, tok)
    reg = {(s.problem_id, s.sample): s for s in load(tmp_path, tok, select="all").samples}
    for s in load(tmp_path, tok, select="all", mode="chain_code").samples:
        assert tok.decode(s.targets) == _code(s.problem_id, s.sample)
        r = reg[(s.problem_id, s.sample)]
        assert np.array_equal(s.input_ids, r.input_ids)  # same context, only the scored span differs
        assert r.score_start < s.score_start and s.score_end == r.score_end
        out, code = _output(s.problem_id, s.sample), _code(s.problem_id, s.sample)
        assert tok.decode(r.targets) == out[: out.index(code) + len(code)]  # regular: the answer up to its code's end
        assert "That is all." in tok.decode(r.input_ids[r.score_end :])  # trailing prose: not scored
        assert "Let me think" in tok.decode(s.input_ids[: s.score_start])  # reasoning stays in context
        assert np.array_equal(s.positions + 1, np.arange(s.score_start, s.score_end))


def test_max_tokens_cuts_context_after_the_prompt_head(tmp_path, tok):
    write_tree(tmp_path, tok)
    full = load(tmp_path, tok, select="all", mode="chain_code", num_samples=1)
    s0 = full.samples[0]
    cap = len(s0.input_ids) - 5
    cut = load(tmp_path, tok, select="all", mode="chain_code", num_samples=1, max_tokens=cap).samples[0]
    assert len(cut.input_ids) == cap and cut.cut_left == 5
    # no benchmark body in this fake prompt: the leading special token (<|im_start|>) stays, the next 5 go
    assert np.array_equal(cut.input_ids, np.concatenate([s0.input_ids[:1], s0.input_ids[6:]]))
    assert np.array_equal(cut.targets, s0.targets) and cut.score_start == s0.score_start - 5
    # too small to keep the scored span plus its predicting position: left out, with a note
    with pytest.warns(UserWarning, match=r"\d+ samples? left out: longer than --sample-max-tokens"):
        with pytest.raises(ValueError, match="no analysis samples"):
            load_samples(
                tmp_path, MODEL, DS, SampleConfig(select="all", mode="chain_code", max_tokens=s0.n_scored), tok
            )


def test_too_long_samples_are_replaced_by_eligible_ones(tmp_path, tok):
    """A chosen sample that cannot fit max_tokens gives way to the next eligible one: the count asked for is
    met whenever enough samples exist."""
    long_out = "Thinking. " * 60 + "\n```python\n" + "x = 1\n" * 40 + "```"
    code = "x = 1\n" * 40
    extra = [
        {
            "problem_id": "HumanEval/9",
            "sample": 0,
            "prompt_token_ids": [1, 2, 3],
            "output": long_out,
            "output_token_ids": tok(long_out, add_special_tokens=False)["input_ids"],
            "code": code,
            "code_start": long_out.index(code),
            "code_end": long_out.index(code) + len(code),
        }
    ]
    write_tree(tmp_path, tok, evaluations=False, extra=extra)
    cap = 70
    every = load(tmp_path, tok, select="all", mode="chain_code", max_tokens=cap)
    assert "HumanEval/9" not in every.problem_ids and len(every) == 8
    for seed in range(6):
        ss = load(tmp_path, tok, select="all", mode="chain_code", max_tokens=cap, num_samples=5, seed=seed)
        assert len(ss) == 5 and all(len(s.input_ids) <= cap for s in ss.samples)


def test_fields_recompute_tokens(tmp_path, tok):
    write_tree(tmp_path, tok)
    ss = load(tmp_path, tok, select="all", mode="chain_code", num_samples=3)
    f = ss.fields()
    assert f["sample_offsets"].tolist() == np.cumsum([0] + [len(s.input_ids) for s in ss.samples]).tolist()
    for i, pos, t in zip(f["sample_index"], f["position"], f["token_id"]):
        ids = f["input_ids"][f["sample_offsets"][i] : f["sample_offsets"][i + 1]]
        assert ids[pos + 1] == t
    assert list(f["sample_problem_id"]) == ss.problem_ids and len(f["token_id"]) == ss.describe()["n_scored_tokens"]


def test_split_is_by_problem(tmp_path, tok):
    write_tree(tmp_path, tok)
    a, b = load(tmp_path, tok, select="all").split(0.25, seed=1)
    assert set(a.problem_ids).isdisjoint(b.problem_ids) and len(set(b.problem_ids)) == 1 and len(a) + len(b) == 8


# ---------------------------------------------------------------- notes and errors


def test_left_out_generations_are_noted(tmp_path, tok):
    nocode = {
        "problem_id": "HumanEval/8",
        "sample": 0,
        "prompt_token_ids": [1, 2],
        "output": "No idea.",
        "output_token_ids": tok("No idea.", add_special_tokens=False)["input_ids"],
        "code": "",
        "code_start": -1,
        "code_end": -1,
    }
    write_tree(tmp_path, tok, extra=[nocode])  # not evaluated either
    with pytest.warns(UserWarning, match="1 generations have no evaluation"):
        load_samples(tmp_path, MODEL, DS, SampleConfig(select="correct"), tok)
    ss = load(tmp_path, tok, select="all", mode="chain_code")
    assert "HumanEval/8" not in ss.problem_ids and any("no code block" in n for n in ss.info["notes"])
    assert "HumanEval/8" in load(tmp_path, tok, select="all").problem_ids  # regular mode scores it


def test_code_not_found_in_output_is_noted(tmp_path, tok):
    bad = {
        "problem_id": "HumanEval/8",
        "sample": 0,
        "prompt_token_ids": [1, 2],
        "output": "print(1)",
        "output_token_ids": tok("print(1)", add_special_tokens=False)["input_ids"],
        "code": "print(2)",
    }
    write_tree(tmp_path, tok, extra=[bad])
    ss = load(tmp_path, tok, select="all", mode="chain_code")
    assert "HumanEval/8" not in ss.problem_ids and any("no code block" in n for n in ss.info["notes"])


def test_clear_errors(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="generations.jsonl not found.*btp.generate"):
        load_samples(tmp_path, MODEL, DS, SampleConfig(), tok)
    write_tree(tmp_path, tok, evaluations=False)
    with pytest.raises(FileNotFoundError, match="evaluations.jsonl not found.*--select all"):
        load_samples(tmp_path, MODEL, DS, SampleConfig(select="correct"), tok)
    assert len(load(tmp_path, tok, select="all")) == 8
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        load_samples(tmp_path, MODEL, DS, SampleConfig(select="all", mode="chain_code"), None)
    with pytest.raises(ValueError, match="mode must be one of"):
        SampleConfig(mode="code_only")
    with pytest.raises(ValueError, match="num_samples"):
        SampleConfig(num_samples=0)
    with pytest.raises(ValueError, match="reference solutions are all correct"):
        load_samples(tmp_path, MODEL, DS, SampleConfig(source="reference", select="incorrect"), tok)
    gpath = dataset_dir(tmp_path, MODEL, DS) / "generations.jsonl"
    lines = gpath.read_text().splitlines()
    gpath.write_text("\n".join(lines[:2] + ["{not json"] + lines[2:]) + "\n")
    with pytest.raises(MalformedFileError, match=r"generations.jsonl:3"):
        load(tmp_path, tok, select="all")


def test_no_eligible_samples_is_an_error(tmp_path, tok):
    d = write_tree(tmp_path, tok, evaluations=False)
    ev = JsonlStore(d / "evaluations.jsonl")
    ev.append([{"problem_id": p, "sample": k, "passed": False} for p in PIDS for k in range(2)])
    with pytest.raises(ValueError, match="no analysis samples.*select=correct"):
        load(tmp_path, tok)


# ---------------------------------------------------------------- reference source


def test_reference_samples(tok):
    from btp.data import load_problems
    from btp.prompts import build_prompt, encode_prompt

    probs = {p.problem_id: p for p in load_problems(DS)}
    reg = load(None, tok, source="reference", num_samples=2, seed=3)
    cc = load(None, tok, source="reference", mode="chain_code", num_samples=2, seed=3)
    assert reg.problem_ids == cc.problem_ids and len(reg) == 2 and reg.config.stem == "regular-reference"
    assert cc.info["population"] == "reference:correct"
    for r, c in zip(reg.samples, cc.samples):
        p = probs[r.problem_id]
        prompt, style = build_prompt(p, tok, "auto")
        p_ids = encode_prompt(prompt, tok, style)
        assert style == "chat" and r.input_ids[: r.score_start].tolist() == p_ids  # the generator's prompt
        assert r.input_ids[-1] == tok.eos_token_id  # the turn end follows, unscored (issue 12.2)
        assert tok.decode(r.input_ids[r.score_start : -1]) == f"```python\n{p.reference}\n```"
        assert tok.decode(r.targets).startswith("```python\n") and r.score_end == c.score_end
        assert tok.decode(c.targets).strip() == p.reference.strip()
        assert np.array_equal(r.input_ids, c.input_ids) and r.sample == c.sample == -1
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        load_samples(None, MODEL, DS, SampleConfig(source="reference"), None)


def test_cli_flags_round_trip():
    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=int, default=0)
    add_sample_args(p)
    cfg = config_from_args(
        p.parse_args(
            [
                "--source",
                "reference",
                "--mode",
                "chain_code",
                "--num-samples",
                "4",
                "--sample-max-tokens",
                "900",
                "--seed",
                "7",
            ]
        )
    )
    assert cfg == SampleConfig(source="reference", mode="chain_code", num_samples=4, max_tokens=900, seed=7)
    assert cfg.stem == "chain_code-reference"
    with pytest.raises(SystemExit):
        p.parse_args(["--select", "best"])


def test_mbpp_reference_samples_teacher_force_normalised_text(tok):
    """Issue 12.1: the model is scored on the program, not on MBPP's carriage returns and trailing blanks."""
    from btp import benchmarks

    mbpp = benchmarks.get("mbpp")
    probs = mbpp.load(limit=6)
    for mode in ("regular", "chain_code"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ss = load_samples(None, MODEL, "mbpp", SampleConfig(source="reference", mode=mode), tok, probs)
        for s in ss.samples:
            text = tok.decode(s.targets)
            assert "\r" not in text and " \n" not in text, s.problem_id
        if mode == "chain_code":
            by = {p.problem_id: p for p in probs}
            assert all(tok.decode(s.targets) == mbpp.teacher_text(by[s.problem_id]) for s in ss.samples)


# a DeepSeek-R1-Distill-like template: the generation prompt opens a think block; a finished assistant turn is
# rendered without its think part and closed by a turn end that is not the tokenizer's EOS
R1_LIKE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}<|im_start|>user\n{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{% set c = m['content'] %}{% if '</think>' in c %}"
    "{% set c = c.split('</think>')[-1] %}{% endif %}<|im_start|>assistant\n{{ c }}<|endoftext|>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if not (no_think is defined and no_think) %}<think>\n{% endif %}{% endif %}"
)


@pytest.fixture
def r1_tok(tok):
    import copy

    t = copy.deepcopy(tok)
    t.chat_template = R1_LIKE
    assert t.eos_token != "<|endoftext|>"
    return t


def test_think_opening_template_reference_samples(r1_tok):
    """Issue 12.3: with a template whose generation prompt opens <think>, the reference is teacher-forced as a
    finished answer (an empty, closed think block), so chain_code finds the code and no sample is empty."""
    from btp import benchmarks
    from btp.prompts import extract

    probs = benchmarks.get("humaneval").load(limit=3)
    by = {p.problem_id: p for p in probs}
    for mode in ("regular", "chain_code"):
        ss = load_samples(None, MODEL, DS, SampleConfig(source="reference", mode=mode), r1_tok, probs)
        assert len(ss) == 3 and all(s.n_scored > 0 for s in ss.samples) and not ss.info["notes"]
        for s in ss.samples:
            prompt = r1_tok.decode(s.input_ids[: s.score_start] if mode == "regular" else [])
            if mode == "regular":
                out = r1_tok.decode(s.input_ids[s.score_start : -1])  # the text, as generate stores it: no turn end
                assert prompt.endswith("<think>\n") and out.startswith("\n</think>\n\n```python\n")
                assert extract(by[s.problem_id], out, "chat", prompt).code == by[s.problem_id].reference
            else:
                assert r1_tok.decode(s.targets).strip() == by[s.problem_id].reference.strip()


def test_reference_turn_end_and_prompt_options_are_the_generators(r1_tok):
    """Issue 12.4: the reference prompt carries generate's system prompt and template options, and the turn ends
    with the template's turn end (here <|endoftext|>), not the tokenizer's EOS."""
    from btp import benchmarks
    from btp.prompts import build_prompt, encode_prompt

    p = benchmarks.get("humaneval").load(limit=1)
    cfg = dict(source="reference", system_prompt="SYS", chat_template_kwargs={"no_think": True})
    s = load_samples(None, MODEL, DS, SampleConfig(**cfg), r1_tok, p).samples[0]
    prompt, _ = build_prompt(p[0], r1_tok, "auto", {"no_think": True}, "SYS")
    assert "SYS" in prompt and not prompt.endswith("<think>\n")
    assert s.input_ids[: s.score_start].tolist() == encode_prompt(prompt, r1_tok, "chat")
    assert r1_tok.convert_ids_to_tokens(int(s.input_ids[-1])) == "<|endoftext|>" != r1_tok.eos_token
    assert r1_tok.decode(s.input_ids[s.score_start : -1]) == f"```python\n{p[0].reference}\n```"


def test_paired_selects_keep_problems_with_both_verdicts(tmp_path, tok):
    """Issue 12.12: `correct_paired` / `incorrect_paired` compare the same problems; a problem with only correct
    generations is in `correct` but in neither paired population."""
    d = write_tree(tmp_path, tok)
    easy = "HumanEval/9"
    p_ids = tok("<|im_start|>user\nSolve it<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    gens, ev = JsonlStore(d / "generations.jsonl"), JsonlStore(d / "evaluations.jsonl")
    out, code = _output(easy, 0), _code(easy, 0)
    gens.append(
        [
            {
                "problem_id": easy,
                "sample": 0,
                "prompt_token_ids": p_ids,
                "output": out,
                "output_token_ids": tok(out, add_special_tokens=False)["input_ids"],
                "code": code,
                "code_start": out.index(code),
                "code_end": out.index(code) + len(code),
            }
        ]
    )
    ev.append([{"problem_id": easy, "sample": 0, "passed": True}])
    correct = load(tmp_path, tok, select="correct")
    cp, ip = load(tmp_path, tok, select="correct_paired"), load(tmp_path, tok, select="incorrect_paired")
    assert easy in correct.problem_ids and easy not in cp.problem_ids + ip.problem_ids
    assert sorted(set(cp.problem_ids)) == sorted(set(ip.problem_ids)) == sorted(PIDS)
    assert cp.config.stem == "regular-correct_paired" and ip.config.stem == "regular-incorrect_paired"
    assert any("paired" in n for n in cp.info["notes"])


def test_max_tokens_keeps_bos_template_start_and_system_prompt(tok):
    """Issue 12.5: a cut keeps the prompt's head (template start, system prompt) and removes the start of the body
    (the user message), not the head."""
    from btp import benchmarks
    from btp.samples import prompt_head

    probs = benchmarks.get("humaneval").load(limit=1)
    full = load_samples(None, MODEL, DS, SampleConfig(source="reference", mode="chain_code"), tok, probs).samples[0]
    cap = len(full.input_ids) - 10
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cut = load_samples(
            None, MODEL, DS, SampleConfig(source="reference", mode="chain_code", max_tokens=cap), tok, probs
        ).samples[0]
    from btp.prompts import build_prompt, encode_prompt

    prompt, _ = build_prompt(probs[0], tok, "auto")
    p_ids = encode_prompt(prompt, tok, "chat")
    head, lead = prompt_head(tok, p_ids, prompt, benchmarks.get("humaneval").user_message(probs[0]))
    assert lead == 1 < head
    text = tok.decode(p_ids[:head], skip_special_tokens=False)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>user\n"), text
    assert len(cut.input_ids) == cap and cut.cut_left == 10
    assert np.array_equal(cut.input_ids[:head], full.input_ids[:head])  # the head stays
    assert np.array_equal(cut.input_ids[head:], full.input_ids[head + 10 :])  # the body's start goes
    assert np.array_equal(cut.targets, full.targets)
    # too little room for the system prompt: the template start's special tokens stay, the rest goes
    short = full.n_scored + 8  # the fence and turn end after the code stay too
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tight = load_samples(
            None, MODEL, DS, SampleConfig(source="reference", mode="chain_code", max_tokens=short), tok, probs
        ).samples[0]
    assert tight.input_ids[0] == full.input_ids[0] and len(tight.input_ids) == short
    assert np.array_equal(tight.targets, full.targets)


def test_verdicts_of_other_code_are_refused(tmp_path, tok):
    """Issue 12.6: an evaluation is matched to its generation by the hash of the code it judged; a verdict of other
    code (the sample was regenerated after evaluation) does not label this sample."""
    from btp.results import code_sha

    d = write_tree(tmp_path, tok)
    ev = JsonlStore(d / "evaluations.jsonl")
    pid = PIDS[0]
    ev.append(
        [
            {"problem_id": pid, "sample": 0, "passed": not _passed(pid, 0), "code_sha": code_sha("other code")},
            {"problem_id": pid, "sample": 1, "passed": _passed(pid, 1), "code_sha": code_sha(_code(pid, 1))},
        ]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ss = {s: load_samples(tmp_path, MODEL, DS, SampleConfig(select=s), tok) for s in ("correct", "incorrect")}
    keys_all = keys(ss["correct"]) + keys(ss["incorrect"])
    assert (pid, 0) not in keys_all and (pid, 1) in keys_all  # refused / matching hash accepted
    assert any("verdict of other code" in n for n in ss["correct"].info["notes"])


def test_code_span_guard_uses_the_stored_text(tmp_path, tok):
    """Issue 12.6: offsets into a stored output whose tokens decode to another text are not token positions; such a
    generation is left out with a note instead of scoring the wrong tokens."""
    out = "Intro.\n```python\nx = 1\n```"
    ids = tok("Something else entirely.\n```python\nx = 1\n```", add_special_tokens=False)["input_ids"]
    bad = {
        "problem_id": "HumanEval/8",
        "sample": 0,
        "prompt_token_ids": [1, 2],
        "output": out,
        "output_token_ids": ids,
        "code": "x = 1",
        "code_start": out.index("x = 1"),
        "code_end": out.index("x = 1") + 5,
    }
    write_tree(tmp_path, tok, extra=[bad])
    ss = load(tmp_path, tok, select="all", mode="chain_code")
    assert "HumanEval/8" not in ss.problem_ids and any("do not decode" in n for n in ss.info["notes"])
    assert len(ss) == 8


def test_regular_mode_ends_at_the_code(tmp_path, tok):
    """Issue 12.2: `regular` scores the output from its first token to the end of its code span; what a model writes
    after the code (prose, or a completion model's continuation up to --max-tokens) is not scored; an output without
    code is scored whole."""
    junk = "\nprint(f(1))\n" + "# more and more text\n" * 30
    out = "def f(x):\n    return x\n" + junk
    code = "def f(x):\n    return x\n"
    rec = {
        "problem_id": "HumanEval/8",
        "sample": 0,
        "prompt_token_ids": [1, 2],
        "output": out,
        "output_token_ids": tok(out, add_special_tokens=False)["input_ids"],
        "code": code,
        "code_start": 0,
        "code_end": len(code),
    }
    prose = {
        "problem_id": "HumanEval/9",
        "sample": 0,
        "prompt_token_ids": [1, 2],
        "output": "No idea.",
        "output_token_ids": tok("No idea.", add_special_tokens=False)["input_ids"],
        "code": "",
        "code_start": -1,
        "code_end": -1,
    }
    write_tree(tmp_path, tok, extra=[rec, prose])
    by = {s.problem_id: s for s in load(tmp_path, tok, select="all").samples}
    assert tok.decode(by["HumanEval/8"].targets) == code
    assert tok.decode(by["HumanEval/9"].targets) == "No idea."
