"""Ablation stage: every matrix entry, every knockout point and mean ablation equal a direct full forward of a
weight-surgery copy (full logits); `fixed_attention` is exact; interrupted runs resume to the same npz.
Tiny random models of several architectures, incl. gemma2 (soft-capping) and the mixed-head model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ARCH_NAMES, KERNELS, make_mixed, make_tiny

from btp import ablation as abl
from btp.arch import adapter
from btp.heads import fixed_attention, gates_for, head_gates, pruned_copy, record, start_at_layer
from btp.samples import Sample, SampleConfig, SampleSet
from btp.store import read_json, read_npz

TOL = 1e-5
ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = {
    **{a: (lambda attn="eager", a=a: make_tiny(a, attn=attn)) for a in ARCH_NAMES},
    "mixed": lambda attn="eager": make_mixed(attn=attn),
}


def tiny_set(specs=((14, 6), (21, 9)), vocab: int = 128, seed: int = 3) -> SampleSet:
    g = np.random.default_rng(seed)
    samples = [Sample(f"p{i}", -1, g.integers(1, vocab, T).astype(np.int64), s0, T) for i, (T, s0) in enumerate(specs)]
    return SampleSet(samples, SampleConfig(source="reference"), "humaneval", "tiny")


def with_mean_bias(model, heads, rep):
    """Weight surgery for mean ablation: zero the heads, add W_slice @ mean to o_proj's bias."""
    m = pruned_copy(model, heads)
    ad, ad0 = adapter(m), adapter(model)
    for l, h in heads:
        o, d = ad.o_projs[l], ad.heads[l].head_dim
        if o.bias is None:
            o.bias = torch.nn.Parameter(torch.zeros(o.out_features), requires_grad=False)
        with torch.no_grad():
            o.bias += F.linear(rep[l, h], ad0.o_projs[l].weight[:, h * d : (h + 1) * d])
    return m


def direct_ce(model, sample: Sample, heads=(), rep=None) -> float:
    """Mean CE over the scored tokens from a full forward with full logits of a surgery copy."""
    heads = list(heads)
    m = model if not heads else (pruned_copy(model, heads) if rep is None else with_mean_bias(model, heads, rep))
    with torch.no_grad():
        logits = m(input_ids=torch.as_tensor(sample.input_ids)[None]).logits[0].float()
    return F.cross_entropy(logits[torch.as_tensor(sample.positions)], torch.as_tensor(sample.targets)).item()


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("attn", KERNELS)
def test_matrix_equals_direct_surgery(name, attn):
    model = MODELS[name](attn)
    ad = adapter(model)
    ss = tiny_set()
    res = abl.run_matrix(model, ss, abl.MatrixConfig(batch_rows=3, per_token=True, n_boot=50, progress=False))
    assert res["delta"].shape == (2, ad.n_layers, ad.max_heads)
    assert res["layer_num_heads"].tolist() == ad.layer_num_heads
    for s, sample in enumerate(ss.samples):
        base = direct_ce(model, sample)
        assert res["base_ce"][s] == pytest.approx(base, abs=TOL)
        for l in range(ad.n_layers):
            for h in range(ad.max_heads):
                if h >= ad.heads[l].n_heads:
                    assert np.isnan(res["delta"][s, l, h])
                    continue
                assert res["delta"][s, l, h] == pytest.approx(direct_ce(model, sample, [(l, h)]) - base, abs=TOL)
    assert np.nanmax(np.abs(res["delta"])) > 1e-3  # ablations do something
    # per-token deltas average to the matrix; summary = mean over samples with a CI around it
    for s in range(2):
        tok = res["token_delta"][ss.fields()["sample_index"] == s]
        ok = np.isfinite(res["delta"][s])
        np.testing.assert_allclose(tok.mean(0)[ok], res["delta"][s][ok], atol=1e-6)
        assert np.isnan(tok[:, ~ok]).all()
    np.testing.assert_allclose(res["delta_mean"], res["delta"].mean(0), atol=1e-6)
    ok = np.isfinite(res["delta_mean"])
    assert (res["delta_ci_low"][ok] <= res["delta_mean"][ok] + 1e-7).all()
    assert (res["delta_ci_high"][ok] >= res["delta_mean"][ok] - 1e-7).all()
    if name == "mixed":
        assert np.isnan(res["delta"][:, 1, 2:]).all() and np.isfinite(res["delta"][:, 1, :2]).all()


