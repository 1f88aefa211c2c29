"""Benchmark loaders: counts, fields, MBPP entry points, LCB decoding, date window, bad input."""

from __future__ import annotations

import base64
import hashlib
import json
import pickle
import zlib
from pathlib import Path

import pytest

from btp.benchmarks.mbpp import _parse
from btp.data import (
    BENCH_DIR,
    VENDORED_SHA256,
    Problem,
    decode_lcb_tests,
    lcb_release_files,
    load_problems,
    mbpp_entry_point,
)
from btp.store import MalformedFileError

FIX = Path(__file__).parent / "fixtures" / "lcb_mini.jsonl"


def test_vendored_files_match_recorded_sha256():
    for name, sha in VENDORED_SHA256.items():
        assert hashlib.sha256((BENCH_DIR / name).read_bytes()).hexdigest() == sha, name
        assert sha in (BENCH_DIR / "README.md").read_text()


def test_humaneval_all_164_with_runnable_reference():
    ps = load_problems("humaneval")
    assert len(ps) == 164 and [p.problem_id for p in ps[:2]] == ["HumanEval/0", "HumanEval/1"]
    p = ps[0]
    assert p.dataset == "humaneval" and p.entry_point == "has_close_elements"
    assert p.reference.startswith(p.text) and p.starter_code == p.text and "def check(candidate)" in p.test_code
    ns: dict = {}
    exec(p.reference + "\n" + p.test_code + f"\ncheck({p.entry_point})", ns)  # trusted vendored data


def test_mbpp_full_test_split_is_ids_11_to_510():
    ps = load_problems("mbpp")
    assert len(ps) == 500
    assert ps[0].problem_id == "Mbpp/11" and ps[-1].problem_id == "Mbpp/510"
    assert ps[0].entry_point == "remove_Occ" and ps[0].starter_code == ""
    assert ps[0].meta["test_list"][0] in ps[0].test_code and len(ps[0].meta["challenge_test_list"]) == 2
    assert "\r\n" in ps[0].reference  # upstream line endings kept


def test_mbpp_setup_code_precedes_asserts_and_runs():
    p = next(p for p in load_problems("mbpp") if p.problem_id == "Mbpp/367")
    assert p.entry_point == "is_tree_balanced" and p.test_code.startswith("root = Node(1)")
    exec(p.reference + "\n" + p.test_code, {})  # \r\n strings still execute


def test_mbpp_sanitized_257_sorted_with_imports():
    ps = load_problems("mbpp", variant="sanitized")
    assert len(ps) == 257 and all(11 <= int(p.problem_id.split("/")[1]) <= 510 for p in ps)
    ids = [int(p.problem_id.split("/")[1]) for p in ps]
    assert ids == sorted(ids)
    with_imports = [p for p in ps if p.meta["test_imports"]]
    assert with_imports and all(p.test_code.startswith(p.meta["test_imports"][0]) for p in with_imports)


@pytest.mark.parametrize("variant", ["full", "sanitized"])
def test_mbpp_entry_points_are_defined_by_reference(variant):
    for p in load_problems("mbpp", variant=variant):
        defs = {n.name for n in _parse(p.reference.replace("\r\n", "\n")).body if hasattr(n, "name")}
        assert p.entry_point in defs, p.problem_id


def test_mbpp_entry_point_prefers_defined_function_over_wrapper():
    assert mbpp_entry_point("def f(x):\n  return x", ["assert set(f([1])) == {1}"]) == "f"
    assert mbpp_entry_point("", ["assert g(1) == 2"]) == "g"
    assert mbpp_entry_point("", ["not python ("]) is None


def test_limit_and_bad_arguments():
    assert [p.problem_id for p in load_problems("humaneval", limit=3)] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    with pytest.raises(ValueError, match="unknown dataset"):
        load_problems("apps")
    with pytest.raises(ValueError, match="variant"):
        load_problems("mbpp", variant="plus")
    with pytest.raises(FileNotFoundError):
        load_problems("livecodebench", data_file="/nonexistent.jsonl")


