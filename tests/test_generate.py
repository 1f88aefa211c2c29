"""Generation stage: records, resume, seeds, presets; real vLLM and transformers on the embedded model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from btp.data import load_problems
from btp.generate import GenerateConfig, HfBackend, generate, parse_config, sample_seed
from btp.prompts import build_prompt, encode_prompt
from btp.store import read_jsonl

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
FIELDS = {
    "problem_id",
    "sample",
    "prompt",
    "prompt_token_ids",
    "output",
    "output_token_ids",
    "reasoning",
    "code",
    "finish_reason",
    "prompt_style",
    "provenance",
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama with a byte-level tokenizer and a chat template, saved as a HF folder."""
    d = tmp_path_factory.mktemp("tiny")
    tok = Tokenizer(models.BPE(vocab={chr(i): i for i in range(256)} | {"<s>": 256, "</s>": 257}, merges=[]))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Split("", "isolated"), decoders.Fuse()
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    t.chat_template = CHATML
    torch.manual_seed(0)
    m = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=258,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            bos_token_id=256,
            eos_token_id=257,
            pad_token_id=257,
        )
    ).eval()
    m.save_pretrained(d)
    t.save_pretrained(d)
    return m, t, (str(d), "tiny-llama", "test")


def _run(tiny, tmp_path, **kw):
    m, t, info = tiny
    cfg = GenerateConfig(dataset="humaneval", limit=2, max_tokens=6, results_dir=str(tmp_path), backend="hf", **kw)
    return generate(cfg, engine=HfBackend(m, t), tokenizer=t, model_info=info)


def test_records_fields_and_exact_prompt_ids(tiny, tmp_path):
    out = _run(tiny, tmp_path)
    assert out == tmp_path / "tiny-llama" / "humaneval" / "generations.jsonl"
    recs = read_jsonl(out)
    assert sorted((r["problem_id"], r["sample"]) for r in recs) == [("HumanEval/0", 0), ("HumanEval/1", 0)]
    p = load_problems("humaneval", limit=1)[0]
    r = next(r for r in recs if r["problem_id"] == "HumanEval/0")
    assert FIELDS <= r.keys() and r["prompt_style"] == "chat"
    assert r["prompt"] == build_prompt(p, tiny[1])[0] and r["prompt_token_ids"] == encode_prompt(
        r["prompt"], tiny[1], "chat"
    )
    assert 1 <= len(r["output_token_ids"]) <= 6 and r["finish_reason"] in ("stop", "length")
    assert r["output"] == tiny[1].decode(r["output_token_ids"], skip_special_tokens=True)
    assert r["provenance"]["model"] == "tiny-llama"
    runs = json.loads((out.parent / "generations.runs.json").read_text())
    assert runs[0]["stage"] == "generate" and runs[0]["config"]["max_tokens"] == 6


def test_resume_generates_only_missing_and_refuses_mixed_settings(tiny, tmp_path):
    out = _run(tiny, tmp_path, n=2, temperature=0.8)
    first = out.read_text()
    assert len(read_jsonl(out)) == 4
    _run(tiny, tmp_path, n=2, temperature=0.8)
    assert out.read_text() == first  # nothing missing, nothing appended
    _run(tiny, tmp_path, n=3, temperature=0.8)
    recs = read_jsonl(out)
    assert out.read_text().startswith(first) and sorted(r["sample"] for r in recs[4:]) == [2, 2]
    with pytest.raises(ValueError, match="temperature"):
        _run(tiny, tmp_path, n=3, temperature=0.2)
    # a torn last line from a killed writer is dropped and its pair generated again
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:-1]) + lines[-1][:20])
    with pytest.warns(UserWarning, match="torn"):
        _run(tiny, tmp_path, n=3, temperature=0.8)
    assert len(read_jsonl(out)) == 6


def test_hf_left_padding_matches_unbatched(tiny):
    """Greedy tokens of prompts of different lengths are the same in a padded batch and alone."""
    m, t, _ = tiny
    from btp.generate import Job

    probs = load_problems("humaneval", limit=3)
    jobs = []
    for p in probs:
        text, style = build_prompt(p, t)
        jobs.append(Job(p, 0, text, encode_prompt(text, t, style), style, 0))
    assert len({len(j.prompt_token_ids) for j in jobs}) == 3
    cfg = GenerateConfig(max_tokens=8)
    batched = HfBackend(m, t).run(jobs, cfg)
    alone = [HfBackend(m, t).run([j], cfg)[0] for j in jobs]
    assert [b.token_ids for b in batched] == [a.token_ids for a in alone]


def test_sample_seed_is_stable_and_distinct():
    assert sample_seed(0, "HumanEval/0", 0) == sample_seed(0, "HumanEval/0", 0)
    seeds = {sample_seed(s, f"HumanEval/{p}", k) for s in range(2) for p in range(10) for k in range(5)}
    assert len(seeds) == 100 and all(0 <= x < 2**31 for x in seeds)