@pytest.mark.parametrize("name", ["llama", "gemma2", "mixed"])
def test_attention_reuse_and_layers_subset(name):
    model = MODELS[name]()
    ss = tiny_set()
    a = abl.run_matrix(model, ss, abl.MatrixConfig(layers=[1, 2], progress=False, n_boot=20))
    b = abl.run_matrix(
        model, ss, abl.MatrixConfig(layers=[1, 2], reuse_attention=False, batch_rows=1, progress=False, n_boot=20)
    )
    np.testing.assert_allclose(a["delta"], b["delta"], atol=TOL, equal_nan=True)
    assert np.isnan(a["delta"][:, 0]).all() and np.isfinite(a["delta"][:, 2]).all()


@pytest.mark.parametrize("arch", ["llama", "gemma2", "qwen3", "phi3"])
@pytest.mark.parametrize("attn", KERNELS)
def test_fixed_attention_primitive(arch, tiny_ids, attn):
    """Resuming at layer l with l's recorded o_proj input equals the full run, with and without gates on l,
    and layer l's attention is not computed."""
    model = make_tiny(arch, attn=attn)
    ad = adapter(model)
    full = model(input_ids=tiny_ids).logits
    l = 1
    with record(model, layer_inputs=[l], o_proj_inputs=[l]) as rec:
        model(input_ids=tiny_ids)
    calls = []
    hook = (
        ad.attns[l].q_proj.register_forward_hook(lambda *a: calls.append(1))
        if hasattr(ad.attns[l], "q_proj")
        else ad.attns[l].qkv_proj.register_forward_hook(lambda *a: calls.append(1))
    )
    rows = [[], [(l, 0)], [(l, 1), (l, 3)], [(2, 2)]]
    with head_gates(model, gates_for(ad, rows)):
        ref = model(input_ids=tiny_ids.expand(4, -1)).logits
        calls.clear()
        with start_at_layer(model, l, rec["layer_in", l]), fixed_attention(model, l, rec["o_proj_in", l]):
            got = model(input_ids=tiny_ids.expand(4, -1)).logits
    hook.remove()
    assert calls == []
    torch.testing.assert_close(got[0:1], full, atol=TOL, rtol=0)
    torch.testing.assert_close(got, ref, atol=TOL, rtol=0)
    assert "forward" not in ad.attns[l].__dict__
    with pytest.raises(ValueError, match="does not fit"):
        with fixed_attention(model, l, rec["o_proj_in", l][:, :3]):
            model(input_ids=tiny_ids)
    assert "forward" not in ad.attns[l].__dict__


@pytest.mark.parametrize("name", ["llama", "gemma2", "mixed"])
@pytest.mark.parametrize("attn", KERNELS)
def test_knockout_equals_direct(name, attn):
    model = MODELS[name](attn)
    ss = tiny_set()
    res = abl.run_matrix(model, ss, abl.MatrixConfig(progress=False, n_boot=20))
    ko = abl.run_knockout(
        model,
        ss,
        res["delta_mean"],
        abl.KnockoutConfig(
            ks=[1, 3, 6], random_seeds=2, greedy=True, greedy_candidates=7, batch_rows=4, n_boot=20, progress=False
        ),
    )
    ranked = abl.rank_heads(res["delta_mean"])
    assert len(ranked) == adapter(model).n_heads_total
    assert [tuple(h) for h in ko["top"][1]["heads"]] == ranked[:3]
    curves = ko["top"] + ko["random"]["per_seed"][0] + ko["random"]["per_seed"][1] + ko["greedy"]["curve"]
    for p in curves:
        direct = [direct_ce(model, s, [tuple(h) for h in p["heads"]]) for s in ss.samples]
        np.testing.assert_allclose(p["per_sample_ce"], direct, atol=TOL)
        assert p["mean_ce"] == pytest.approx(np.mean(direct), abs=TOL) and p["ci_low"] <= p["mean_ce"] + 1e-9
    assert ko["base"]["mean_ce"] == pytest.approx(np.mean([direct_ce(model, s) for s in ss.samples]), abs=TOL)
    # greedy's first pick is the matrix's top head; its picks come from the top-7 candidates
    assert tuple(ko["greedy"]["order"][0]) == ranked[0]
    assert all(tuple(h) in ranked[:7] for h in ko["greedy"]["order"])
    assert ko["random"]["per_seed"][0][2]["heads"] != ko["random"]["per_seed"][1][2]["heads"]
    avg = ko["random"]["mean_over_seeds"][1]["mean_ce"]
    assert avg == pytest.approx(np.mean([ko["random"]["per_seed"][i][1]["mean_ce"] for i in range(2)]), abs=1e-9)
    with pytest.raises(ValueError, match="ks must lie"):
        abl.run_knockout(model, ss, res["delta_mean"], abl.KnockoutConfig(ks=[len(ranked) + 1], progress=False))


