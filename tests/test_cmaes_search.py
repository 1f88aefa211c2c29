"""CMA-ES head-subset search: the encodings keep what they say; the search finds a known optimum (a synthetic
fitness, and a tiny model whose loss depends on a planted set of heads, its optimum found by enumeration);
batched population fitness equals each candidate alone with weight surgery; a run killed and resumed writes
what an uninterrupted one writes; controls have the final mask's size and layer distribution; the stage's `main`
on the embedded model resumes a shorter run into the same file an uninterrupted run writes."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import make_mixed, make_tiny
from test_taylor import loss_of, make_samples

from btp.arch import adapter
from btp.cmaes_search import (
    ModelFitness,
    Prior,
    Search,
    SearchConfig,
    Space,
    _budget_arg,
    compare_controls,
    decode_fixed,
    decode_threshold,
    output_stem,
    random_controls,
    run_search,
    warm_mean,
)
from btp.heads import pruned_copy
from btp.headsets import keep_mask, removed_heads
from btp.results import Stem, mask_from_rows, read_partial, write_partial

WALL = ("time_s", "elapsed_s", "provenance")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_encodings_and_budget():
    sp = Space((4, 2, 4))
    x = np.array([5, 4, 3, 2, -1, -2, 9, 8, 7, 6.0])
    k = decode_fixed(x, sp, 4, 1)
    assert k.sum() == 4 and k[[0, 4, 6, 7]].all()  # layer 1's best first, then the largest
    assert decode_fixed(x, sp, 4, 0)[[6, 7, 8, 9]].all()
    t = decode_threshold(x, sp, 1)
    assert t.sum() == 9 and t[4] and not t[5]  # layer 1 topped up to its minimum
    with pytest.raises(ValueError, match="budget"):
        sp.check(2, 1)
    m = warm_mean(np.array([[1, 2, 3, 4], [0, 5, np.nan, np.nan], [9, 8, 7, 6]]), sp, 3)
    assert (m > 0).sum() == 3 and set(np.nonzero(m > 0)[0]) == {6, 7, 8}
    assert _budget_arg("0.5") == 0.5 and _budget_arg("64") == 64 and SearchConfig(budget="12").n_keep(270) == 12
    assert SearchConfig(budget=0.5).n_keep(270) == 135
    assert str(output_stem(Stem(), SearchConfig(budget=0.5), None)) == "regular-keep50pct"
    assert (
        str(
            output_stem(Stem(source="reference"), SearchConfig(budget=64, encoding="threshold", warm_start="cold"), "t")
        )
        == "regular-reference-keep64-threshold-cold-t"
    )
    mask = sp.masks(k)[0]
    assert mask.shape == (3, 4) and not mask[1, 2:].any()


def test_search_finds_a_planted_optimum_synthetic():
    """A fitness through the same code path whose optimum is known: the loss grows by 1..5 with each planted head
    removed and by a little (< 0.01, distinct: no plateaus) with any other."""
    sp = Space((6, 6, 6, 6))
    planted = [1, 8, 9, 15, 20]
    w = np.random.default_rng(0).uniform(0, 0.01, sp.n)
    w[planted] = [1.0, 2.0, 3.0, 4.0, 5.0]
    floor = (w.sum() - w[planted].sum()) * 1.25  # every other head removed, mean over the two samples

    def fitness(masks):
        keep = np.stack([sp.coords(m) for m in masks])
        return ((~keep) @ w)[:, None] * np.array([[1.0, 1.5]])  # two "samples"

    cfg = SearchConfig(budget=len(planted), min_heads_per_layer=0, popsize=24, max_generations=80, seed=3)
    s = Search(sp, cfg, fitness)
    recs = run_search(s)
    assert s.best.fitness == pytest.approx(floor) and sorted(np.nonzero(s.best.keep)[0]) == planted
    assert recs[-1]["best_so_far_fitness"] == s.best.fitness and recs[0]["popsize"] == 24
    assert all(r["best_n_kept"] == len(planted) for r in recs)
    # the threshold encoding with a size penalty also ends at the planted set
    cfg = SearchConfig(
        budget=len(planted),
        encoding="threshold",
        size_penalty=0.5,
        min_heads_per_layer=0,
        popsize=12,
        max_generations=120,
        seed=1,
    )
    s = Search(sp, cfg, fitness)
    run_search(s)
    assert s.best.fitness == pytest.approx(floor) and sorted(np.nonzero(s.best.keep)[0]) == planted


def planted_model(planted: list[tuple[int, int]]):
    """A tiny Llama whose heads outside `planted` barely write to the residual (o_proj columns x 1e-3), while the
    planted heads write 3x: the loss depends on which planted heads are kept."""
    model = make_tiny("llama", seed=2)
    ad = adapter(model)
    with torch.no_grad():
        for l, lay in enumerate(ad.heads):
            for h in range(lay.n_heads):
                ad.o_projs[l].weight[:, h * lay.head_dim : (h + 1) * lay.head_dim] *= 3.0 if (l, h) in planted else 1e-3
    return model


def own_targets(model, ss):
    """The samples with their scored tokens replaced by the full model's greedy predictions (teacher-forced), so
    that removing an influential head raises the loss."""
    for s in ss.samples:
        with torch.no_grad():
            logits = model(input_ids=torch.as_tensor(s.input_ids)[None]).logits[0]
        pred = logits.argmax(-1).numpy()
        s.input_ids[s.score_start : s.score_end] = pred[s.positions]
    return ss


def test_search_finds_the_optimum_of_a_planted_tiny_model():
    planted = [(0, 1), (1, 2), (2, 0), (2, 3)]
    model = planted_model(planted)
    ss = make_samples(3, seed=5)
    ss = own_targets(model, ss)
    ad = adapter(model)
    sp = Space(tuple(ad.layer_num_heads))
    fit = ModelFitness(model, ss, batch_rows=64)
    # the optimum by enumeration of every set of 4 kept heads
    keeps = np.zeros((math_comb := len(list(itertools.combinations(range(sp.n), 4))), sp.n), dtype=bool)
    for i, c in enumerate(itertools.combinations(range(sp.n), 4)):
        keeps[i, list(c)] = True
    f = fit(sp.masks(keeps)).mean(1)
    best = keeps[int(np.argmin(f))]
    assert math_comb == 495 and [sp.heads[i] for i in np.nonzero(best)[0]] == planted
    cfg = SearchConfig(budget=4, min_heads_per_layer=0, popsize=8, max_generations=25, seed=0)
    s = Search(sp, cfg, fit)
    run_search(s)
    assert (s.best.keep == best).all() and s.best.fitness == pytest.approx(f.min(), abs=1e-12)
    assert fit.cache.hits > 0  # revisited masks came from the cache


@pytest.mark.parametrize("which", ["llama", "mixed"])
def test_batched_fitness_equals_weight_surgery(which):
    model = make_mixed() if which == "mixed" else make_tiny(which, seed=1)
    ad = adapter(model)
    ss = make_samples(3, seed=7)
    assert any(s.score_end < len(s.input_ids) for s in ss.samples)  # tokens after the scored ones: not computed
    sp = Space(tuple(ad.layer_num_heads))
    rng = np.random.default_rng(0)
    keeps = np.stack([decode_fixed(rng.normal(size=sp.n), sp, int(rng.integers(1, sp.n)), 0) for _ in range(6)])
    keeps[0] = True  # nothing removed
    masks = sp.masks(keeps)
    ce = ModelFitness(model, ss, batch_rows=4)(masks)  # the population in batched passes
    assert ce.shape == (6, len(ss))
    for i, m in enumerate(masks):
        surgery = pruned_copy(model, removed_heads(ad, m))
        np.testing.assert_allclose(ce[i], [loss_of(surgery, s) for s in ss.samples], atol=1e-5)
    assert np.array_equal(keep_mask(ad, removed_heads(ad, masks[1])), masks[1])


def test_resume_after_kill_equals_uninterrupted(tmp_path):
    """Generations 1..5 in one go vs 1..2, the state saved to a file and read back (a new process), then 3..5:
    the same records apart from wall times, the same optimizer state."""
    model = make_tiny("llama", seed=4)
    ad = adapter(model)
    scoring, heldout = make_samples(6, seed=2).split(2, seed=0)
    sp = Space(tuple(ad.layer_num_heads))
    prior = warm_mean(np.arange(sp.n, dtype=float).reshape(3, 4), sp, 6)

    def search(gens: int, state=None) -> Search:
        cfg = SearchConfig(budget=6, popsize=6, max_generations=gens, seed=7)
        return Search(
            sp,
            cfg,
            ModelFitness(model, scoring, batch_rows=4),
            x0=prior,
            heldout=ModelFitness(model, heldout, cache=False),
            heldout_problems=heldout.problem_ids,
            n_boot=200,
            state=state,
        )

    full = search(5)
    a = run_search(full)
    p = tmp_path / "s.partial.pkl"
    first = search(2)
    saved = []
    b = run_search(
        first, on_generation=lambda rec, st: (write_partial(p, "k", {**st, "record": rec}), saved.append(rec))
    )
    np.random.seed(123)  # other users of numpy's global generator change nothing
    st = read_partial(p, "k")
    assert st["record"] == saved[-1] and st["generation"] == 2
    b += run_search(search(5, state=st))
    strip = lambda rs: [{k: v for k, v in r.items() if k not in WALL} for r in rs]
    assert len(a) == len(b) == 5 and strip(a) == strip(b)
    assert a[-1]["best_so_far_heldout"]["ci_low"] <= a[-1]["best_so_far_heldout"]["mean"]
    assert mask_from_rows(a[-1]["best_so_far_mask"]).shape == (3, 4)
    assert all(r["best_n_kept"] == 6 for r in a) and a[-1]["evals"] == 30


def test_controls_have_the_final_size_and_layer_distribution():
    model = make_tiny("llama", seed=4)
    ad = adapter(model)
    scoring, heldout = make_samples(6, seed=2).split(2, seed=0)
    sp = Space(tuple(ad.layer_num_heads))
    final = decode_fixed(np.arange(sp.n, dtype=float)[::-1], sp, 7, 1)
    for r in random_controls(final, sp, 4, 0):
        assert [int(r[sp.layer == l].sum()) for l in range(3)] == [int(final[sp.layer == l].sum()) for l in range(3)]
    fit = ModelFitness(model, scoring, cache=False)
    hold = ModelFitness(model, heldout, cache=False)
    scores = np.arange(sp.n, dtype=float).reshape(3, 4)
    ctl = compare_controls(
        final,
        sp,
        hold,
        fit,
        heldout.problem_ids,
        draws=3,
        seed=0,
        min_per_layer=1,
        n_boot=200,
        taylor_order=[(0, 0), (1, 1), (2, 2), (0, 3), (1, 0)],
        ablation=Prior("a", scores),
    )
    sets = ctl["sets"]
    assert {"cmaes", "unpruned", "random", "taylor", "ablation_topk", "random_0"} <= set(sets)
    assert all(sets[n]["n_kept"] == 7 for n in ("cmaes", "random", "taylor", "ablation_topk"))
    assert sets["taylor"]["removed"] == [[0, 0], [0, 3], [1, 0], [1, 1], [2, 2]]
    for n in ("random", "taylor", "ablation_topk"):
        d, h = sets[n]["diff_vs_cmaes"], sets[n]["heldout"]
        assert d["mean"] == pytest.approx(h["mean"] - sets["cmaes"]["heldout"]["mean"], abs=1e-12)
        assert d["ci_low"] <= d["mean"] <= d["ci_high"]
    ctl = compare_controls(
        final, sp, hold, fit, heldout.problem_ids, draws=0, seed=0, min_per_layer=1, n_boot=50, taylor_order=[(0, 0)]
    )
    assert "taylor" not in ctl["sets"] and "fewer" in ctl["notes"]["taylor"]


@pytest.mark.slow
def test_main_resumes_into_the_file_an_uninterrupted_run_writes(tmp_path):
    import json

    from btp.cmaes_search import main
    from btp.store import read_jsonl

    base = [
        "--source",
        "reference",
        "--num-samples",
        "3",
        "--sample-max-tokens",
        "96",
        "--popsize",
        "4",
        "--budget",
        "0.5",
        "--control-draws",
        "2",
        "--n-boot",
        "100",
        "--no-progress",
        "--heldout",
        "1",
    ]
    one = main(base + ["--results-dir", str(tmp_path / "a"), "--max-generations", "2"])
    main(base + ["--results-dir", str(tmp_path / "b"), "--max-generations", "1"])
    two = main(base + ["--results-dir", str(tmp_path / "b"), "--max-generations", "2"])
    ra, rb = read_jsonl(one.with_suffix(".jsonl")), read_jsonl(two.with_suffix(".jsonl"))
    strip = lambda rs: [{k: v for k, v in r.items() if k not in WALL} for r in rs]
    assert len(ra) == 2 and strip(ra) == strip(rb)
    da, db = json.loads(one.read_text()), json.loads(two.read_text())
    assert da["final"] == db["final"] and da["generations"] == 2 and da["stop_reason"] == "max_generations"
    assert da["final"]["n_kept"] == 135 and "random" in da["controls"]["sets"]
    assert one.name == "regular-reference-keep50pct.json" and one.with_suffix(".partial.pkl").exists()
    assert main(base + ["--results-dir", str(tmp_path / "a"), "--max-generations", "2"]) == one  # done: skipped
    assert read_jsonl(one.with_suffix(".jsonl")) == ra
    # killed after saving generation 2's state, before appending its line (and before the final file)
    jl = two.with_suffix(".jsonl")
    jl.write_text("\n".join(jl.read_text().splitlines()[:1]) + "\n")
    two.unlink()
    assert main(base + ["--results-dir", str(tmp_path / "b"), "--max-generations", "2"]) == two
    assert strip(read_jsonl(jl)) == strip(ra) and json.loads(two.read_text())["final"] == da["final"]


def test_clustered_ci_and_state_file(tmp_path):
    from btp.cmaes_search import _ci

    m = _ci(np.array([1.0, 1.0, 3.0, 5.0]), ["a", "a", "b", "c"], n_boot=500, seed=0)
    m = SimpleNamespace(mean=m["mean"], low=m["ci_low"], high=m["ci_high"])
    assert m.mean == 3.0 and 1.0 <= m.low <= m.mean <= m.high <= 5.0  # the mean of problem means
    one = _ci(np.array([2.0, 4.0]), ["a", "a"], n_boot=50, seed=0)
    one = SimpleNamespace(mean=one["mean"], low=one["ci_low"], high=one["ci_high"])
    assert one.low == one.high == one.mean == 3.0  # one problem: no spread over problems
    p = tmp_path / "x.partial.pkl"
    write_partial(p, "key1", {"es": {"a": np.arange(3)}, "generation": 2})
    assert read_partial(p, "key1", quiet=True)["generation"] == 2
    assert read_partial(p, "other", quiet=True) is None  # another identity's state is not resumed


def test_ablation_prior_uses_the_scoring_samples_only(tmp_path):
    """The ablation warm start/control reads a matrix of these samples (same tokens) and averages its per-sample
    deltas over the scoring samples only; a restricted matrix (`-layers..`) or other samples are not used."""
    from btp.cmaes_search import ablation_prior
    from btp.results import output, sample_identity
    from btp.store import write_json, write_npz

    ss = make_samples(4, seed=1)
    scoring, heldout = ss.split(1, seed=0)
    ident = {"identity": sample_identity(ss.fields())}
    delta = np.random.default_rng(0).normal(size=(4, 3, 4))
    f = ss.fields()
    for variant, d in (("layers1_2", delta[:, :2]), ("", delta)):
        out = output(tmp_path, "m", "tiny", "ablation", Stem().with_variant(variant or None))
        write_npz(
            out.path("npz"),
            delta=d,
            layer_num_heads=np.array([4] * d.shape[1]),
            sample_problem_id=f["sample_problem_id"],
            sample_number=f["sample_number"],
        )
        write_json(out.path("json"), {**ident, "ablation": "zero"})
    tokens = ident["identity"]["tokens"]
    p = ablation_prior(str(tmp_path), "m", "tiny", Stem(), tokens, scoring)
    rows = [i for i, s in enumerate(ss.samples) if s.problem_id not in set(heldout.problem_ids)]
    assert p is not None and p.source == "ablation/regular.npz"
    np.testing.assert_allclose(p.values, delta[rows].mean(0))
    assert ablation_prior(str(tmp_path), "m", "tiny", Stem(), "other-tokens", scoring) is None


# ---------------------------------------------------------------- pass@1 fitness (btp.pruned's path)


class HeadRunner:
    """Writes what btp.generate / btp.evaluate would for a checkpoint: problem i passes unless head (0, i) was
    removed (read from the checkpoint's btp_pruning.json); generation resumes (only missing problems)."""

    def __init__(self, problems):
        self.problems, self.calls = problems, []

    def generate(self, args):
        import json
        from pathlib import Path

        a = dict(zip(args[::2], args[1::2]))
        removed = json.loads((Path(a["--model"]) / "btp_pruning.json").read_text())["pruned_heads"]
        out = Path(a["--output"])
        have = {json.loads(l)["problem_id"] for l in out.read_text().splitlines()} if out.exists() else set()
        todo = [p for p in self.problems[: int(a["--limit"])] if p not in have]
        self.calls.append(("generate", len(todo)))
        with out.open("a") as f:
            for p in todo:
                code = "fail" if [0, self.problems.index(p)] in removed else "pass"
                f.write(json.dumps({"problem_id": p, "sample": 0, "code": code}) + "\n")

    def evaluate(self, args):
        import json
        from pathlib import Path

        a = dict(zip(args[::2], args[1::2]))
        gen = Path(a["--input"])
        self.calls.append(("evaluate", a["--model"]))
        recs = [json.loads(l) for l in gen.read_text().splitlines()]
        (gen.parent / "evaluations.jsonl").write_text(
            "".join(json.dumps({**r, "passed": r["code"] == "pass"}) + "\n" for r in recs)
        )


def _pass1(tmp_path, runner, problems, limit, memo_from=None):
    from btp.cmaes_search import Pass1Fitness
    from btp.pruning import GenFlags

    model = make_tiny("llama", seed=4)
    lm = SimpleNamespace(model=model, tokenizer=None, model_id="tiny", revision="r0")
    setting = {"model": "tiny", "dtype": "float32", "dataset": "humaneval", "seed": 0, "backend": "hf"}
    return Pass1Fitness(
        lm,
        problems,
        limit=limit,
        gen=GenFlags(gen_max_tokens=8),
        setting=setting,
        work=tmp_path / "w",
        results_dir=str(tmp_path),
        runner=runner,
        n_boot=10,
    )


def test_pass1_fitness_is_one_minus_pass_at_1_per_problem_and_reuses_what_was_judged(tmp_path):
    probs = ["HumanEval/0", "HumanEval/1", "HumanEval/2", "HumanEval/3", "HumanEval/4"]
    r = HeadRunner(probs)
    dev = _pass1(tmp_path, r, probs[:3], 3)
    sp = Space(tuple(adapter(dev.lm.model).layer_num_heads))
    keep = np.ones((2, sp.n), dtype=bool)
    keep[0, [0, 2]] = False  # removes (0, 0) and (0, 2): problems 0 and 2 fail
    keep[1, [5]] = False  # removes (1, 1): everything passes
    f = dev(sp.masks(keep))
    np.testing.assert_array_equal(f, [[1, 0, 1], [0, 0, 0]])
    assert r.calls.count(("generate", 3)) == 2 and (dev.misses, dev.hits) == (2, 0)
    assert not list((tmp_path / ".cache" / "pruned").iterdir())  # checkpoints removed once judged
    np.testing.assert_array_equal(dev(sp.masks(keep[::-1])), f[::-1])
    assert (dev.misses, dev.hits) == (2, 2) and len(r.calls) == 4  # memoised
    # the held-out problems after the dev subset extend the same mask's generations (only the new problems)
    hold = _pass1(tmp_path, r, probs[3:], 5)
    keep2 = np.ones((1, sp.n), dtype=bool)
    keep2[0, [0, 4]] = False  # (0, 0) and (1, 0): held-out problems pass
    np.testing.assert_array_equal(hold(sp.masks(keep[:1])), [[0, 0]])
    assert r.calls[-2] == ("generate", 2)
    keep2[0, 3] = False  # (0, 3): held-out problem 3 fails
    np.testing.assert_array_equal(hold(sp.masks(keep2)), [[1, 0]])
    # a new process with the memo of the old one (a resumed search) asks for nothing
    again = _pass1(tmp_path, r, probs[:3], 3)
    again.load_state_dict(dev.state_dict())
    n = len(r.calls)
    np.testing.assert_array_equal(again(sp.masks(keep)), f)
    assert len(r.calls) == n and (again.misses, again.hits) == (2, 4)
    # a fresh memo still finds the judged files on disk: judged again from them, nothing generated
    fresh = _pass1(tmp_path, r, probs[:3], 3)
    np.testing.assert_array_equal(fresh(sp.masks(keep)), f)
    assert len(r.calls) == n


def test_pass1_flags_keep_the_sample_cap_apart_from_the_generation_cap():
    from btp import cli
    from btp.cmaes_search import GEN_RENAME, SPEC
    from btp.pruning import GenFlags

    p = cli.stage_parser(SPEC)
    a = cli.parse(p, ["--sample-max-tokens", "96", "--gen-max-tokens", "40", "--fitness", "pass1", "--backend", "hf"])
    gen = cli.config_from(GenFlags, a, rename=GEN_RENAME)
    assert a.sample_max_tokens == 96 and gen.gen_max_tokens == 40 and gen.backend == "hf" and gen.engine == "hf"
    assert SearchConfig(fitness="pass1").numbers["fitness"] == "pass1" and "fitness" not in SearchConfig().numbers
    assert str(output_stem(Stem(), SearchConfig(budget=0.5, fitness="pass1"), None)) == "regular-keep50pct-pass1"
    with pytest.raises(ValueError, match="fitness"):
        SearchConfig(fitness="acc")


class CountingRunner:
    """btp.generate / btp.evaluate as subprocesses (the real path), counted."""

    def __init__(self):
        from btp.pruning import SubprocessRunner

        self.real, self.calls = SubprocessRunner(), []

    def generate(self, args):
        self.calls.append("generate")
        self.real.generate(args)

    def evaluate(self, args):
        self.calls.append("evaluate")
        self.real.evaluate(args)


@pytest.mark.slow
def test_main_pass1_fitness_equals_btp_pruned_and_resumes(tmp_path):
    """The embedded model, HF generation, the sandbox: MBPP's first 4 problems are the dev subset (it solves Mbpp/14
    within 64 tokens), the 5th is held out. The final mask's fitness is 1 - the pass@1 btp.pruned reports for the
    same heads removed, and the unpruned control's that of btp.pruned's base arm; a run killed before its final
    file resumes to the same result without generating anything again."""
    import json

    from btp import pruned
    from btp.cmaes_search import main
    from btp.store import read_jsonl

    flags = ["--dataset", "mbpp", "--results-dir", str(tmp_path), "--seed", "0", "--backend", "hf"]
    argv = flags + [
        "--fitness",
        "pass1",
        "--dev-problems",
        "4",
        "--heldout-problems",
        "1",
        "--gen-max-tokens",
        "64",
        "--source",
        "reference",
        "--num-samples",
        "4",
        "--sample-max-tokens",
        "96",
        "--heldout",
        "1",
        "--popsize",
        "2",
        "--budget",
        "0.95",
        "--max-generations",
        "1",
        "--control-draws",
        "0",
        "--n-boot",
        "50",
        "--no-progress",
    ]
    r = CountingRunner()
    path = main(argv, runner=r)
    doc = json.loads(path.read_text())
    assert path.name == "regular-reference-keep95pct-pass1.json" and doc["fitness_kind"] == "pass1"
    assert doc["search"]["fitness"] == "pass1" and doc["pass1"]["dev"] == ["Mbpp/11", "Mbpp/12", "Mbpp/13", "Mbpp/14"]
    assert doc["identity"]["pass1"]["heldout"] == ["Mbpp/15"] and r.calls.count("generate") >= 3
    recs = read_jsonl(path.with_suffix(".jsonl"))
    assert len(recs) == 1 and recs[0]["best_heldout"]["mean"] in (0.0, 1.0)
    final, sets = doc["final"], doc["controls"]["sets"]
    assert sets["cmaes"]["scoring_ce"] == final["fitness"] and set(sets) == {"cmaes", "unpruned"}
    assert sets["unpruned"]["scoring_ce"] == 0.75  # Mbpp/14 solved, the others not (as generated unpruned)
    # btp.pruned on the same heads, problems and generation flags
    heads = ",".join(f"L{l}H{h}" for l, h in final["removed"])
    comp = pruned.main(
        flags
        + ["--settings", f"heads:{heads}", "--controls", "0", "--limit", "4", "--max-tokens", "64"]
        + ["--num-samples", "4", "--sample-max-tokens", "96", "--n-boot", "50"]
    )
    assert comp["settings"][0]["pass_at_k"]["pass@1"] == pytest.approx(1 - final["fitness"])
    assert comp["base"]["pass_at_k"]["pass@1"] == pytest.approx(1 - sets["unpruned"]["scoring_ce"])
    # killed after the last generation's state, before its line and the final file: nothing is generated again
    jl = path.with_suffix(".jsonl")
    jl.write_text("")
    path.unlink()
    again = CountingRunner()
    assert main(argv, runner=again) == path and again.calls == []
    redo = json.loads(path.read_text())
    assert redo["final"] == final and redo["controls"]["sets"]["unpruned"] == sets["unpruned"]
    strip = lambda rs: [{k: v for k, v in x.items() if k not in WALL} for x in rs]
    assert strip(read_jsonl(jl)) == strip(recs)


def test_main_pass1_continues_as_an_uninterrupted_run_and_plots_say_pass1(tmp_path, tiny_folder):
    """The stage's pass1 wiring on a tiny model with a runner that passes problem i unless head (0, i) is removed:
    a run of 1 generation continued to 2 writes what a run of 2 writes, asking the runner only for new masks; the
    figures are labelled 1 - pass@1 on dev / held-out problems. A failing generate run is one line, exit 2."""
    import json
    import subprocess

    from btp import benchmarks
    from btp import plots as bp
    from btp.cmaes_search import main
    from btp.store import read_jsonl

    folder = tiny_folder
    probs = [q.problem_id for q in benchmarks.get("mbpp").load(limit=5)]

    def run(root, gens, runner):
        argv = ["--model", str(folder), "--dataset", "mbpp", "--results-dir", str(tmp_path / root), "--backend", "hf"]
        argv += ["--fitness", "pass1", "--dev-problems", "3", "--heldout-problems", "2", "--source", "reference"]
        argv += [
            "--num-samples",
            "4",
            "--sample-max-tokens",
            "200",
            "--heldout",
            "1",
            "--popsize",
            "4",
            "--budget",
            "0.5",
        ]
        argv += ["--control-draws", "2", "--n-boot", "50", "--no-progress", "--max-generations", str(gens)]
        return main(argv, runner=runner)

    one = run("a", 2, HeadRunner(probs))
    r1, r2 = HeadRunner(probs), HeadRunner(probs)
    run("b", 1, r1)
    two = run("b", 2, r2)
    strip = lambda rs: [{k: v for k, v in x.items() if k not in WALL} for x in rs]
    ra, rb = read_jsonl(one.with_suffix(".jsonl")), read_jsonl(two.with_suffix(".jsonl"))
    assert len(ra) == 2 and strip(ra) == strip(rb)
    da, db = json.loads(one.read_text()), json.loads(two.read_text())
    assert da["final"] == db["final"] and da["controls"] == db["controls"] and da["fitness_kind"] == "pass1"
    assert da["pass1"]["dev"] == probs[:3] and da["pass1"]["heldout"] == probs[3:]
    # the first generation's masks were judged by the first run: the second asked only for new ones
    assert r2.calls.count(("generate", 3)) < 4 + 4 + 2 and ra[1]["evals_computed"] <= 8
    assert set(da["controls"]["sets"]) == {"cmaes", "unpruned", "random_0", "random_1", "random"}
    f = np.asarray([ra[0]["best_fitness"], ra[0]["worst_fitness"]])
    assert ((f * 3) % 1 == 0).all() and 0 <= f.min() <= f.max() <= 1  # 1 - pass@1 over 3 problems, n = 1
    assert da["controls"]["sets"]["unpruned"]["scoring_ce"] == 0.0  # everything passes unpruned
    a = bp.load_cmaes(tmp_path / "a", None, "mbpp", one.stem)  # the one model of the tree
    assert len(a.data) == 2
    assert bp.cmaes_metric(a) == "1 - pass@1" and "3 dev / 2 held-out problems, pass@1" in bp.cmaes_title(a, "t")
    assert "pass@1" in bp.cmaes_fitness(a).axes[0].get_ylabel()
    assert "pass@1" in bp.cmaes_controls(a).axes[0].get_xlabel()

    class Fails(HeadRunner):
        def generate(self, args):
            raise subprocess.CalledProcessError(1, ["python", "-m", "btp.generate", "--model", "x"])

    with pytest.raises(SystemExit, match=r"btp.generate --model failed \(exit 1\) — rerun to resume"):
        run("c", 1, Fails(probs))
