"""btp.results: the layout, the stem grammar (every name the stages write round-trips), the claim (fresh / resume /
done, refusal naming the differing field, --force), partial-progress files, runs files, staleness, readers; the
one JSONL reader; and a scan that no other module parses names or compares settings itself."""

from __future__ import annotations

import gzip
import os
import re
from pathlib import Path

import numpy as np
import pytest

from btp import results as R
from btp.store import MalformedFileError, iter_jsonl, write_json, write_npz

ROOT = Path(__file__).resolve().parent.parent

# every stem the stages write, with (mode, population, variant words)
STEMS = {
    "regular": ("regular", "generations/correct", ()),
    "chain_code": ("chain_code", "generations/correct", ()),
    "chain_code-reference": ("chain_code", "reference/all", ()),
    "regular-incorrect": ("regular", "generations/incorrect", ()),
    "regular-all": ("regular", "generations/all", ()),
    "regular-mean": ("regular", "generations/correct", ("mean",)),
    "regular-all-layers28_29": ("regular", "generations/all", ("layers28_29",)),
    "chain_code-reference-mean-layers0_5": ("chain_code", "reference/all", ("mean", "layers0_5")),
    "regular-layers0_5": ("regular", "generations/correct", ("layers0_5",)),
    "regular-reference-token": ("regular", "reference/all", ("token",)),
    "regular-incorrect-signed-nonorm-mytag": ("regular", "generations/incorrect", ("signed", "nonorm", "mytag")),
}


# ---------------------------------------------------------------- layout and grammar


def test_layout(tmp_path):
    assert R.model_slug("Qwen/Qwen2.5-Math-1.5B") == "Qwen--Qwen2.5-Math-1.5B"
    d = R.dataset_dir(tmp_path, "org/name", "mbpp")
    assert d == tmp_path / "org--name" / "mbpp" and d.is_dir()
    assert R.stage_dir(tmp_path, "org/name", "mbpp", "entropy_lens") == d / "entropy"
    out = R.output(tmp_path, "org/name", "mbpp", "ablation", "regular-mean")
    assert out.path("npz") == d / "ablation" / "regular-mean.npz"
    assert out.path("json", R.KNOCKOUT) == d / "ablation" / "regular-mean_knockout.json"
    assert out.partial("json", R.KNOCKOUT) == d / "ablation" / "regular-mean_knockout.partial.json"
    assert R.output(tmp_path, "m", "x", "taylor", "regular").path("runs.json") == R.runs_path(
        R.output(tmp_path, "m", "x", "taylor", "regular").path("jsonl")
    )
    assert R.evaluations_path(d / "generations.jsonl") == d / "evaluations.jsonl"
    assert R.evaluations_path(tmp_path / "p.jsonl") == tmp_path / "p.evaluations.jsonl"
    assert R.summary_path(tmp_path / "p.evaluations.jsonl") == tmp_path / "p.summary.json"
    assert R.summary_path(d / "evaluations.jsonl") == d / "summary.json"
    (tmp_path / "a").mkdir()
    assert R.find_model_dir(tmp_path, "a") == tmp_path / "a"
    assert R.find_model_dir(tmp_path, "org/name") == tmp_path / "org--name"
    with pytest.raises(FileNotFoundError, match="no results for model"):
        R.find_model_dir(tmp_path, "org/other")
    with pytest.raises(ValueError, match="3 models"):
        R.find_model_dir(tmp_path, None)