@pytest.mark.parametrize("name", ["llama", "gemma2", "mixed"])
def test_mean_ablation_equals_direct(name):
    model = MODELS[name]()
    ad = adapter(model)
    ss = tiny_set()
    # the replacement, computed independently with plain hooks: mean o_proj input over all tokens
    sums, n = {}, 0
    for s in ss.samples:
        hs = [
            ad.o_projs[l].register_forward_pre_hook(
                lambda m, a, l=l: sums.__setitem__(l, sums.get(l, 0) + a[0][0].double().sum(0))
            )
            for l in range(3)
        ]
        model(input_ids=torch.as_tensor(s.input_ids)[None])
        n += len(s.input_ids)
        for h in hs:
            h.remove()
    rep = abl.mean_o_proj_inputs(model, ss)
    for l, lay in enumerate(ad.heads):
        torch.testing.assert_close(
            rep[l, : lay.n_heads], (sums[l] / n).float().view(lay.n_heads, -1), atol=1e-6, rtol=0
        )
    res = abl.run_matrix(model, ss, abl.MatrixConfig(ablation="mean", progress=False, n_boot=20))
    for s, sample in enumerate(ss.samples):
        base = direct_ce(model, sample)
        for l, h in [(0, 1), (1, 1), (2, 3)]:
            assert res["delta"][s, l, h] == pytest.approx(direct_ce(model, sample, [(l, h)], rep) - base, abs=TOL)
    zero = abl.run_matrix(model, ss, abl.MatrixConfig(layers=[2], progress=False, n_boot=20))
    assert np.abs(zero["delta"][:, 2] - res["delta"][:, 2]).max() > 1e-4  # mean differs from zero ablation
    ko = abl.run_knockout(
        model, ss, res["delta_mean"], abl.KnockoutConfig(ks=[2], random_seeds=0, progress=False), replacement=rep
    )
    heads = [tuple(h) for h in ko["top"][0]["heads"]]
    np.testing.assert_allclose(
        ko["top"][0]["per_sample_ce"], [direct_ce(model, s, heads, rep) for s in ss.samples], atol=TOL
    )


def test_resume_matrix_after_interrupt(tmp_path, monkeypatch):
    model = make_tiny("gemma2")
    ss = tiny_set()
    cfg = abl.MatrixConfig(per_token=True, save_every=0, progress=False, n_boot=30)
    ref = abl.run_matrix(model, ss, cfg)
    part = tmp_path / "m.partial.npz"
    calls = {"n": 0}
    orig = abl.SampleRun.ce

    def flaky(self, sets):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return orig(self, sets)

    monkeypatch.setattr(abl.SampleRun, "ce", flaky)
    with pytest.raises(KeyboardInterrupt):
        abl.run_matrix(model, ss, cfg, partial=part, key="k1")
    assert read_npz(part)["done"].sum() == 4
    calls["n"] = 100
    out = abl.run_matrix(model, ss, cfg, partial=part, key="k1")
    assert calls["n"] == 102  # only the 2 remaining (sample, layer) units ran
    for k in ref:
        np.testing.assert_array_equal(out[k], ref[k], err_msg=k)
    with pytest.warns(UserWarning, match="another configuration"):
        abl.run_matrix(model, ss, cfg, partial=part, key="other")


