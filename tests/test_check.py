"""btp.check and run_check.sh on a real results tree (tests/results_tree.py): the table, --json, broken files
(a corrupt JSONL line in the middle, a truncated npz, bad JSON) with non-zero exit, torn tails, stale and
incomplete outputs; the fast JSONL scan against full parsing."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from results_tree import model_dir, results_tree, tree_copy  # noqa: F401  (session fixture)

from btp import check

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def run(argv, capsys) -> tuple[int, str]:
    rc = check.main([str(a) for a in argv])
    return rc, capsys.readouterr().out


def test_table_on_real_tree(results_tree, capsys):
    rc, out = run(["--results-dir", results_tree], capsys)
    assert rc == 0, out
    md = model_dir(results_tree)
    assert f"model {md.name}" in out
    he = next(l for l in out.splitlines() if l.strip().startswith("humaneval"))
    mb = next(l for l in out.splitlines() if l.strip().startswith("mbpp"))
    # 2 problems x 2 samples generated and evaluated; entropy of three outputs; knockout; Taylor 3 of 3 iterations
    for cell in ("4/4 (2x2)", "4/4", "C-all R-all R-inc", "R-all-layers28_29+ko", "R-all(3/3 it)"):
        assert cell in he, (cell, he)
    for cell in ("2/2 (2x1)", "R-all", "R-all-layers28_29+ko"):
        assert cell in mb, (cell, mb)
    stop, length = (
        sum(1 for r in map(json.loads, (md / "humaneval/generations.jsonl").open()) if r["finish_reason"] == k)
        for k in ("stop", "length")
    )
    assert f"{stop}/{length}" in he
    s = json.loads((md / "humaneval/summary.json").read_text())["pass_at_k"]["pass@1"]
    assert f"{100 * s['estimate']:.1f}% [{100 * s['wilson_low']:.1f}, {100 * s['wilson_high']:.1f}]" in he
    assert s["wilson_high"] - s["wilson_low"] > 0.5  # 2 problems: wide, wherever the estimate sits
    assert "BROKEN" not in out and "STALE" not in out


def test_json_output_and_run_check_sh(results_tree):
    r = subprocess.run(
        ["bash", str(ROOT / "run_check.sh"), "--results-dir", str(results_tree), "--json"],
        capture_output=True,
        text=True,
        cwd="/",
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    rows = {row["dataset"]: row for row in doc["rows"]}
    he = rows["humaneval"]
    assert (he["generated"], he["total"], he["n"], he["problems"], he["evaluated"]) == (4, 4, 2, 2, 4)
    assert sum(he["statuses"].values()) == 4 and sum(he["finish"].values()) == 4
    assert set(he["stages"]) == {"entropy", "ablation", "taylor", "cmaes"}
    assert set(he["stages"]["entropy"]) == {"regular-all", "chain_code-all", "regular-incorrect"}
    assert he["stages"]["taylor"] == {"regular-all": "(3/3 it)"}
    assert list(he["stages"]["cmaes"]) == ["regular-all-keep210"]
    assert he["stages"]["cmaes"]["regular-all-keep210"].startswith("(2/2 gen, best ")
    assert doc["broken"] == 0 and rows["mbpp"]["generated"] == 2
    # the model filter understands the embedded name
    r2 = subprocess.run(
        [
            "bash",
            str(ROOT / "run_check.sh"),
            "--results-dir",
            str(results_tree),
            "--model",
            "smollm2-135m",
            "--dataset",
            "mbpp",
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    assert [row["dataset"] for row in json.loads(r2.stdout)["rows"]] == ["mbpp"]


def test_flags_broken_files(results_tree, tmp_path, capsys):
    root = tree_copy(results_tree, tmp_path / "t")
    md = model_dir(root)
    gen = md / "humaneval/generations.jsonl"
    lines = gen.read_bytes().split(b"\n")
    lines[1] = lines[1][: len(lines[1]) // 2]  # line 2 of 4 cut in half
    gen.write_bytes(b"\n".join(lines))
    npz = md / "humaneval/entropy/chain_code-all.npz"
    npz.write_bytes(npz.read_bytes()[: npz.stat().st_size // 2])  # truncated npz
    (md / "mbpp/summary.json").write_text('{"pass_at_k": ')  # unreadable json
    os.utime(gen, (gen.stat().st_atime, gen.stat().st_mtime - 1e6))  # no staleness noise
    rc, out = run(["--results-dir", root], capsys)
    assert rc == 1
    broken = [l for l in out.splitlines() if l.startswith("BROKEN")]
    assert any("humaneval/generations.jsonl: line 2: not valid JSON" in l for l in broken), out
    assert any("humaneval/entropy/chain_code-all.npz" in l for l in broken), out
    assert "INCOMPLETE" not in out, out  # a truncated npz is broken, not also "missing"
    assert any("mbpp/summary.json" in l for l in broken), out
    he = next(l for l in out.splitlines() if l.strip().startswith("humaneval"))
    assert "C-all" not in he and "R-all R-inc" in he  # the broken output is not counted as done
    assert "3/4" in he  # three readable generations
    rc, out = run(["--results-dir", root, "--json"], capsys)
    doc = json.loads(out)
    assert rc == 1 and doc["broken"] == 2
    assert {i["path"].split("/", 1)[1] for i in doc["issues"] if i["kind"] == "broken"} == {
        "humaneval/generations.jsonl",
        "humaneval/entropy/chain_code-all.npz",
        "mbpp/summary.json",
    }


def test_torn_tail_stale_and_incomplete(results_tree, tmp_path, capsys):
    root = tree_copy(results_tree, tmp_path / "t")
    md = model_dir(root)
    ev = md / "humaneval/evaluations.jsonl"
    data = ev.read_bytes().rstrip(b"\n")
    ev.write_bytes(data[: len(data) - 25])  # a killed writer: last line cut short
    gen = md / "mbpp/generations.jsonl"
    lines = gen.read_text().splitlines(keepends=True)
    gen.write_text("".join(lines) + lines[-1])  # regenerated: a later record of the same sample (other content)
    (md / "humaneval/entropy/regular-incorrect.json").unlink()
    rc, out = run(["--results-dir", root], capsys)
    assert rc == 0, out  # torn, stale and incomplete are not broken
    issues = [l for l in out.splitlines() if l.split(" ")[0] in ("TORN", "STALE", "INCOMPLETE")]
    assert any(l.startswith("TORN") and "humaneval/evaluations.jsonl" in l for l in issues), out
    stale = {l.split()[1].rstrip(":").split("/", 1)[1] for l in issues if l.startswith("STALE")}
    assert stale == {
        "mbpp/evaluations.jsonl",
        "mbpp/entropy/regular-all.npz",
        "mbpp/entropy/regular-all.json",
        "mbpp/ablation/regular-all-layers28_29.npz",
        "mbpp/ablation/regular-all-layers28_29.json",
        "mbpp/ablation/regular-all-layers28_29_knockout.json",
        # the humaneval evaluations changed: the summary and the incorrect population (its npz's own stamp; the
        # all-generations outputs do not depend on evaluations)
        "humaneval/summary.json",
        "humaneval/entropy/regular-incorrect.npz",
    }, stale
    assert any("mbpp/entropy/regular-all.npz: generations.jsonl changed since it was computed" in l for l in issues)
    assert any(l.startswith("INCOMPLETE") and "regular-incorrect.json" in l for l in issues)
    he = next(l for l in out.splitlines() if l.strip().startswith("humaneval"))
    assert "3/4" in he and "R-inc" not in he


def test_copy_with_new_file_times_stays_clean(results_tree, tmp_path, capsys):
    """Staleness is by content: `cp -r` without -p (every file gets a new time) and touching files in any order,
    inputs last, leave a clean tree clean."""
    root = tmp_path / "t"
    shutil.copytree(results_tree, root, copy_function=shutil.copy)  # as `cp -r`: new mtimes, in copy order
    files = sorted(p for p in root.rglob("*") if p.is_file())
    random.Random(0).shuffle(files)
    t = 2_000_000_000
    for i, p in enumerate(files):
        os.utime(p, (t + i, t + i))
    for p in root.rglob("generations.jsonl"):  # the inputs newest of all
        os.utime(p, (t + 10**6, t + 10**6))
    rc, out = run(["--results-dir", root], capsys)
    assert rc == 0 and "STALE" not in out and "INCOMPLETE" not in out, out
    r = subprocess.run(["cp", "-r", str(results_tree), str(tmp_path / "cp")], capture_output=True)
    assert r.returncode == 0, r.stderr
    rc, out = run(["--results-dir", tmp_path / "cp"], capsys)
    assert rc == 0 and "STALE" not in out, out


def test_missing_dir_exits_2(tmp_path, capsys):
    assert check.main(["--results-dir", str(tmp_path / "nope")]) == 2


@pytest.mark.parametrize("msgspec", [True, False], ids=["msgspec", "json"])
def test_fast_scan_matches_full_parse(results_tree, tmp_path, monkeypatch, msgspec):
    if not msgspec:
        monkeypatch.setitem(sys.modules, "msgspec", None)  # import fails: the json.loads path
    md = model_dir(results_tree)
    keys = ("problem_id", "sample", "finish_reason")
    for f in (md / "humaneval/generations.jsonl", md / "mbpp/generations.jsonl"):
        s = check.scan_jsonl(f, keys)
        want = [tuple(r[k] for k in keys) for r in map(json.loads, f.open())]
        assert s.values == want and s.lines == len(want) and not s.bad
    # keys inside strings or nested objects are not the record's; NaN (json.dumps writes it) is accepted
    tricky = tmp_path / "g.jsonl"
    recs = [
        {
            "problem_id": "A/1",
            "output": 'x "finish_reason": "length" "sample": 7',
            "sample": 0,
            "finish_reason": "stop",
        },
        {"problem_id": 'B"2', "sample": 1, "finish_reason": "length", "nested": {"a": [1, 2]}},
        {"sample": 2, "problem_id": "C/3", "finish_reason": None, "x": float("nan")},
        {"nested": {"problem_id": "D/4", "sample": 9}, "problem_id": "D/5", "sample": 3},
    ]
    tricky.write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    s = check.scan_jsonl(tricky, keys)
    assert s.values == [("A/1", 0, "stop"), ('B"2', 1, "length"), ("C/3", 2, None), ("D/5", 3, None)]
    assert not s.bad


@pytest.mark.parametrize("msgspec", [True, False], ids=["msgspec", "json"])
def test_scan_bad_lines_and_torn_tail(tmp_path, monkeypatch, msgspec):
    if not msgspec:
        monkeypatch.setitem(sys.modules, "msgspec", None)
    f = tmp_path / "x.jsonl"
    f.write_text('{"problem_id": "a", "sample": 0}\n[1, 2]\n{"problem_id": "b", "sample": 1}\n{"problem_id": "c"')
    s = check.scan_jsonl(f, ("problem_id", "sample"))
    assert [b[0] for b in s.bad] == [2] and s.torn and s.lines == 2
    f.write_text('{"problem_id": "a", "sample": 0}\n{"problem_id": "b", "sam\n{"problem_id": "c", "sample": 2}\n')
    s = check.scan_jsonl(f, ("problem_id", "sample"))
    assert [b[0] for b in s.bad] == [2] and not s.torn and [v[0] for v in s.values] == ["a", "c"]
    # damage inside a field the scan does not build is still found
    f.write_text('{"problem_id": "a", "ids": [1, 2]}\n{"problem_id": "b", "ids": [1,, 2]}\n{"problem_id": "c"}\n')
    s = check.scan_jsonl(f, ("problem_id",))
    assert [b[0] for b in s.bad] == [2] and s.lines == 2


def test_stem_names_and_expected_totals():
    from btp.results import parse_stem

    assert parse_stem("regular").population == "generations/correct"
    assert parse_stem("chain_code-reference-mean-layers1_2").population == "reference/all"
    assert parse_stem("regular-incorrect").population == "generations/incorrect"
    assert parse_stem("regular-all-layers28_29").population == "generations/all"
    assert check.short_stem("chain_code-reference") == "C-ref"
    assert check.short_stem("regular-all-layers28_29") == "R-all-layers28_29"
    runs = lambda **c: [{"config": {"n": 3, **c}}]
    assert check._expected_total(runs(limit=None), "humaneval", 5) == (3, 164 * 3)
    assert check._expected_total(runs(limit=10, variant="sanitized"), "mbpp", 10) == (3, 30)
    assert check._expected_total(runs(), "livecodebench", 7) == (3, 175 * 3)
    assert check._expected_total(runs(data_file="x.jsonl"), "livecodebench", 7) == (3, None)
    assert check._expected_total([], "humaneval", 2) == (None, None)


def test_reference_evaluations_wave2_dirs_and_partial_outputs(tmp_path, capsys):
    """Rows for `evaluate --reference` (evaluations without generations), CMA-ES and pruned dirs (wave 2) and an
    ablation still in progress, written through btp.store as the stages write them."""
    from btp.results import dataset_dir
    from btp.store import JsonlStore, provenance, write_json, write_npz

    ref = dataset_dir(tmp_path, "reference", "humaneval")
    st = JsonlStore(ref / "evaluations.jsonl")
    st.begin_run(provenance(stage="evaluate", model="reference", dataset="humaneval"))
    st.append([{"problem_id": f"HumanEval/{i}", "sample": 0, "passed": True, "status": "passed"} for i in range(3)])
    write_json(ref / "summary.json", {"pass_at_k": {"pass@1": {"estimate": 1.0, "ci_low": 1.0, "ci_high": 1.0}}})
    d = dataset_dir(tmp_path, "org/m", "mbpp")
    write_json(d / "cmaes" / "chain_code-reference.json", {"best": [[0, 1]]})
    write_json(d / "cmaes" / "chain_code-reference.runs.json", [])
    (d / "pruned" / "taylor-k20").mkdir(parents=True)
    write_npz(d / "ablation" / "regular-reference.partial.npz", key="x", done=[[True, False]])
    rc, out = run(["--results-dir", tmp_path], capsys)
    assert rc == 0, out
    ref_row = next(l for l in out.splitlines() if l.strip().startswith("humaneval"))
    assert ref_row.split()[1:5] == ["-", "-", "3", "100.0%"], ref_row
    row = next(l for l in out.splitlines() if l.strip().startswith("mbpp")).split()
    assert row[-4:] == ["R-ref(partial)", "-", "C-ref", "taylor-k20(0/0)"], row
    doc = json.loads(run(["--results-dir", tmp_path, "--json", "--model", "org/m"], capsys)[1])
    assert doc["rows"][0]["stages"]["cmaes"] == {"chain_code-reference": ""}
    assert doc["rows"][0]["pruned"] == {"taylor-k20": {"arms": 0, "generated": 0, "evaluated": 0, "summarized": 0}}


@pytest.mark.slow
def test_ablation_noise_floor_is_recorded_and_flagged(results_tree, tmp_path, capsys):
    """Issue 12.11: the matrix records its no-op rows' largest |delta| (tiny on CPU fp32); check flags a run whose
    noise floor exceeds the tolerance, without calling it broken."""
    root = tree_copy(results_tree, tmp_path / "t")
    p = model_dir(root) / "humaneval/ablation/regular-all-layers28_29.json"
    doc = json.loads(p.read_text())
    assert 0 <= doc["noop_max_abs_delta"] < check.NOOP_TOLERANCE
    rc, out = run(["--results-dir", root], capsys)
    assert "NOISY" not in out
    p.write_text(json.dumps({**doc, "noop_max_abs_delta": 0.05}))
    os.utime(p, (p.stat().st_atime, (p.parent / "regular-all-layers28_29.npz").stat().st_mtime))
    rc, out = run(["--results-dir", root], capsys)
    assert rc == 0 and any(l.startswith("NOISY") and "regular-all-layers28_29.json" in l for l in out.splitlines())


def test_shard_progress_until_merged(tmp_path, capsys):
    """A sharded analysis shows as `(shards done/N[, k partial])` under its output's name until it is merged."""
    from btp.results import dataset_dir
    from btp.store import write_json, write_npz

    d = dataset_dir(tmp_path, "org/m", "mbpp") / "entropy"
    for i in (0, 2):
        write_npz(d / f"regular-reference-shard{i}of3.npz", x=[1])
        write_json(d / f"regular-reference-shard{i}of3.json", {})
    write_npz(d / "regular-reference-shard1of3.partial.npz", key="k")
    doc = json.loads(run(["--results-dir", tmp_path, "--json"], capsys)[1])
    assert doc["rows"][0]["stages"]["entropy"] == {"regular-reference": "(shards 2/3, 1 partial)"}
    write_npz(d / "regular-reference.npz", x=[1])
    write_json(d / "regular-reference.json", {})
    doc = json.loads(run(["--results-dir", tmp_path, "--json"], capsys)[1])
    assert doc["rows"][0]["stages"]["entropy"] == {"regular-reference": ""}