def test_reference_self_check_is_filed_apart_from_models(tmp_path):
    """`evaluate --reference` files under results/reference/: never "the only model", named when asked for; a model
    given as a folder path finds its slug's folder, not the weights folder itself."""
    ref = R.dataset_dir(tmp_path / "res", R.REFERENCE, "mbpp")
    (ref / R.EVALUATIONS).write_text("")
    write_json(ref / R.SUMMARY, {"n_problems": 3, "problems_never_passed": ["mbpp/7"]})
    with pytest.raises(R.store.UserError, match="only the reference self-check .* --model reference"):
        R.find_model_dir(tmp_path / "res", None)
    weights = tmp_path / "w" / "tiny"
    weights.mkdir(parents=True)
    m = R.dataset_dir(tmp_path / "res", str(weights), "humaneval").parent
    assert m.name == "w--tiny"
    assert R.find_model_dir(tmp_path / "res", None) == m
    assert R.find_model_dir(tmp_path / "res", str(weights)) == m
    assert R.find_model_dir(tmp_path / "res", R.REFERENCE) == ref.parent
    (tmp_path / "res" / "figures").mkdir()  # `plots --out results/figures`: no model
    (tmp_path / "res" / "figures" / "a.png").write_bytes(b"")
    assert R.model_dirs(tmp_path / "res") == [m] and R.reference_dirs(tmp_path / "res") == [ref]
    assert R.reference_note(tmp_path / "res") == "reference self-check (btp.evaluate --reference): mbpp 2/3 pass"
    R.dataset_dir(tmp_path / "res", "org/b", "mbpp")
    with pytest.raises(R.store.UserError, match=r"2 models — pass --model, one of: org--b, w--tiny \(or reference"):
        R.find_model_dir(tmp_path / "res", None)
    assert R.reference_note(tmp_path) is None


@pytest.mark.parametrize("name", list(STEMS))
def test_stem_round_trip(name):
    s = R.parse_stem(name)
    assert str(s) == name and R.parse_stem(str(s)) == s
    assert (s.mode, s.population, s.variant) == STEMS[name]
    for part in ("", R.KNOCKOUT):
        for ext in ("npz", "json", "partial.npz", "partial.json", "jsonl", "runs.json", "samples.npz"):
            f = R.parse_file_name(R.file_name(s, ext, part))
            assert (f.stem, f.part, f.ext) == (name, part, ext)


def test_stems_as_the_stages_write_them():
    from btp.ablation import output_name, output_stem
    from btp.samples import SampleConfig
    from btp.taylor import TaylorConfig

    pops = {
        ("generations", "correct"): "",
        ("generations", "incorrect"): "-incorrect",
        ("generations", "all"): "-all",
        ("reference", "correct"): "-reference",
        ("reference", "all"): "-reference",
    }
    for mode in R.MODES:
        for (source, select), pop in pops.items():
            cfg = SampleConfig(source=source, select=select, mode=mode)
            assert cfg.stem == mode + pop and R.parse_stem(cfg.stem) == cfg.output_stem.base
            for abl, layers in (("zero", None), ("mean", None), ("zero", [0, 5]), ("mean", [28, 29])):
                name = output_name(cfg.stem, abl, layers)
                assert R.parse_stem(name) == output_stem(cfg.output_stem, abl, layers)
                assert R.parse_stem(name).variant == tuple(
                    w
                    for w in (
                        "mean" if abl == "mean" else None,
                        "layers" + "_".join(map(str, layers)) if layers else None,
                    )
                    if w
                )
    assert output_name("regular", "mean", [0, 2]) == "regular-mean-layers0_2"
    t = TaylorConfig(estimator="gate", signed=True, normalize=False)
    name = str(SampleConfig(source="reference").output_stem.with_variant(*t.variant, "v2"))
    assert name == "regular-reference-signed-nonorm-v2" and str(R.parse_stem(name)) == name


def test_bad_names_refused():
    with pytest.raises(ValueError, match="mode"):
        R.parse_stem("greedy-regular")
    for tag in ("all", "x.y", "a_knockout", ""):
        with pytest.raises(ValueError, match="variant"):
            R.Stem(variant=(tag,))
    assert R.try_parse_stem("notes") is None


