"""Attribution patching (`--method atp`): exact where the loss is linear in a head's slice, equal to a central
finite difference of the gate on tiny models; `atp+exact` gives the exact matrix's entries for the verified heads;
the agreement report."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_mixed, make_tiny
from test_ablation import tiny_set

import btp.headsets
from btp import ablation as abl
from btp.arch import adapter
from btp.heads import gates_for, head_gates
from btp.scoring import final_hidden
from btp.stats import agreement


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def linear_ce(model, hidden, positions, targets, chunk=1024):
    """A loss linear in the logits: minus the target logit (no log-sum-exp)."""
    lg = adapter(model).logits_from_normed(hidden[:, positions.to(hidden.device)]).float()
    return -lg.gather(-1, targets.to(hidden.device).view(1, -1, 1).expand(lg.shape[0], -1, 1))[..., 0]


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_atp_is_exact_when_the_loss_is_linear_in_the_head(monkeypatch, ablation):
    """Last-layer heads feed straight into the unembedding (no final norm, last MLP silenced) and the loss is
    linear in the logits: the first-order estimate is the exact delta."""
    model = make_tiny("llama").double()
    model.model.norm = torch.nn.Identity()
    L = adapter(model).n_layers
    with torch.no_grad():
        model.model.layers[-1].mlp.down_proj.weight.zero_()
    monkeypatch.setattr(abl, "token_ce", linear_ce)
    monkeypatch.setattr(btp.headsets, "token_ce", linear_ce)
    ss = tiny_set()
    cfg = dict(ablation=ablation, layers=[L - 1], n_boot=10, progress=False)
    exact = abl.run_matrix(model, ss, abl.MatrixConfig(**cfg))
    est = abl.run_atp(model, ss, abl.MatrixConfig(method="atp", **cfg))
    ok = np.isfinite(exact["delta"])
    assert ok.sum() == 2 * 4 and np.isfinite(est["delta"]).sum() == ok.sum()
    assert np.abs(exact["delta"][ok]).max() > 1e-4
    np.testing.assert_allclose(est["delta"][ok], exact["delta"][ok], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(est["base_ce"], exact["base_ce"], atol=1e-6)


def _ce_at_gate(model, sample, head, value, rep=None) -> float:
    ad = adapter(model)
    g = gates_for(ad, [head], value=value, dtype=torch.float64)
    with torch.no_grad(), head_gates(model, g, replacement=rep):
        h = final_hidden(model, torch.as_tensor(sample.input_ids)[None])
        lg = ad.logits_from_normed(h[0, torch.as_tensor(sample.positions)]).double()
    return float(F.cross_entropy(lg, torch.as_tensor(sample.targets)))


@pytest.mark.parametrize("name,ablation", [("llama", "zero"), ("gemma2", "zero"), ("qwen3", "mean"), ("mixed", "zero")])
def test_atp_matches_a_finite_difference(name, ablation):
    """atp = d/de CE(slice a + e (r - a)) at e = 0, i.e. minus the derivative in the gate g = 1 - e."""
    model = (make_mixed() if name == "mixed" else make_tiny(name)).double()
    ad = adapter(model)
    ss = tiny_set(specs=((12, 5),))
    rep = btp.headsets.mean_o_proj_inputs(model, ss).double() if ablation == "mean" else None
    est, base = abl.atp_sample(model, ss.samples[0], rep)
    # five-point stencil in e = 1 - g: the rotary tables are fp32 even in an fp64 model (forward noise ~1e-8), so
    # a step small enough for a two-point difference would amplify that noise
    eps = 1e-2

    def ce(l, h, e):
        return _ce_at_gate(model, ss.samples[0], (l, h), 1 - e, rep)

    for l, h in ad.all_heads():
        fd = (-ce(l, h, 2 * eps) + 8 * ce(l, h, eps) - 8 * ce(l, h, -eps) + ce(l, h, -2 * eps)) / (12 * eps)
        assert est[l, h] == pytest.approx(fd, abs=1e-6, rel=1e-4), (l, h)
    if name == "mixed":
        assert np.isnan(est[1, 2:]).all()
    assert base == pytest.approx(_ce_at_gate(model, ss.samples[0], (0, 0), 1.0, rep), abs=1e-6)  # token_ce is fp32


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_verify_gives_the_exact_matrix_entries(ablation):
    model = make_tiny("llama")
    ss = tiny_set()
    exact = abl.run_matrix(model, ss, abl.MatrixConfig(ablation=ablation, n_boot=10, progress=False))
    res = abl.run_atp(
        model, ss, abl.MatrixConfig(ablation=ablation, method="atp+exact", verify=3, n_boot=10, progress=False)
    )
    v = res["verified"]
    assert (v == 1).sum() == 3 and (v == 2).sum() == 3
    top = np.argsort(-np.abs(np.nan_to_num(res["delta_atp"].mean(0))), axis=None)[:3]
    assert set(np.flatnonzero(v == 1)) == set(top.tolist())
    m = v > 0
    np.testing.assert_allclose(res["delta_exact"][:, m], exact["delta"][:, m], atol=1e-5)
    np.testing.assert_allclose(res["delta"][:, m], exact["delta"][:, m], atol=1e-5)
    assert np.isnan(res["delta_exact"][:, ~m]).all()
    np.testing.assert_array_equal(res["delta"][:, ~m], res["delta_atp"][:, ~m])


def test_agreement_report():
    x = np.array([[3.0, 2.0, 1.0], [0.5, np.nan, -1.0]])
    a = agreement(x, x, ks=(2,))
    assert a["n"] == 5 and a["pearson"] == pytest.approx(1) and a["spearman"] == pytest.approx(1)
    assert a["topk_recall"]["2"] == 1.0
    y = x.copy()
    y[0, 0] = -5.0
    b = agreement(y, x, ks=(1, 2))
    assert b["topk_recall"]["1"] == 0.0 and b["largest_misses"][0]["index"] == [0, 0]
    assert b["spearman"] < 1


def test_main_atp_and_verify_write_the_matrix_format_with_agreement(tmp_path):
    """`--method atp` writes `<stem>-atp` in the exact matrix's format, marked as an estimate; with the exact
    matrix of the same samples present, the agreement report is in its json and `results.ablation_pair` finds the
    pair; `--method atp+exact --verify K` writes `<stem>-atp-verifyK` whose verified entries equal the matrix's."""
    from btp import results
    from btp.models import load_tokenizer
    from btp.store import read_json, read_npz

    tok = load_tokenizer()
    folder = tmp_path / "tinyllama"
    model = make_tiny("llama", vocab_size=len(tok))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    argv = [
        "--model",
        str(folder),
        "--dataset",
        "mbpp",
        "--seed",
        "2",
        "--source",
        "reference",
        "--num-samples",
        "2",
        "--n-boot",
        "20",
        "--no-progress",
        "--no-knockout",
        "--results-dir",
        str(tmp_path / "r"),
    ]
    ex = abl.main(argv)
    p = abl.main(argv + ["--method", "atp"])
    assert p.name == "regular-reference-atp.npz"
    a, e = read_npz(p), read_npz(ex)
    assert set(e) - {"provenance"} <= set(a) and a["delta"].shape == e["delta"].shape
    meta = read_json(p.with_suffix(".json"))
    assert meta["estimate"] is True and meta["method"] == "atp" and meta["agreement_exact"] == ex.name
    assert a["provenance"]["estimate"] is True and "estimate" not in e["provenance"]
    rep = meta["agreement"]["vs_exact_matrix"]
    assert rep["n"] == 12 and -1 <= rep["spearman"] <= 1 and "10" in rep["topk_recall"]
    assert results.is_estimate(p.stem) and results.exact_counterpart(p.stem) == ex.stem
    pair = results.ablation_pair(p.parent, p.stem)
    assert pair is not None and np.array_equal(pair[1]["delta"], e["delta"])
    v = abl.main(argv + ["--method", "atp+exact", "--verify", "2"])
    assert v.name == "regular-reference-atp-verify2.npz"
    z = read_npz(v)
    m = z["verified"] > 0
    assert m.sum() == 4
    np.testing.assert_allclose(z["delta"][:, m], e["delta"][:, m], atol=1e-5)
    assert "verified_heads" in read_json(v.with_suffix(".json"))["agreement"]
    assert results.exact_counterpart(v.stem) == ex.stem
    # check lists the agreement beside the screen; plots draws estimate vs exact
    from btp import check, plots

    assert check.atp_note(p.parent, p.stem).startswith("(ρ ") and "r@10" in check.atp_note(p.parent, v.stem)
    (p.parent / "regular-reference.npz").rename(p.parent / "gone.npz")
    assert check.atp_note(p.parent, p.stem) == "(no exact)"
    (p.parent / "gone.npz").rename(p.parent / "regular-reference.npz")
    names = [n for n, _ in plots.ablation_figures(tmp_path / "r", None)]
    assert "ablation_mbpp_regular-reference-atp_vs_exact" in names
    assert "ablation_mbpp_regular-reference-atp-verify2_vs_exact" in names
    assert "ablation_mbpp_regular-reference_vs_exact" not in names


def test_config_errors():
    with pytest.raises(ValueError, match="method"):
        abl.MatrixConfig(method="taylor")
    with pytest.raises(ValueError, match="verify"):
        abl.MatrixConfig(method="atp+exact", verify=0)
    assert abl.output_name("regular", "mean", None, "atp") == "regular-mean-atp"
    assert abl.output_name("regular-reference", "zero", [1], "atp+exact", 5) == "regular-reference-layers1-atp-verify5"
    assert abl.output_name("regular", "zero", None) == "regular"