def test_reference_self_check_beside_a_model(tmp_path):
    """README flow: `evaluate --reference` beside one model's results. check shows the self-check as such; plots
    draws the only model without asking for --model and says the self-check is not plotted."""
    import shutil

    env = dict(os.environ, PYTHONPATH=str(ROOT), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    res = tmp_path / "results"
    ev = [sys.executable, "-m", "btp.evaluate", "--dataset", "mbpp", "--reference", "--limit", "2", "--n-boot", "50"]
    r = subprocess.run([*ev, "--results-dir", str(res)], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "reference self-check: 2/2 pass" in r.stdout, r.stderr
    # a model's judged files (the same programs, filed as a model's)
    shutil.copytree(res / "reference" / "mbpp", res / "z--m" / "mbpp")
    r = subprocess.run(["bash", str(ROOT / "run_check.sh"), "--results-dir", str(res)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    blocks = r.stdout.split("\n\n")
    assert blocks[0].startswith("model z--m") and blocks[1].startswith("reference solutions (harness self-check)")
    assert "100.0%" in blocks[1].splitlines()[3], r.stdout
    plots = [sys.executable, "-m", "btp.plots", "--results-dir", str(res), "--out", str(tmp_path / "fig")]
    r = subprocess.run(plots, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "[btp.plots] not plotted: the reference self-check (btp.evaluate --reference): mbpp 2/2 pass" in r.stderr
    figs = sorted(p.name for p in (tmp_path / "fig").iterdir())
    assert len(figs) == 2 and "pass_at_k" in figs[0] and "statuses" in figs[1], figs
    r = subprocess.run([*plots, "--model", "reference"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "not plotted" not in r.stderr, r.stderr