def test_list_outputs_order_and_staleness(tmp_path):
    d = R.dataset_dir(tmp_path, "m", "humaneval")
    sd = d / "ablation"
    for name in ("regular-incorrect", "chain_code", "regular", "regular-reference-mean"):
        write_npz(sd / f"{name}.npz", x=np.zeros(1))
        write_json(sd / f"{name}.json", {})
    write_npz(sd / "chain_code-all.npz", x=np.zeros(1))  # no json: unfinished
    write_npz(sd / "regular-all.partial.npz", key="k", done=np.zeros(1))
    write_json(sd / "regular_knockout.json", {})
    assert R.list_outputs(sd, "ablation") == ["regular", "chain_code", "regular-incorrect", "regular-reference-mean"]
    gen, ev = d / "generations.jsonl", d / "evaluations.jsonl"
    gen.write_text("{}\n")
    ev.write_text("{}\n")
    now = 1_700_000_000
    os.utime(gen, (now, now))
    os.utime(ev, (now + 10, now + 10))
    for name, t in (
        ("regular.npz", now + 5),
        ("regular-reference-mean.npz", now - 5),
        ("regular_knockout.json", now + 20),
        ("chain_code-all.npz", now - 1),
        ("regular-all.partial.npz", now - 100),
    ):
        os.utime(sd / name, (t, t))
    assert R.staleness(d, sd, "regular.npz") == "older than evaluations.jsonl"  # correct: chosen by evaluations
    assert R.staleness(d, sd, "regular-reference-mean.npz") is None  # reference: no generations used
    assert R.staleness(d, sd, "chain_code-all.npz") == "older than generations.jsonl"
    assert R.staleness(d, sd, "regular-all.partial.npz") is None
    assert R.staleness(d, sd, "regular_knockout.json") is None
    os.utime(sd / "regular.npz", (now + 30, now + 30))
    assert R.staleness(d, sd, "regular_knockout.json") == "older than regular.npz"
    assert R.is_stale(gen, ev) and not R.is_stale(ev, gen) and not R.is_stale(d / "nope", gen)


def test_staleness_by_recorded_input_content(tmp_path):
    """An output that records the identities of its inputs is stale exactly when their content changed: new file
    times (a `cp -r`, a touch) change nothing; a knockout part is stale when its matrix was recomputed."""
    d = R.dataset_dir(tmp_path, "m", "humaneval")
    sd = d / "ablation"
    gen, ev = d / "generations.jsonl", d / "evaluations.jsonl"
    gen.write_text('{"problem_id": "p", "sample": 0}\n')
    ev.write_text('{"problem_id": "p", "sample": 0, "passed": true}\n')
    inputs = R.analysis_inputs(d, "generations", "correct")
    assert set(inputs) == {"generations.jsonl", "evaluations.jsonl"} and R.analysis_inputs(d, "reference", "all") == {}
    assert set(R.analysis_inputs(d, "generations", "all")) == {"generations.jsonl"}
    mid = R.identity_stamp({"x": 1})
    write_npz(sd / "regular.npz", provenance={"inputs": inputs, **mid}, x=np.zeros(1))
    write_json(sd / "regular.json", {"inputs": inputs, **mid})
    write_json(sd / "regular_knockout.json", {"inputs": inputs, **R.identity_stamp({"matrix": mid["run_key"]})})
    later = 2_000_000_000
    for i, p in enumerate((gen, ev, *sd.iterdir())):  # every input far newer than every output, in any order
        os.utime(p, (later - 10 * i, later - 10 * i) if p.parent == d else (1, 1))
    assert all(R.staleness(d, sd, p.name) is None for p in sd.iterdir())
    ev.write_text('{"problem_id": "p", "sample": 0, "passed": false}\n')  # rejudged: same size, other content
    assert R.staleness(d, sd, "regular.npz") == "evaluations.jsonl changed since it was computed"
    assert R.staleness(d, sd, "regular_knockout.json") == "evaluations.jsonl changed since it was computed"
    write_json(sd / "regular.json", {"inputs": R.analysis_inputs(d, "generations", "correct"), **mid})
    write_json(sd / "regular_knockout.json", {"inputs": R.analysis_inputs(d, "generations", "correct"), **mid})
    assert R.staleness(d, sd, "regular.json") is None
    assert R.staleness(d, sd, "regular_knockout.json") is None  # no matrix key recorded: nothing to compare
    ko = {"inputs": R.analysis_inputs(d, "generations", "correct"), **R.identity_stamp({"matrix": "other"})}
    write_json(sd / "regular_knockout.json", ko)
    assert R.staleness(d, sd, "regular_knockout.json") == "computed for another regular.npz (recomputed since)"
    # evaluations and summary: by the content the summary recorded
    write_json(
        d / "summary.json",
        {"inputs": {"generations.jsonl": R.input_identity(gen), "evaluations.jsonl": R.input_identity(ev)}},
    )
    os.utime(d / "summary.json", (1, 1))
    assert R.evaluation_staleness(d) == {}
    with open(gen, "a") as f:
        f.write('{"problem_id": "p", "sample": 1}\n')
    assert set(R.evaluation_staleness(d)) == {"evaluations.jsonl"}
    with open(ev, "a") as f:
        f.write('{"problem_id": "p", "sample": 1, "passed": true}\n')
    assert set(R.evaluation_staleness(d)) == {"evaluations.jsonl", "summary.json"}


