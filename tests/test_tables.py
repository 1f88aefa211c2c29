"""btp.results' loaders for pandas/xarray users on a real results tree (tests/results_tree.py): named dimensions,
the stored numbers, the layer numbering in attrs, and one-line errors for what is not there."""

from __future__ import annotations

import json

import numpy as np
import pytest
from results_tree import model_dir, results_tree  # noqa: F401  (session fixture)

from btp import results as R

MODEL = "smollm2-135m"
pytestmark = pytest.mark.slow


def test_entropy_dataset(results_tree):
    ds = R.entropy_dataset(results_tree, MODEL, "humaneval", "regular-all")
    a, meta = R.read_analysis(model_dir(results_tree) / "humaneval/entropy", "regular-all")
    assert ds["entropy"].dims == ("token", "layer") and ds["sample_ce_mean"].dims == ("sample", "layer")
    assert ds.sizes["layer"] == 30 and ds["layer"].values.tolist() == list(range(30))
    assert ds.attrs["layer_numbering"] == "block index, 0-based" and ds.attrs["population"] == "generations/all"
    np.testing.assert_array_equal(ds["kl"].values, a["kl"])
    # per-sample means recomputed from the tokens through the named coordinate are the stored ones
    per = ds["ce"].groupby("sample_of_token").mean().values
    np.testing.assert_allclose(per, a["sample_ce_mean"], rtol=1e-5)
    assert ds["problem_id"].values.tolist() == a["sample_problem_id"].astype(str).tolist()
    assert R.entropy_dataset(results_tree, MODEL, "humaneval").attrs["name"] == "regular-all"  # first in plot order


def test_ablation_taylor_cmaes_and_evaluations(results_tree):
    md = model_dir(results_tree)
    ab = R.ablation_dataset(results_tree, MODEL, "mbpp")
    arr, _ = R.read_analysis(md / "mbpp/ablation", "regular-all-layers28_29")
    assert ab["delta"].dims == ("sample", "layer", "head") and ab["delta_ci_low"].dims == ("layer", "head")
    np.testing.assert_array_equal(ab["delta_mean"].values, arr["delta_mean"])
    top = ab["delta_mean"].stack(lh=("layer", "head")).dropna("lh").sortby(lambda x: -x).isel(lh=0)
    assert (int(top["layer"]), int(top["head"])) == R.rank_heads(arr["delta_mean"])[0]
    tay = R.taylor_dataset(results_tree, MODEL, "humaneval")
    recs, _ = R.read_taylor(md / "humaneval/taylor", "regular-all")
    assert tay["importance"].dims == ("iteration", "layer", "head") and tay["iteration"].values.tolist() == [1, 2, 3]
    assert tay["n_alive_after"].values.tolist() == [250, 230, 210]
    assert int(tay["pruned"].sum()) == 60 and tay["heldout_loss_after"].values.tolist() == [
        r["heldout_loss_after"] for r in recs
    ]
    cm = R.cmaes_frame(results_tree, MODEL, "humaneval")
    assert cm.index.name == "generation" and cm.index.tolist() == [1, 2] and cm.attrs["finished"]
    assert {"best_fitness", "sigma", "best_so_far_heldout_mean", "best_so_far_heldout_ci_low"} <= set(cm.columns)
    ev = R.evaluations_frame(results_tree, MODEL, "humaneval")
    rows = [json.loads(l) for l in (md / "humaneval/evaluations.jsonl").read_text().splitlines()]
    assert ev.index.names == ["problem_id", "sample"] and len(ev) == 4
    assert ev["passed"].sum() == sum(r["passed"] for r in rows)
    with pytest.raises(FileNotFoundError, match="no finished taylor output 'nope'.*have: regular-all"):
        R.taylor_dataset(results_tree, MODEL, "humaneval", "nope")
    with pytest.raises(FileNotFoundError, match="btp.cmaes_search"):
        R.cmaes_frame(results_tree, MODEL, "mbpp")
