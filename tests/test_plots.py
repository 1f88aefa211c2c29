"""btp.plots on a real results tree (tests/results_tree.py): `python -m btp.plots` writes every figure the tree
allows as non-trivial PNG/PDF files; titles state the population; the plotted numbers are the stored ones
(heatmap NaN blank and centred at zero, Jaccard overlaps, knockout and Taylor curves, pass@k)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from matplotlib.text import Text
from results_tree import model_dir, results_tree, tree_copy  # noqa: F401  (session fixture)

from btp import plots as bp
from btp.results import LAYER_AXIS, LENS_AXIS
from btp.stats import pass_at_k_summary

MODEL = "smollm2-135m"


def texts(fig) -> str:
    fig.draw_without_rendering()  # materialise tick labels
    return "\n".join(t.get_text() for t in fig.findobj(Text))


@pytest.mark.slow
def test_cli_writes_every_figure(results_tree, tmp_path):
    out = tmp_path / "figs"
    files = bp.main(["--results-dir", str(results_tree), "--model", MODEL, "--out", str(out), "--pdf"])
    names = {p.name for p in files}
    he, mb = "humaneval", "mbpp"
    want = {
        "generation_pass_at_k",
        "generation_statuses",
        "generation_finish_reasons",
        "generation_output_lengths",
        *(
            f"entropy_{d}_{n}_{kind}"
            for d, n in ((he, "regular-all"), (he, "chain_code-all"), (he, "regular-incorrect"), (mb, "regular-all"))
            for kind in ("layers", "histograms")
        ),
        "entropy_modes_humaneval_generations-all",  # regular vs chain_code
        "entropy_populations_humaneval_regular",  # all vs incorrect generations
        "entropy_populations_humaneval_regular_histograms",
        "entropy_datasets_regular_generations-all",  # humaneval vs mbpp
        *(
            f"ablation_{d}_regular-all-layers28_29_{kind}"
            for d in (he, mb)
            for kind in ("heatmap", "layers", "knockout")
        ),
        "ablation_top_head_overlap",
        *(f"taylor_{he}_regular-all_{kind}" for kind in ("loss", "heads", "layers")),
        *(
            f"cmaes_{he}_regular-all-keep210_{kind}"
            for kind in ("fitness", "sigma", "mask", "mask_changes", "controls")
        ),
    }
    slug = model_dir(results_tree).name
    assert names == {f"{slug}__{w}.{ext}" for w in want for ext in ("png", "pdf")}
    for p in files:
        data = p.read_bytes()
        assert len(data) > 8000, p
        assert data.startswith(b"\x89PNG" if p.suffix == ".png" else b"%PDF"), p


@pytest.mark.slow
def test_titles_state_population(results_tree):
    for fam in ("entropy", "ablation", "taylor", "cmaes"):
        for name, fig in bp.FAMILIES[fam](results_tree, MODEL):
            t = texts(fig)
            assert "generations/all" in t or "generations/incorrect" in t, (name, t)
    a = bp.load_entropy(results_tree, MODEL, "humaneval", "regular-incorrect")
    assert a.population == "generations/incorrect" and a.n_samples == 2 and a.mode == "regular"
    t = texts(bp.entropy_by_layer(a))
    assert (
        f"{model_dir(results_tree).name} · humaneval · regular · generations/incorrect (n=2 samples, 2 problems)" in t
    )
    assert "caveat: n = 2 problems < 10: intervals are rough" in t  # every CI figure states n, and warns when small


@pytest.mark.slow
def test_entropy_lines_are_the_stored_means(results_tree):
    a = bp.load_entropy(results_tree, MODEL, "humaneval", "regular-all")
    fig = bp.entropy_by_layer(a, band="sd")
    ent_ax, ce_ax = fig.axes[:2]
    np.testing.assert_allclose(ent_ax.lines[0].get_ydata(), a.data["entropy_mean"], rtol=1e-6)
    np.testing.assert_allclose(ce_ax.lines[0].get_ydata(), a.data["ce_mean"], rtol=1e-6)
    assert list(ent_ax.lines[0].get_xdata()) == list(range(30))  # block index, 0-based
    _, lo, hi = bp._band(a, "ce", "ci")
    assert np.all(lo <= a.data["ce_mean"] + 1e-6) and np.all(a.data["ce_mean"] <= hi + 1e-6)
    # the default: the sample-weighted mean and its stored CI over problems (issue 12.9)
    ci_ax = bp.entropy_by_layer(a).axes[0]
    np.testing.assert_allclose(ci_ax.lines[0].get_ydata(), a.data["entropy_sample_mean"], rtol=1e-6)
    assert "CI over problems" in ci_ax.get_legend().get_title().get_text()
    groups = bp.compare(bp.load_all(results_tree, MODEL, "entropy"), "mode")
    assert [[x.name for x in g] for g in groups] == [["regular-all", "chain_code-all"]]


@pytest.mark.slow
def test_ablation_heatmap_knockout_and_overlap(results_tree):
    a = bp.load_ablation(results_tree, MODEL, "humaneval", "regular-all-layers28_29")
    dm = a.data["delta_mean"]
    fig = bp.ablation_heatmap(a)
    im = fig.axes[0].images[0]
    arr = im.get_array()
    assert np.array_equal(arr.mask, ~np.isfinite(dm)) and arr.mask[:28].all() and not arr.mask[28:].any()
    assert im.cmap.get_bad()[3] == 0  # NaN drawn transparent (blank)
    assert im.norm.vcenter == 0 and im.norm.vmin == -im.norm.vmax == -np.nanmax(np.abs(dm))
    ko = a.extra["knockout"]
    fig = bp.ablation_knockout(a)
    top = next(l for l in fig.axes[0].lines if l.get_label().startswith("top-k"))
    assert list(top.get_xdata()) == [0, 1, 2, 4]
    np.testing.assert_allclose(top.get_ydata(), [ko["base"]["mean_ce"]] + [p["mean_ce"] for p in ko["top"]])
    labels = {l.get_label() for l in fig.axes[0].lines}
    assert {"greedy (re-ranked each step)", "random control (mean of 2 seeds)"} <= labels
    b = bp.load_ablation(results_tree, MODEL, "mbpp", "regular-all-layers28_29")
    J = bp.jaccard_matrix([dm, b.data["delta_mean"]], 10)
    sa, sb = bp.top_heads(dm, 10), bp.top_heads(b.data["delta_mean"], 10)
    assert J[0, 1] == pytest.approx(len(sa & sb) / len(sa | sb)) and J[0, 0] == 1
    ranked = [tuple(t["head"]) for t in a.meta["top_heads"][:10]]  # the stage's own ranking
    assert sa == set(ranked)


def test_jaccard_and_top_heads_on_known_matrices():
    m1 = np.array([[3.0, 2.0, np.nan], [1.0, 0.0, -1.0]])
    m2 = np.array([[0.0, 5.0, np.nan], [4.0, 1.0, -2.0]])
    assert bp.top_heads(m1, 2) == {(0, 0), (0, 1)} and bp.top_heads(m2, 2) == {(0, 1), (1, 0)}
    assert bp.jaccard_matrix([m1, m2], 2)[0, 1] == pytest.approx(1 / 3)
    fig = bp.head_heatmap(np.array([[np.nan, 1.0], [-0.25, 0.0]]), "t")
    assert fig.axes[0].images[0].norm.vmin == -1.0


@pytest.mark.slow
def test_taylor_figures(results_tree):
    a = bp.load_taylor(results_tree, MODEL, "humaneval", "regular-all")
    recs = a.data
    assert [r["iteration"] for r in recs] == [1, 2, 3] and a.population == "generations/all"
    fig = bp.taylor_loss(a)
    it_ax, alive_ax = fig.axes[:2]
    scoring, held = it_ax.lines[:2]
    assert list(scoring.get_xdata()) == [0, 1, 2] and list(held.get_xdata()) == [0, 1, 2, 3]
    np.testing.assert_allclose(
        held.get_ydata(), [recs[0]["base_heldout_loss"]] + [r["heldout_loss_after"] for r in recs]
    )
    assert list(alive_ax.lines[1].get_xdata()) == [270, 250, 230, 210]
    P = bp.pruned_at(recs, (30, 9))
    assert (P == 0).sum() == recs[-1]["n_alive_after"] == 210
    assert sorted(map(tuple, np.argwhere(P > 0).tolist())) == sorted(map(tuple, recs[-1]["pruned_total"]))
    assert "(210 alive)" in texts(bp.taylor_heads(a))
    assert "2 scoring / 2 held-out samples" in texts(bp.taylor_layers(a))


@pytest.mark.slow
def test_generation_figures_use_stored_numbers(results_tree):
    md = model_dir(results_tree)
    s = json.loads((md / "humaneval/summary.json").read_text())
    pts = bp.pass_at_k_points(s)
    assert [p[0] for p in pts] == [1, 2]
    assert pts[0][1:] == (
        s["pass_at_k"]["pass@1"]["estimate"],
        s["pass_at_k"]["pass@1"]["ci_low"],
        s["pass_at_k"]["pass@1"]["ci_high"],
    )
    gens = {d: bp.load_generations(results_tree, MODEL, d) for d in ("humaneval", "mbpp")}
    assert len(gens["humaneval"]) == 4 and all(1 <= g["n_output_tokens"] <= 16 for g in gens["humaneval"])
    fig = bp.finish_reasons(gens)
    widths = [p.get_width() for p in fig.axes[0].patches]
    assert sum(widths) == pytest.approx(200)  # two datasets, 100% each
    fig = bp.statuses({d: bp.load_evaluations(results_tree, MODEL, d) for d in ("humaneval", "mbpp")})
    assert "humaneval" in texts(fig) and "no code counts as failed" in texts(fig)


def test_model_dir_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        bp.model_dir(tmp_path / "nope", None)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(ValueError, match="2 models"):
        bp.model_dir(tmp_path, None)
    with pytest.raises(FileNotFoundError, match="no results for model"):
        bp.model_dir(tmp_path, "org/other")
    assert bp.model_dir(tmp_path, "a") == tmp_path / "a"
    from btp.results import parse_stem

    s = parse_stem("chain_code-reference-mean")
    assert (s.mode, s.population, s.extra) == ("chain_code", "reference/all", "mean")
    s = parse_stem("regular")
    assert (s.mode, s.population, s.extra) == ("regular", "generations/correct", "")


def test_paired_populations_get_their_own_figure():
    """Issue 12.12: correct vs incorrect on the same problems is shown as its own comparison."""
    L = 3
    arrays = {
        "layer": np.arange(1, L + 1),
        **{
            f"{m}_{k}": np.ones(L)
            for m in ("entropy", "ce")
            for k in ("mean", "std", "sample_mean", "ci_low", "ci_high")
        },
    }
    items = [
        bp.Analysis("entropy", "humaneval", n, arrays)
        for n in ("regular", "regular-incorrect", "regular-correct_paired", "regular-incorrect_paired", "chain_code")
    ]
    groups = bp.paired(items)
    assert [[a.name for a in g] for g in groups] == [["regular-correct_paired", "regular-incorrect_paired"]]
    title = bp.entropy_by_layer(groups[0]).texts[0].get_text()
    assert (
        "paired" in " ".join(t.get_text() for t in bp.entropy_by_layer(groups[0]).axes[0].get_legend().texts)
        or "paired" in title
    )


def test_knockout_figure_says_whether_its_curves_are_held_out():
    """Issue 12.8: a knockout figure names its selection (held-out or in-sample)."""
    pt = {"k": 1, "mean_ce": 1.0, "ci_low": 0.9, "ci_high": 1.1}
    for sel, word in (
        ("held-out: ranked on 3 problems, curves on 1 other problems", "held-out"),
        ("in-sample: ranked and reported on the same samples (optimistic)", "in-sample"),
    ):
        fig = bp.knockout_curves({"top": [pt], "selection": sel, "ci": "over problems"})
        assert word in fig.axes[0].get_title()


@pytest.mark.slow
def test_layer_axes_say_block_index(results_tree):
    """Every axis that counts layers says how (block index, 0-based); the lens's says residual after block."""
    seen = set()
    for fam in ("entropy", "ablation", "taylor", "cmaes"):
        for name, fig in bp.FAMILIES[fam](results_tree, MODEL):
            for ax in fig.axes:
                for lab in (ax.get_xlabel(), ax.get_ylabel()):
                    if lab.startswith(("layer", "residual")) or "by layer" in lab:
                        assert lab == LENS_AXIS or LAYER_AXIS in lab, (name, lab)
                        seen.add(lab)
    assert LENS_AXIS in seen and LAYER_AXIS in seen
    a = bp.load_entropy(results_tree, MODEL, "humaneval", "regular-all")
    assert a.meta["layer_numbering"] == "block index, 0-based" and a.data["layer"][0] == 0
    assert "residual after block 0" in texts(bp.entropy_histograms(a, layers=[0, 29]))