# ---------------------------------------------------------------- identity and claim

IDENT = {
    "model": "m",
    "revision": "r1",
    "samples": [["p", 0]],
    "tokens": "abc",
    "dtype": "torch.float32",
    "n_boot": 1000,
}


def _write(out: R.Output, identity: dict, part: str = "") -> None:
    write_npz(out.path("npz", part), x=np.zeros(1))
    write_json(out.path("json", part), {"stage": "t", "identity": identity})


def test_claim_fresh_resume_done_and_refusals(tmp_path):
    out = R.output(tmp_path, "m", "d", "ablation", "regular")
    kw = dict(files=("npz", "json"), partials=("npz",))
    assert R.claim(out, IDENT, force=False, **kw).state == R.FRESH
    R.write_partial(out.partial("npz"), R.identity_key(IDENT), {"done": np.zeros(2, bool)})
    assert R.claim(out, IDENT, force=False, **kw).state == R.RESUME
    other = {**IDENT, "n_boot": 50}
    with pytest.warns(UserWarning, match="another configuration"):
        assert R.read_partial(out.partial("npz"), R.identity_key(other)) is None
    assert R.claim(out, other, force=False, **kw).state == R.FRESH  # another identity's progress is no resume
    _write(out, IDENT)
    c = R.claim(out, IDENT, force=False, **kw)
    assert c.done and c.stamp == {"run_key": R.identity_key(IDENT), "identity": IDENT}
    for field, value in (("dtype", "torch.bfloat16"), ("n_boot", 50), ("revision", "r2"), ("samples", [["q", 0]])):
        with pytest.raises(R.IdentityError, match=f"exists for other {field} .*--force") as e:
            R.claim(out, {**IDENT, field: value}, force=False, **kw)
        assert e.value.field == field and e.value.new == value
    write_json(out.path("json"), {"stage": "old"})  # written before identities existed
    with pytest.raises(R.IdentityError, match="other identity"):
        R.claim(out, IDENT, force=False, **kw)
    c = R.claim(out, {**IDENT, "dtype": "torch.bfloat16"}, force=True, **kw)
    # forced: progress discarded; the old output stays until the new one replaces it
    assert c.state == R.FRESH and out.path("npz").exists() and not out.partial("npz").exists()


def test_claim_jsonl_with_runs_file(tmp_path):
    from btp.store import JsonlStore

    out = R.output(tmp_path, "m", "d", "taylor", "regular")
    store = JsonlStore(out.path("jsonl"), key_fields=("iteration",))
    kw = dict(files=("jsonl",), record="runs.json", append=True)
    assert R.claim(out, IDENT, force=False, **kw).state == R.FRESH
    store.begin_run({"stage": "taylor", "identity": IDENT})
    store.append({"iteration": 1})
    n = {"iters": 2}
    complete = lambda: len(store.read()) >= n["iters"]
    assert R.claim(out, IDENT, force=False, complete=complete, **kw).state == R.RESUME
    n["iters"] = 1
    assert R.claim(out, IDENT, force=False, complete=complete, **kw).state == R.DONE
    with pytest.raises(R.IdentityError, match="other dtype"):
        R.claim(out, {**IDENT, "dtype": "torch.float16"}, force=False, **kw)
    assert R.claim(out, IDENT, force=True, **kw).state == R.FRESH
    assert not out.path("jsonl").exists() and len(R.read_runs(out.path("jsonl"))) == 1  # runs file is history


def test_check_runs(tmp_path):
    from btp.store import JsonlStore

    st = JsonlStore(tmp_path / "generations.jsonl")
    st.begin_run({"stage": "generate", "config": {"temperature": 0.0, "n": 1}})
    st.append({"problem_id": "a", "sample": 0})
    R.check_runs(st.path, {"temperature": 0.0, "n": 5}, ("temperature",), what="samples", hint="h")
    with pytest.raises(ValueError, match=r"other settings \{'temperature': \(0.0, 0.8\)\}"):
        R.check_runs(st.path, {"temperature": 0.8}, ("temperature",), what="samples", hint="h")
    R.check_runs(st.path, {"temperature": 0.8}, ("temperature",), what="x", hint="h", runs={"not-in-use"})