def test_config_preset_and_flag_override(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(
        json.dumps(
            {
                "dataset": "mbpp",
                "max-tokens": 64,
                "temperature": 0.7,
                "chat_template_kwargs": {"enable_thinking": False},
            }
        )
    )
    cfg = parse_config(["--config", str(f), "--max-tokens", "32"])
    assert (cfg.dataset, cfg.max_tokens, cfg.temperature) == ("mbpp", 32, 0.7)
    assert cfg.chat_template_kwargs == {"enable_thinking": False}
    f.write_text(json.dumps({"max_tokenz": 1}))
    with pytest.raises(SystemExit):
        parse_config(["--config", str(f)])
    for preset in sorted((Path(__file__).parent.parent / "configs").glob("generate_*.json")):
        parse_config(["--config", str(preset)])  # shipped presets parse


def test_main_gives_data_file_to_the_benchmark_that_is_not_vendored(monkeypatch):
    import btp.generate as gen

    seen = []
    monkeypatch.setattr(
        gen, "generate", lambda cfg, session=None, **kw: seen.append((cfg.dataset, cfg.data_file)) or "out"
    )
    gen.main(["--dataset", "humaneval,livecodebench", "--data-file", "lcb.jsonl"])
    assert seen == [("humaneval", None), ("livecodebench", "lcb.jsonl")]
    seen.clear()
    gen.main(["--dataset", "mbpp", "--data-file", "m.jsonl"])  # a single benchmark takes it whatever it is
    assert seen == [("mbpp", "m.jsonl")]
    with pytest.raises(SystemExit, match="unknown"):
        gen.main(["--dataset", "humaneval,apps"])


# ---------------------------------------------------------------- real engines on the embedded model


@pytest.fixture(scope="module")
def smol():
    pytest.importorskip("vllm")
    from btp.generate import VllmBackend
    from btp.models import load_model, resolve_model_path

    ref = resolve_model_path("smollm2-135m")
    lm = load_model("smollm2-135m", dtype="float32", attn_implementation="sdpa")
    cfg = GenerateConfig(dtype="float32", enforce_eager=True, max_model_len=2048)
    engines = {
        "info": (ref.path, ref.model_id, ref.revision),
        "tok": lm.tokenizer,
        "hf": HfBackend(lm.model, lm.tokenizer),
        "vllm": VllmBackend(ref.path, cfg),
    }
    yield engines
    engines["vllm"].close()


def _gen(smol, backend, tmp_path, **kw):
    cfg = GenerateConfig(dataset="humaneval", limit=3, max_tokens=24, results_dir=str(tmp_path), dtype="float32", **kw)
    return read_jsonl(generate(cfg, engine=smol[backend], tokenizer=smol["tok"], model_info=smol["info"]))


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.parametrize("backend", ["vllm", "hf"])
def test_real_engine_writes_generations(smol, backend, tmp_path):
    recs = _gen(smol, backend, tmp_path / backend)
    assert sorted(r["problem_id"] for r in recs) == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    for r in recs:
        assert FIELDS <= r.keys() and r["prompt_style"] == "chat"
        assert r["prompt"].startswith("<|im_start|>") and r["prompt"].endswith("<|im_start|>assistant\n")
        assert r["prompt_token_ids"] == smol["tok"](r["prompt"], add_special_tokens=False)["input_ids"]
        assert 1 <= len(r["output_token_ids"]) <= 24 and r["output"].strip()
        assert r["finish_reason"] == ("length" if len(r["output_token_ids"]) == 24 else "stop")
        if r["code"]:
            assert r["output"][r["code_start"] : r["code_end"]] == r["code"]


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_and_hf_greedy_agree_on_first_tokens(smol, tmp_path):
    v = {r["problem_id"]: r for r in _gen(smol, "vllm", tmp_path / "v")}
    h = {r["problem_id"]: r for r in _gen(smol, "hf", tmp_path / "h")}
    agree = {}
    for pid in v:
        assert v[pid]["prompt_token_ids"] == h[pid]["prompt_token_ids"]
        a, b = v[pid]["output_token_ids"], h[pid]["output_token_ids"]
        agree[pid] = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    print("greedy tokens in agreement (vLLM vs HF, of 24):", agree)
    assert all(n >= 8 for n in agree.values()), agree


def test_repetition_guard_cuts_where_a_loop_starts_and_hf_stops_there():
    from types import SimpleNamespace

    from conftest import make_tiny

    from btp.generate import Completion, GenerateConfig, HfBackend, Job, apply_guard, guard_cut

    assert guard_cut([1, 2, 3, 4], 2) is None and guard_cut([1, 2, 1, 2, 1, 2, 9], 2) == 6
    assert guard_cut([7, 7, 7, 7], 1) == 3 and guard_cut([7, 7, 7], 0) is None
    dec = lambda t: ",".join(map(str, t))
    assert apply_guard("x", [1, 2, 1, 2, 1, 2, 9], "length", 2, dec) == Completion(
        "1,2,1,2,1,2", [1, 2, 1, 2, 1, 2], "repetition"
    )
    assert apply_guard("x", [1, 2, 3], "stop", 2, dec) == Completion("x", [1, 2, 3], "stop")
    model = make_tiny("llama")  # a random model falls into loops within a few tokens
    model.generation_config.eos_token_id = 127
    tok = SimpleNamespace(eos_token_id=127, pad_token_id=None, decode=lambda t, **kw: dec(t))
    hf = HfBackend(model, tok)
    jobs = [Job(None, 0, "", [1, 2, 3, 4], "chat", 0), Job(None, 0, "", [5, 6], "chat", 0)]
    free = hf.run(jobs, GenerateConfig(max_tokens=40))
    guarded = hf.run(jobs, GenerateConfig(max_tokens=40, repetition_guard=2))
    for f, g in zip(free, guarded):
        cut = guard_cut(f.token_ids, 2)
        assert cut is not None and g.token_ids == f.token_ids[:cut] and g.finish_reason == "repetition"
        assert g.text == dec(g.token_ids)


def test_repetition_guard_cuts_vllm_outputs_afterwards():
    pytest.importorskip("vllm")
    from types import SimpleNamespace as NS

    from btp.generate import Completion, GenerateConfig, Job, VllmBackend

    class FakeLLM:  # the engine's request outputs, without an engine
        def generate(self, prompts, params, use_tqdm=False):
            return [
                NS(outputs=[NS(text="looped", token_ids=[5, 1, 2, 1, 2, 1, 2, 3], finish_reason="length")]),
                NS(outputs=[NS(text="fine", token_ids=[5, 6, 7], finish_reason="stop")]),
            ]

        def get_tokenizer(self):
            return NS(decode=lambda t, skip_special_tokens=True: "|".join(map(str, t)))

    jobs = [Job(None, 0, "", [1], "chat", 0), Job(None, 0, "", [2], "chat", 1)]
    res = VllmBackend("unused", GenerateConfig(), llm=FakeLLM()).run(jobs, GenerateConfig(repetition_guard=2))
    assert res == [
        Completion("5|1|2|1|2|1|2", [5, 1, 2, 1, 2, 1, 2], "repetition"),
        Completion("fine", [5, 6, 7], "stop"),
    ]


def test_completion_generations_stop_at_the_benchmarks_stop_strings(tiny, tmp_path, monkeypatch):
    """Issue 12.2: the engines get the benchmark's stop strings (completion prompts) and stop there; the output text
    is its decoded tokens and ends with the stop string; provenance records them."""
    import sys
    import types

    from btp import benchmarks
    from btp.generate import Job, VllmBackend

    _, t, info = tiny
    stops = benchmarks.get("humaneval").stops
    tail = "    return 1\n# trailing prose the model would go on with\ndef more():\n"
    seen = {}

    class Stub:  # a model whose `generate` writes `tail` (no EOS) after each prompt
        generation_config = types.SimpleNamespace(eos_token_id=257)
        device = "cpu"

        def generate(self, input_ids, attention_mask, generation_config, **kw):
            seen.update(stop_strings=generation_config.stop_strings, tokenizer=kw.get("tokenizer"))
            new = torch.tensor(t(tail, add_special_tokens=False)["input_ids"]).expand(len(input_ids), -1)
            return torch.cat([input_ids, new], 1)

    cfg = GenerateConfig(
        dataset="humaneval", limit=2, max_tokens=64, results_dir=str(tmp_path), backend="hf", prompt_style="completion"
    )
    out = generate(cfg, engine=HfBackend(Stub(), t), tokenizer=t, model_info=info)
    assert seen["stop_strings"] == sorted(stops) and seen["tokenizer"] is t
    runs = json.loads((out.parent / "generations.runs.json").read_text())
    assert runs[0]["stop"] == list(stops)
    for r in read_jsonl(out):
        assert r["output"] == "    return 1\n#" == t.decode(r["output_token_ids"], skip_special_tokens=True)
        assert r["finish_reason"] == "stop" and r["code"] == "    return 1"
    # vLLM: the same stop strings, kept in the text so that it is the decoded token ids
    params = {}
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(SamplingParams=lambda **kw: params.update(kw)))

    class LLM:
        def generate(self, prompts, ps, use_tqdm):
            c = types.SimpleNamespace(text="x", token_ids=[1], finish_reason="stop")
            return [types.SimpleNamespace(outputs=[c]) for _ in prompts]

    p = load_problems("humaneval", limit=1)[0]
    VllmBackend.run(
        types.SimpleNamespace(llm=LLM()), [Job(p, 0, "", [1], "completion", 0, tuple(stops))], GenerateConfig()
    )
    assert params["stop"] == list(stops) and params["include_stop_str_in_output"] is True
