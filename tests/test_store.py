"""Run store: layout, JSONL resume with torn tails, atomic writes, provenance, malformed-file errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from btp.results import dataset_dir, is_stale, model_slug
from btp.store import JsonlStore, MalformedFileError, provenance, read_json, read_jsonl, read_npz, write_json, write_npz


def test_slug_and_layout(tmp_path):
    assert model_slug("Qwen/Qwen2.5-Math-1.5B") == "Qwen--Qwen2.5-Math-1.5B"
    d = dataset_dir(tmp_path, "org/name", "mbpp")
    assert d == tmp_path / "org--name" / "mbpp" and d.is_dir()


def test_jsonl_resume_and_torn_tail(tmp_path):
    st = JsonlStore(tmp_path / "g.jsonl")
    st.begin_run(provenance(stage="t", model="m", dataset="d", seed=3, config={"a": 1}))
    st.append([{"problem_id": "p", "sample": i, "x": i} for i in range(3)])
    # a killed writer leaves half a line
    with open(st.path, "a") as f:
        f.write('{"problem_id": "p", "sample": 3, "x"')
    with pytest.warns(UserWarning, match="torn last line"):
        assert JsonlStore(st.path).done() == {("p", 0), ("p", 1), ("p", 2)}
    st2 = JsonlStore(st.path)
    with pytest.warns(UserWarning, match="dropping torn"):
        st2.append({"problem_id": "p", "sample": 3, "x": 3})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        recs = read_jsonl(st.path)
    assert [r["sample"] for r in recs] == [0, 1, 2, 3]
    assert recs[0]["provenance"]["model"] == "m" and recs[0]["provenance"]["seed"] == 3
    runs = read_json(st.runs_path)
    assert len(runs) == 1 and runs[0]["config"] == {"a": 1} and "torch" in runs[0]["versions"]


def test_complete_record_missing_newline_is_kept(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"problem_id": "a", "sample": 0}')
    JsonlStore(p).append({"problem_id": "a", "sample": 1})
    assert [r["sample"] for r in read_jsonl(p)] == [0, 1]


def test_killed_writer_loses_nothing_written(tmp_path):
    """A process killed mid-run: every appended batch survives, a restart skips them."""
    p = tmp_path / "k.jsonl"
    code = (
        f"import os, btp.store as s\nst = s.JsonlStore({str(p)!r})\n"
        "for i in range(5):\n    st.append({'problem_id': 'q', 'sample': i})\n"
        "os.kill(os.getpid(), 9)\n"
    )
    r = subprocess.run([sys.executable, "-c", code])
    assert r.returncode == -9
    assert JsonlStore(p).done() == {("q", i) for i in range(5)}


def test_malformed_middle_line_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"a": 1}\n{oops\n{"a": 2}\n')
    with pytest.raises(MalformedFileError, match=r"bad\.jsonl:2"):
        read_jsonl(p)
    p.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(MalformedFileError, match=r"bad\.jsonl:2.*object"):
        read_jsonl(p)
    (tmp_path / "b.json").write_text('{\n"a": }')
    with pytest.raises(MalformedFileError, match=r"b\.json:2"):
        read_json(tmp_path / "b.json")


def test_missing_key_fields_rejected(tmp_path):
    with pytest.raises(KeyError, match="sample"):
        JsonlStore(tmp_path / "x.jsonl").append({"problem_id": "p"})
    assert not (tmp_path / "x.jsonl").exists()


def test_atomic_npz_and_json(tmp_path, monkeypatch):
    p = tmp_path / "sub" / "r.npz"
    write_npz(p, provenance={"model": "m"}, a=np.arange(3.0))
    z = read_npz(p)
    assert z["provenance"] == {"model": "m"} and z["a"].tolist() == [0.0, 1.0, 2.0]
    # a failed write leaves the old file intact and no temp files behind
    monkeypatch.setattr(np, "savez_compressed", lambda f, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        write_npz(p, a=np.zeros(2))
    assert read_npz(p)["a"].tolist() == [0.0, 1.0, 2.0]
    assert sorted(os.listdir(p.parent)) == ["r.npz"]
    write_json(tmp_path / "j.json", {"x": np.float32(1.5), "y": np.arange(2)})
    assert json.loads((tmp_path / "j.json").read_text()) == {"x": 1.5, "y": [0, 1]}
    p.write_bytes(b"garbage")
    with pytest.raises(MalformedFileError, match="r.npz"):
        read_npz(p)


def test_staleness(tmp_path):
    a, b = tmp_path / "in", tmp_path / "out"
    b.write_text("o")
    a.write_text("i")
    os.utime(b, (1, 1))
    assert is_stale(b, a) and not is_stale(a, b)