# ---------------------------------------------------------------- readers


def test_readers(tmp_path):
    from btp.store import JsonlStore

    d = R.dataset_dir(tmp_path, "m", "humaneval")
    write_npz(
        d / "ablation" / "regular.npz",
        provenance={"stage": "ablation"},
        delta_mean=np.array([[0.1, np.nan], [0.3, 0.1]]),
    )
    arrays, meta = R.read_analysis(d / "ablation", "regular")
    assert meta == {"stage": "ablation"}  # no json: the npz stamp
    assert R.read_knockout(d / "ablation", "regular") is None
    write_json(d / "ablation" / "regular_knockout.json", {"top": []})
    assert R.read_knockout(d / "ablation", "regular") == {"top": []}
    assert R.rank_heads(arrays["delta_mean"]) == [(1, 0), (0, 0), (1, 1)]
    st = JsonlStore(d / "taylor" / "regular.jsonl", key_fields=("iteration",))
    st.begin_run({"stage": "taylor", "taylor": {"num_iters": 2}})
    st.append([{"iteration": 2, "importance": [[1.0, None]]}, {"iteration": 1, "importance": [[None, 2.0]]}])
    recs, meta = R.read_taylor(d / "taylor", "regular")
    assert [r["iteration"] for r in recs] == [1, 2] and meta["taylor"] == {"num_iters": 2}
    m = R.importance_matrices(recs)
    assert m.shape == (2, 1, 2) and np.isnan(m[0, 0, 0]) and m[1, 0, 0] == 1.0


def test_taylor_reader_names_states_and_reads_old_files(tmp_path):
    """Records written before the fields named their state (scoring_loss, heldout_loss, n_alive) read back under
    today's names, beside records of the new format in the same (resumed) file; plots draw them."""
    import btp.plots as bp

    sd = R.dataset_dir(tmp_path, "m", "humaneval") / "taylor"
    common = {"importance": [[1.0, 2.0]], "pruned": [[0, 0]], "pruned_before": [], "base_heldout_loss": 1.0}
    old = {**common, "iteration": 1, "n_alive_before": 2, "n_alive": 1, "scoring_loss": 1.5, "heldout_loss": 1.7}
    old |= {"scoring_losses": [1.5], "heldout_losses": [1.7], "pruned_total": [[0, 0]]}
    new = {**common, "iteration": 2, "n_alive_before": 1, "n_alive_after": 1, "scoring_loss_before": 1.6}
    new |= {"heldout_loss_after": 1.8, "scoring_losses_before": [1.6], "heldout_losses_after": [1.8]}
    sd.mkdir(parents=True)
    (sd / "regular.jsonl").write_text("".join(__import__("json").dumps(r) + "\n" for r in (old, new)))
    recs, _ = R.read_taylor(sd, "regular")
    assert [r["n_alive_after"] for r in recs] == [1, 1] and [r["heldout_loss_after"] for r in recs] == [1.7, 1.8]
    assert recs[0]["scoring_loss_before"] == 1.5 and recs[0]["heldout_losses_after"] == [1.7]
    assert not any(k in r for r in recs for k in R.TAYLOR_RENAMED)
    assert R.taylor_record(new) is new  # today's records pass through untouched
    fig = bp.taylor_loss(bp.Analysis("taylor", "humaneval", "regular", recs))
    assert list(fig.axes[0].lines[1].get_ydata()) == [1.0, 1.7, 1.8]


def test_old_lens_outputs_read_as_block_indices(tmp_path):
    """Lens files written before `layer_numbering` counted the residual after block b as layer b + 1."""
    sd = R.dataset_dir(tmp_path, "m", "humaneval") / "entropy"
    write_npz(sd / "regular.npz", layer=np.arange(1, 4), entropy_mean=np.ones(3))
    write_json(sd / "regular.json", {"stage": "entropy_lens", "summary": {"layer": [1, 2, 3]}})
    arrays, meta = R.read_analysis(sd, "regular")
    assert arrays["layer"].tolist() == [0, 1, 2] and meta["summary"]["layer"] == [0, 1, 2]
    assert meta["layer_numbering"] == R.LAYER_NUMBERING
    write_json(sd / "regular.json", {"stage": "entropy_lens", "layer_numbering": R.LAYER_NUMBERING})
    write_npz(sd / "regular.npz", layer=np.arange(3), entropy_mean=np.ones(3))
    assert R.read_analysis(sd, "regular")[0]["layer"].tolist() == [0, 1, 2]  # today's files: as written