@pytest.mark.slow
def test_two_models_into_one_out_never_overwrite(results_tree, tmp_path):
    root = tree_copy(results_tree, tmp_path / "t")
    slug = model_dir(root).name
    (root / "org--other").mkdir()
    for d in ("humaneval", "mbpp"):
        tree_copy(root / slug / d, root / "org--other" / d)
    out = tmp_path / "figs"
    fams = ("generation", "taylor")
    a = bp.write_figures(root, slug, out, families=fams)
    b = bp.write_figures(root, "org--other", out, families=fams)
    assert len(a) == len(b) >= 7 and not {p.name for p in a} & {p.name for p in b}
    assert all(p.name.startswith(f"{slug}__") for p in a) and all(p.name.startswith("org--other__") for p in b)
    assert sorted(out.iterdir()) == sorted(a + b)
    for fam in fams:  # and in every title
        for name, fig in bp.FAMILIES[fam](root, "org--other"):
            assert "org--other" in texts(bp.with_model(fig, "org--other")), name
            assert slug not in texts(fig), name
    t = bp.load_taylor(root, "org--other", "humaneval", "regular-all")
    assert "org--other · humaneval" in texts(bp.taylor_loss(t))  # the analysis title itself, without with_model


def test_pass_at_k_single_k_is_points_with_both_intervals_and_small_n_caveat():
    summ = {
        "humaneval": {"n_problems": 5, "pass_at_k": pass_at_k_summary([1] * 5, [0] * 5, [1], n_boot=100)},
        "mbpp": {"n_problems": 40, "pass_at_k": pass_at_k_summary([1] * 40, [1] * 10 + [0] * 30, [1], n_boot=100)},
    }
    fig = bp.pass_at_k(summ)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["humaneval", "mbpp"]
    assert all(l.get_linestyle() == "None" for l in ax.lines if len(l.get_xdata()) == 1 and l.get_marker() == "o")
    t = texts(fig)
    assert "humaneval (n=5 problems)" in t and "mbpp (n=40 problems)" in t and "Wilson" in t
    assert "caveat: n < 10 problems (humaneval n=5)" in t
    # 0/5 solved: the Wilson bar reaches 43.4%, not a point at 0
    assert ax.get_ylim()[1] > 43.4
    multi = bp.pass_at_k({"humaneval": {"n_problems": 12, "pass_at_k": pass_at_k_summary([2] * 12, [1] * 12, [1, 2])}})
    assert "caveat" not in texts(multi) and multi.axes[0].get_xlabel() == "k"