def test_lcb_fixture_public_then_private_tests():
    ps = load_problems("livecodebench", data_file=str(FIX))
    assert [p.problem_id for p in ps] == ["9001", "abc390_a", "2044A", "9002"]
    fn, sd = ps[0], ps[1]
    assert isinstance(fn, Problem) and fn.dataset == "livecodebench" and fn.test_code == "" and fn.reference is None
    # functional LeetCode problem: func_name, starter code, compressed private tests decoded
    assert fn.entry_point == "pairSum" and fn.starter_code.startswith("class Solution:")
    assert len(fn.test_cases) == 4 and fn.meta["n_public_tests"] == 1
    assert fn.test_cases[0] == {"input": "[2, 7, 11, 15]\n9", "output": "[0, 1]", "testtype": "functional"}
    assert fn.test_cases[-1]["input"] == "[1, 5, 9, 14]\n23"
    # stdin AtCoder problem: no entry point, plain-JSON private tests
    assert sd.entry_point is None and sd.starter_code == "" and sd.meta["platform"] == "atcoder"
    assert [t["testtype"] for t in sd.test_cases] == ["stdin"] * 3 and sd.test_cases[2]["output"] == "2\n"


def test_lcb_date_window_inclusive():
    ids = lambda **kw: [p.problem_id for p in load_problems("livecodebench", data_file=str(FIX), **kw)]  # noqa: E731
    assert ids(start_date="2025-01", end_date="2025-04") == ["9001", "abc390_a", "9002"]
    assert ids(start_date="2025-02-08", end_date="2025-02-08") == ["abc390_a"]
    assert ids(end_date="2024-12") == ["2044A"]
    with pytest.raises(ValueError, match="YYYY-MM"):
        ids(start_date="Jan 2025")


def test_decode_lcb_tests_both_encodings_and_refuses_code():
    tests = [{"input": "1\n", "output": "2\n", "testtype": "stdin"}]
    assert decode_lcb_tests(json.dumps(tests)) == tests
    assert decode_lcb_tests(base64.b64encode(zlib.compress(pickle.dumps(json.dumps(tests)))).decode()) == tests
    evil = base64.b64encode(zlib.compress(pickle.dumps(Path("/x")))).decode()  # would import pathlib
    with pytest.raises(MalformedFileError, match="refusing"):
        decode_lcb_tests(evil, "f.jsonl:3")
    with pytest.raises(MalformedFileError, match="f.jsonl:3"):
        decode_lcb_tests("@@not-base64@@", "f.jsonl:3")


def test_lcb_bad_line_names_file_and_line(tmp_path):
    bad = tmp_path / "lcb.jsonl"
    bad.write_text(FIX.read_text().splitlines()[0] + "\n{broken\n")
    with pytest.raises(MalformedFileError, match=r"lcb.jsonl:2"):
        load_problems("livecodebench", data_file=str(bad))
    rec = json.loads(FIX.read_text().splitlines()[0])
    del rec["public_test_cases"]
    bad.write_text(json.dumps(rec) + "\n")
    with pytest.raises(MalformedFileError, match=r"lcb.jsonl:1.*public_test_cases"):
        load_problems("livecodebench", data_file=str(bad))


def test_lcb_release_files_follow_livecodebench_naming():
    assert lcb_release_files("v6") == ["test6.jsonl"]
    assert lcb_release_files("release_v2") == ["test.jsonl", "test2.jsonl"]
    assert lcb_release_files("v5_v6") == ["test5.jsonl", "test6.jsonl"]
    with pytest.raises(ValueError):
        lcb_release_files("v9")
    with pytest.raises(ValueError):
        lcb_release_files("latest-ish")


def test_lcb_hub_failure_names_file_and_fallback(monkeypatch):
    hub = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)  # no network wait; an empty cache cannot answer
    monkeypatch.setattr(hub, "HF_HUB_CACHE", "/nonexistent-btp-hf-cache")
    with pytest.raises(RuntimeError, match=r"test6\.jsonl.*--data-file"):
        load_problems("livecodebench", release="v6")