def test_one_jsonl_reader(tmp_path):
    p = tmp_path / "a.jsonl.gz"
    with gzip.open(p, "wt") as f:
        f.write('{"a": 1}\n\n{"a": 2}\n')
    assert list(iter_jsonl(p, line_numbers=True)) == [(1, {"a": 1}), (3, {"a": 2})]
    torn = tmp_path / "t.jsonl"
    torn.write_text('{"a": 1}\n{"a": 2')
    with pytest.warns(UserWarning, match="torn"):
        assert list(iter_jsonl(torn)) == [{"a": 1}]
    with pytest.raises(MalformedFileError, match="t.jsonl:2"):
        list(iter_jsonl(torn, tolerate_torn_tail=False))
    bad = tmp_path / "b.jsonl"
    bad.write_text("[1]\n")
    with pytest.raises(MalformedFileError, match="b.jsonl:1: expected a JSON object"):
        list(iter_jsonl(bad))


# ---------------------------------------------------------------- one owner

# (pattern, what it means): only btp/results.py may hold these (and store.py, the byte layer, the runs file's name
# beside a JSONL and the short hash of a run's stamp)
OWNED = [
    (r"""(stem|name)[^\n]*\.split\(["']-["']\)""", "splitting an output name"),
    (r"""\.partition\(["']\.["']\)""", "splitting a file name"),
    (r"""endswith\(["']_knockout|\}_knockout\.""", "the knockout part of a name"),
    (r"\brun_key\b", "an identity key"),
    (r"""["'][^"'`]*\.runs\.json""", "the runs-file name"),
    (r"\b(stem_source|split_stem|_stem_order|_model_names|_resolve_model_dir)\b", "a second name parser/resolver"),
    (r"st_mtime", "staleness by modification time"),
    (r"""["']-reference["']|["']-incorrect["']""", "population words of a name"),
    (r"\bold\.get\(k\) != |rec\.get\([\"']settings[\"']\) != ", "comparing stored settings"),
    (r"hashlib\.sha1\(json\.dumps", "hashing a settings key"),
    (r"""["']key["']\s*:|key=np\.array""", "tagging a partial file"),
]


def test_no_name_parsing_or_settings_comparison_outside_results():
    hits = []
    for p in sorted((ROOT / "btp").glob("*.py")):
        if p.name == "results.py":
            continue
        for i, line in enumerate(p.read_text().splitlines(), 1):
            for pat, what in OWNED:
                if p.name == "store.py" and what in ("the runs-file name", "hashing a settings key"):
                    continue
                if re.search(pat, line):
                    hits.append(f"{p.name}:{i}: {what}: {line.strip()}")
    assert not hits, "\n".join(hits)


# ---------------------------------------------------------------- the skeleton on a tiny model


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny random Llama with the embedded tokenizer's vocabulary, saved as a HF folder."""
    from conftest import make_tiny

    from btp.models import load_tokenizer

    tok = load_tokenizer()
    model = make_tiny("llama", vocab_size=len(tok))
    out = tmp_path_factory.mktemp("tinyllama")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_stage_refuses_other_dtype_and_settings_force_overrides(tiny_folder, tmp_path, monkeypatch, capsys):
    from btp import ablation, cli, entropy_lens

    argv = [
        "--model",
        str(tiny_folder),
        "--dataset",
        "mbpp",
        "--source",
        "reference",
        "--num-samples",
        "2",
        "--sample-max-tokens",
        "200",
        "--results-dir",
        str(tmp_path),
        "--no-progress",
    ]
    path = entropy_lens.main(argv + ["--dtype", "float32"])
    meta = R.read_analysis(path.parent, "regular-reference")[1]
    assert meta["identity"]["dtype"] == "torch.float32" and meta["run_key"] == R.identity_key(meta["identity"])
    loads = []
    monkeypatch.setattr(cli.Run, "load", lambda self: loads.append(1) or (_ for _ in ()).throw(AssertionError))
    assert entropy_lens.main(argv + ["--dtype", "float32"]) == path  # done: no weights loaded
    assert "skipping" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="exists for other dtype"):
        entropy_lens.main(argv + ["--dtype", "bfloat16"])
    with pytest.raises(SystemExit, match="exists for other samples"):
        entropy_lens.main(argv + ["--dtype", "float32", "--seed", "1"])
    assert not loads
    monkeypatch.undo()
    entropy_lens.main(argv + ["--dtype", "bfloat16", "--force"])
    assert R.read_analysis(path.parent, "regular-reference")[1]["identity"]["dtype"] == "torch.bfloat16"
    # a numeric setting of another stage: the bootstrap size
    ab = argv + ["--layers", "0,1", "--knockout-ks", "1,2", "--random-seeds", "1", "--n-boot", "20"]
    ablation.main(ab)
    with pytest.raises(SystemExit, match="exists for other n_boot"):
        ablation.main(ab[:-1] + ["30"])
    with pytest.raises(SystemExit, match="exists for other dtype"):
        ablation.main(ab + ["--dtype", "bfloat16"])