@pytest.mark.slow
def test_plots_skips_and_names_broken_files(results_tree, tmp_path, capsys):
    root = tree_copy(results_tree, tmp_path / "t")
    md = model_dir(root)
    npz = md / "humaneval/entropy/chain_code-all.npz"
    npz.write_bytes(npz.read_bytes()[: npz.stat().st_size // 2])
    (md / "mbpp/summary.json").write_text('{"pass_at_k": ')
    out = tmp_path / "figs"
    with pytest.raises(SystemExit) as e:
        bp.main(
            [
                "--results-dir",
                str(root),
                "--model",
                MODEL,
                "--out",
                str(out),
                "--only",
                "entropy",
                "--only",
                "generation",
            ]
        )
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "2 broken files skipped" in err and "chain_code-all.npz" in err and "mbpp/summary.json" in err
    names = {p.name.split("__", 1)[1] for p in out.iterdir()}
    assert "entropy_humaneval_regular-all_layers.png" in names and "generation_pass_at_k.png" in names
    assert not any("chain_code-all" in n for n in names)


def test_cli_offers_every_family():
    """`python -m btp.plots` runs main after every family is registered (circuits' figures come last in the module)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    r = subprocess.run([sys.executable, "-m", "btp.plots", "--help"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    only = re.search(r"--only \{([^}]*)\}", r.stdout).group(1).split(",")
    assert only == list(bp.FAMILIES) and "circuits" in only, only