# ---------------------------------------------------------------- main() end to end


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny random Llama with the embedded tokenizer's vocabulary, saved as a HF folder: main() runs on real
    HumanEval reference samples in seconds."""
    from btp.models import load_tokenizer

    tok = load_tokenizer()
    model = make_tiny("llama", vocab_size=len(tok))
    out = tmp_path_factory.mktemp("tinyllama")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_main_resume_gives_same_npz(tiny_folder, tmp_path, monkeypatch, capsys):
    argv = [
        "--model",
        str(tiny_folder),
        "--dataset",
        "mbpp",
        "--seed",
        "2",
        "--source",
        "reference",
        "--num-samples",
        "2",
        "--save-every",
        "0",
        "--knockout-ks",
        "1,2",
        "--random-seeds",
        "2",
        "--greedy",
        "--greedy-candidates",
        "4",
        "--n-boot",
        "50",
        "--no-progress",
        "--per-token",
    ]
    ref_path = abl.main(argv + ["--results-dir", str(tmp_path / "a")])
    calls = {"n": 0}
    orig = abl.SampleRun.ce

    def flaky(self, sets):
        calls["n"] += 1
        if calls["n"] in (4, 10):  # in the matrix (3 of 6 units done), in greedy step 2 (step 1 done; one sample
            # each: the curves on the held-out problem, the greedy choice on the other)
            raise KeyboardInterrupt
        return orig(self, sets)

    monkeypatch.setattr(abl.SampleRun, "ce", flaky)
    rb = ["--results-dir", str(tmp_path / "b")]
    for _ in range(2):
        with pytest.raises(KeyboardInterrupt):
            abl.main(argv + rb)
    capsys.readouterr()
    path = abl.main(argv + rb)
    assert "greedy: resuming after 1 steps" in capsys.readouterr().out
    assert path.name == "regular-reference.npz" and not list(path.parent.glob("*.partial.*"))
    a, b = read_npz(ref_path), read_npz(path)
    assert (
        set(a)
        == set(b)
        >= {
            "delta",
            "delta_mean",
            "delta_ci_low",
            "delta_ci_high",
            "base_ce",
            "layer_num_heads",
            "input_ids",
            "sample_offsets",
            "sample_index",
            "position",
            "token_id",
            "token_delta",
            "provenance",
        }
    )
    for k in a:
        if k != "provenance":
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    ka, kb = (
        read_json(ref_path.with_name("regular-reference_knockout.json")),
        read_json(path.with_name("regular-reference_knockout.json")),
    )
    for part in ("base", "top", "random", "greedy"):
        assert ka[part] == kb[part], part
    assert b["provenance"]["stage"] == "ablation" and b["provenance"]["samples"]["n_scored_tokens"] > 0
    # done: skipped without computing; other samples in the same place: refused
    calls["n"] = -100
    abl.main(argv + rb)
    assert calls["n"] == -100
    with pytest.raises(SystemExit):
        abl.main([x if x != "2" else "1" for x in argv] + rb)


def test_cli_parsing_errors():
    assert abl.parse_layers("0,3-5") == [0, 3, 4, 5] and abl.parse_layers("all") is None
    with pytest.raises(ValueError, match="bad layer list"):
        abl.parse_layers("0,x")
    with pytest.raises(ValueError, match="out of range"):
        abl.run_matrix(make_tiny("llama"), tiny_set(), abl.MatrixConfig(layers=[3], progress=False))
    with pytest.raises(ValueError, match="scored span"):
        abl.run_matrix(make_tiny("llama"), tiny_set(specs=((10, 0),)), abl.MatrixConfig(progress=False))
    assert abl.output_name("regular", "mean", [0, 2]) == "regular-mean-layers0_2"
    from btp import cli

    for name in ("greedy", "mean"):
        args = cli.parse(
            abl.build_parser(), ["--config", str(ROOT / "configs" / f"ablation_{name}.json"), "--random-seeds", "5"]
        )
        assert args.random_seeds == 5 and (args.greedy if name == "greedy" else args.ablation == "mean")


@pytest.mark.slow
def test_main_embedded_model(tmp_path):
    """The real embedded model on two HumanEval reference solutions, a few layers; one entry checked against a
    direct full forward of a surgery copy."""
    from btp.models import load_model
    from btp.samples import load_samples

    path = abl.main(
        [
            "--source",
            "reference",
            "--num-samples",
            "2",
            "--seed",
            "1",
            "--layers",
            "28,29",
            "--random-seeds",
            "1",
            "--results-dir",
            str(tmp_path),
            "--no-progress",
        ]
    )
    z = read_npz(path)
    assert path.name == "regular-reference-layers28_29.npz"
    assert z["delta"].shape == (2, 30, 9) and np.isfinite(z["delta"][:, 28:]).all()
    assert np.isnan(z["delta"][:, :28]).all()
    lm = load_model()
    ss = load_samples(
        tmp_path, lm.model_id, "humaneval", SampleConfig(source="reference", num_samples=2, seed=1), lm.tokenizer
    )
    l, h = np.unravel_index(np.nanargmax(z["delta"][0]), z["delta"][0].shape)
    s = ss.samples[0]
    got = z["delta"][0, l, h]
    want = direct_ce(lm.model, s, [(int(l), int(h))]) - direct_ce(lm.model, s)
    assert got == pytest.approx(want, abs=1e-4)
    ko = read_json(path.with_name("regular-reference-layers28_29_knockout.json"))
    assert [p["k"] for p in ko["top"]] == [1, 2, 4, 8, 16] and ko["top"][-1]["mean_ce"] > ko["base"]["mean_ce"]


def test_matrix_and_knockout_cis_are_over_problems():
    """Issue 12.7: with several samples per problem the matrix mean is the mean of problem means and its CI
    resamples problems (said in the output); knockout curves too."""
    model = make_tiny("llama")
    ss = tiny_set(((14, 6), (15, 6), (16, 6), (21, 9)))
    for s, pid in zip(ss.samples, ("a", "a", "a", "b")):
        s.problem_id = pid
    res = abl.run_matrix(model, ss, abl.MatrixConfig(n_boot=50, progress=False))
    d = res["delta"].astype(np.float64)
    want = (d[:3].mean(0) + d[3]) / 2
    np.testing.assert_allclose(res["delta_mean"], want, rtol=1e-5)
    assert res["delta_n_problems"].max() == 2
    assert res["noop_delta"].shape == (4,) and np.all(res["noop_delta"] < 1e-5)  # issue 12.11: recorded
    ko = abl.run_knockout(
        model, ss, res["delta_mean"], abl.KnockoutConfig(ks=[1], random_seeds=1, n_boot=50, progress=False)
    )
    assert "over problems" in ko["ci"] and ko["n_problems"] == 2
    ce = np.array(ko["top"][0]["per_sample_ce"])
    assert ko["top"][0]["mean_ce"] == pytest.approx((ce[:3].mean() + ce[3]) / 2)


def test_knockout_is_ranked_on_scoring_problems_and_reported_on_held_out_ones():
    """Issue 12.8: the ranking (and greedy choice) come from the scoring problems, the curves are on held-out ones;
    in-sample curves say so."""
    model = make_tiny("llama")
    ss = tiny_set(((14, 6), (15, 6), (16, 6), (17, 7)))
    res = abl.run_matrix(model, ss, abl.MatrixConfig(n_boot=20, progress=False))
    held, scoring, dm, label = abl.knockout_split(ss, res["delta"], 0.5, 0)
    assert not set(held.problem_ids) & set(scoring.problem_ids) and len(held) == len(scoring) == 2
    rows = [i for i, p in enumerate(ss.problem_ids) if p in scoring.problem_ids]
    np.testing.assert_allclose(dm, np.nanmean(res["delta"][rows].astype(np.float64), 0), rtol=1e-5)
    ko = abl.run_knockout(
        model,
        held,
        dm,
        abl.KnockoutConfig(ks=[1, 2], random_seeds=2, greedy=True, greedy_candidates=3, n_boot=20, progress=False),
        select_on=scoring,
        selection=label,
    )
    assert ko["selection"].startswith("held-out") and ko["greedy"]["selection"] == label
    assert ko["curve_problems"] == sorted(set(held.problem_ids))
    assert all(len(p["per_sample_ce"]) == 2 for p in ko["top"] + ko["greedy"]["curve"])
    for p in ko["greedy"]["curve"]:  # reported on the held-out samples
        assert p["per_sample_ce"] == pytest.approx(
            [direct_ce(model, s, [tuple(h) for h in p["heads"]]) for s in held.samples], abs=TOL
        )
    assert abl.knockout_split(ss, res["delta"], 0, 0)[3].startswith("in-sample")
    assert abl.KnockoutConfig().random_seeds >= 10 and abl.KnockoutConfig().heldout == 0.25