# ---------------------------------------------------------------- the skeleton's flags


def test_flags_come_from_the_config_dataclasses():
    import dataclasses
    import json

    from btp import ablation, cli, entropy_lens, evaluate, generate, taylor
    from btp.samples import SampleConfig

    for spec in (entropy_lens.SPEC, ablation.SPEC, taylor.SPEC):
        p = cli.stage_parser(spec)
        dests = [a.dest for a in p._actions]
        assert len(dests) == len(set(dests)), spec.name  # shared flags declared once
        args = cli.parse(p, [])
        for cls in (*spec.configs, SampleConfig):  # one default each: the dataclass's
            cfg = cli.config_from(cls, args)
            for f in dataclasses.fields(cls):
                if f.metadata and f.name != "seed":
                    assert getattr(cfg, f.name) == getattr(cls(), f.name), (cls.__name__, f.name)
    args = cli.parse(
        cli.stage_parser(ablation.SPEC),
        ["--no-reuse-attention", "--layers", "3,1-2", "--no-knockout", "--knockout-ks", "1,4"],
    )
    m, k = cli.config_from(ablation.MatrixConfig, args), cli.config_from(ablation.KnockoutConfig, args)
    assert (m.reuse_attention, m.layers, k.enabled, k.ks) == (False, [1, 2, 3], False, [1, 4])
    assert generate.parse_config([]) == generate.GenerateConfig()
    assert evaluate.parse_config([]) == evaluate.EvalConfig()
    # every preset parses with its stage (keys are flag names)
    stage = {"ablation": ablation.SPEC, "entropy": entropy_lens.SPEC, "taylor": taylor.SPEC}
    for preset in sorted((ROOT / "configs").glob("*.json")):
        kind = preset.name.split("_")[0]
        if kind in stage:
            cli.parse(cli.stage_parser(stage[kind]), ["--config", str(preset)])
        elif kind == "generate":
            generate.parse_config(["--config", str(preset)])
        elif kind == "evaluate":
            evaluate.parse_config(["--config", str(preset)])
        assert json.loads(preset.read_text())


def test_taylor_done_without_weights_and_refusals(tiny_folder, tmp_path, monkeypatch):
    from btp import cli, taylor

    argv = [
        "--model",
        str(tiny_folder),
        "--dataset",
        "mbpp",
        "--source",
        "reference",
        "--num-samples",
        "3",
        "--sample-max-tokens",
        "200",
        "--results-dir",
        str(tmp_path),
        "--no-progress",
        "--num-iters",
        "1",
        "--prune-per-iter",
        "2",
        "--heldout",
        "1",
    ]
    taylor.main(argv)
    path = next(tmp_path.rglob("taylor/regular-reference.jsonl"))
    recs = list(iter_jsonl(path))
    monkeypatch.setattr(cli.Run, "load", lambda self: (_ for _ in ()).throw(AssertionError("weights loaded")))
    assert taylor.main(argv) == recs  # complete: no weights loaded
    with pytest.raises(SystemExit, match="exists for other dtype"):
        taylor.main(argv + ["--dtype", "bfloat16"])
    with pytest.raises(SystemExit, match="exists for other settings"):
        taylor.main(argv[:-6] + ["--num-iters", "1", "--prune-per-iter", "3", "--heldout", "1"])
    assert R.read_runs(path)[-1]["identity"]["settings"]["prune_per_iter"] == 2
