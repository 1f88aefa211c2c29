"""Taylor head pruning: gate gradients against finite differences, the per-token variant against its direct formula,
checkpointing and device maps change nothing, held-out losses equal weight surgery, no duplicated forwards,
resume after a kill equals an uninterrupted run; a slow end-to-end run of `main` on the embedded model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import KERNELS, make_mixed, make_tiny

from btp.arch import adapter
from btp.heads import pruned_copy
from btp.samples import Sample, SampleConfig, SampleSet
from btp.scoring import scored_ce
from btp.store import JsonlStore, read_jsonl, read_npz
from btp.taylor import (
    TaylorConfig,
    alive_mask,
    check_history,
    choose_pruned,
    importance_matrix,
    run_taylor,
    sample_scores,
    score_heads,
)


def make_samples(n: int = 6, seed: int = 3, vocab: int = 128) -> SampleSet:
    g = np.random.default_rng(seed)
    out = []
    for i in range(n):
        T = int(g.integers(14, 22))
        start = int(g.integers(5, 9))
        out.append(Sample(f"P/{i}", 0, g.integers(1, vocab, T).astype(np.int64), start, T - int(g.integers(0, 3))))
    return SampleSet(out, SampleConfig(), "tiny", "tiny-model")


def loss_of(model, s: Sample) -> float:
    """Independent loss: full logits from the model's own forward, CE in the model's precision (or fp32)."""
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(s.input_ids)[None]).logits[0, s.positions]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return float(torch.nn.functional.cross_entropy(logits, torch.as_tensor(s.targets)))


@pytest.fixture
def exact_fp64(monkeypatch):
    """HF computes RMSNorm and attention softmax in fp32 even in an fp64 model; that rounding (~1e-8 in the
    loss) swamps a finite difference at eps 1e-3. Keep fp64 through them for the duration of a test."""
    from transformers.models.llama import modeling_llama
    from transformers.models.qwen2 import modeling_qwen2

    def norm(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    for cls in (modeling_llama.LlamaRMSNorm, modeling_qwen2.Qwen2RMSNorm):
        monkeypatch.setattr(cls, "forward", norm)
    softmax = torch.nn.functional.softmax
    monkeypatch.setattr(
        torch.nn.functional,
        "softmax",
        lambda x, dim=None, dtype=None, **kw: softmax(
            x, dim=dim, dtype=None if x.dtype == torch.float64 else dtype, **kw
        ),
    )


@pytest.mark.parametrize("which", ["llama", "qwen2", "mixed"])
@pytest.mark.parametrize("attn", KERNELS)
def test_gate_gradient_equals_finite_difference(which, exact_fp64, attn):
    """dL/dm_lh against (L(scale 1+eps) - L(scale 1-eps)) / 2eps, eps = 1e-3, the head scaled by weight
    surgery, for every alive head (fp64 model)."""
    model = (make_mixed(attn=attn) if which == "mixed" else make_tiny(which, attn=attn)).double()
    ad = adapter(model)
    s = make_samples(1).samples[0]
    pruned = [(0, 1)]
    loss, grad = sample_scores(model, s, pruned)
    assert loss == pytest.approx(loss_of(pruned_copy(model, pruned), s), abs=1e-6)  # scoring CE is fp32
    eps = 1e-3
    for l, h in ad.all_heads():
        if (l, h) in pruned:
            continue
        d = ad.heads[l].head_dim
        vals = []
        for sign in (1, -1):
            m = pruned_copy(model, pruned)
            with torch.no_grad():
                adapter(m).o_projs[l].weight[:, h * d : (h + 1) * d] *= 1 + sign * eps
            vals.append(loss_of(m, s))
        fd = (vals[0] - vals[1]) / (2 * eps)
        assert grad[l, h] == pytest.approx(fd, rel=2e-5, abs=1e-9), (l, h)
    assert np.abs(grad).max() > 1e-3


def _direct_token_scores(model, s: Sample, pruned) -> np.ndarray:
    """The formula itself: for each layer l, make only l's o_proj input a leaf, take dL/da, and sum over
    positions t of |<dL/da_t,h, a_t,h>|; pruned heads zeroed by weight surgery."""
    m = pruned_copy(model, pruned)
    ad = adapter(m)
    out = np.zeros((ad.n_layers, ad.max_heads))
    for l in range(ad.n_layers):
        box = {}

        def pre(mod, args):  # used within this iteration only
            box["a"] = args[0].detach().requires_grad_(True)  # noqa: B023
            return (box["a"], *args[1:])  # noqa: B023

        hk = ad.o_projs[l].register_forward_pre_hook(pre)
        try:
            loss = scored_ce(
                m, torch.as_tensor(s.input_ids), torch.as_tensor(s.positions), torch.as_tensor(s.targets)
            ).mean()
        finally:
            hk.remove()
        a = box["a"]
        (g,) = torch.autograd.grad(loss, a)
        lay = ad.heads[l]
        dots = (g * a.detach()).view(-1, lay.n_heads, lay.head_dim).sum(-1)  # [T, H]
        out[l, : lay.n_heads] = dots.abs().sum(0).numpy()
    return out


@pytest.mark.parametrize("which", ["llama", "qwen3", "mixed"])
@pytest.mark.parametrize("attn", KERNELS)
def test_token_variant_equals_direct_formula(which, attn):
    model = (make_mixed(attn=attn) if which == "mixed" else make_tiny(which, attn=attn)).double()
    ad = adapter(model)
    s = make_samples(1, seed=5).samples[0]
    pruned = [(1, 0), (2, 3)]
    loss, tok = sample_scores(model, s, pruned, "token")
    direct = _direct_token_scores(model, s, pruned)
    alive = alive_mask(ad, pruned)  # every alive head (not the padding of the mixed model's layer 1)
    np.testing.assert_allclose(tok[alive], direct[alive], rtol=1e-9, atol=1e-12)
    # |sum_t| <= sum_t |.|: the gate gradient is the signed per-token sum, and here strictly smaller somewhere
    _, gate = sample_scores(model, s, pruned, "gate")
    assert (np.abs(gate[alive]) <= tok[alive] + 1e-12).all() and (np.abs(gate[alive]) < tok[alive] - 1e-6).any()
    assert loss == pytest.approx(loss_of(pruned_copy(model, pruned), s), abs=1e-6)  # scoring CE is fp32


def test_signed_normalized_and_choice():
    model = make_tiny("llama")
    ss = make_samples(3)
    pruned = [(0, 0)]
    grads = [sample_scores(model, s, pruned)[1] for s in ss.samples]
    signed, _, _ = score_heads(model, ss.samples, pruned, TaylorConfig(signed=True, normalize=False))
    absd, raw, _ = score_heads(model, ss.samples, pruned, TaylorConfig(normalize=True))
    np.testing.assert_allclose(signed[0, 1:], -sum(grads)[0, 1:], rtol=1e-6)
    np.testing.assert_allclose(raw[1:], sum(np.abs(g) for g in grads)[1:], rtol=1e-6)
    assert np.isnan(signed[0, 0]) and np.isnan(absd[0, 0]) and np.isnan(raw[0, 0])
    np.testing.assert_allclose(np.sqrt(np.nansum(absd**2, axis=1)), 1.0, rtol=1e-6)
    # choose: lowest first, ties by position, min heads per layer respected
    scores = np.array([[0.1, 0.2, np.nan], [0.05, 0.3, 0.0], [5.0, np.nan, np.nan]])
    alive = ~np.isnan(scores)
    assert choose_pruned(scores, alive, 3, 1) == [(1, 2), (1, 0), (0, 0)]
    assert choose_pruned(scores, alive, 10, 1) == [(1, 2), (1, 0), (0, 0)]  # layer 2 keeps its only head
    assert choose_pruned(scores, alive, 10, 0) == [(1, 2), (1, 0), (0, 0), (0, 1), (1, 1), (2, 0)]
    with pytest.raises(ValueError, match="signed"):
        TaylorConfig(estimator="token", signed=True)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("attn", KERNELS)
def test_gradient_checkpointing_gives_the_same_scores(reentrant, attn):
    """HF skips checkpointing in eval mode; Taylor turns it on for the layers alone. Scores are unchanged and
    the layers really are recomputed."""
    model = make_tiny("llama", attn=attn)
    ad = adapter(model)
    s = make_samples(1).samples[0]
    pruned = [(1, 2)]
    ref = {e: sample_scores(model, s, pruned, e) for e in ("gate", "token")}
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    calls = []
    hooks = [a.register_forward_hook(lambda *_: calls.append(1)) for a in ad.attns]
    try:
        for e in ("gate", "token"):
            calls.clear()
            loss, sc = sample_scores(model, s, pruned, e)
            assert len(calls) == 2 * ad.n_layers  # forward + recomputation in backward
            assert loss == pytest.approx(ref[e][0], abs=1e-6)
            np.testing.assert_allclose(sc, ref[e][1], rtol=1e-5, atol=1e-8)
    finally:
        for h in hooks:
            h.remove()
    assert not model.training and not any(m.training for m in model.modules())
    calls.clear()


def test_device_map_with_offloaded_layer(tmp_path):
    """An accelerate-dispatched model (device_map with one layer offloaded to disk) scores like the plain one."""
    from transformers import AutoModelForCausalLM

    model = make_tiny("llama")
    model.save_pretrained(tmp_path / "m")
    dm = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.layers.2": "cpu",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    m2 = (
        AutoModelForCausalLM.from_pretrained(
            tmp_path / "m", device_map=dm, offload_folder=str(tmp_path / "off"), attn_implementation="eager"
        )
        .eval()
        .requires_grad_(False)
    )
    assert hasattr(adapter(m2).o_projs[1], "_hf_hook")
    s = make_samples(1).samples[0]
    for e in ("gate", "token"):
        a, b = sample_scores(model, s, [(0, 1)], e), sample_scores(m2, s, [(0, 1)], e)
        assert a[0] == pytest.approx(b[0], abs=1e-6)
        np.testing.assert_allclose(a[1], b[1], rtol=1e-5, atol=1e-8)


CFG = dict(prune_per_iter=2, min_heads_per_layer=1)


def test_run_losses_equal_weight_surgery_and_no_duplicated_forwards():
    model = make_tiny("qwen2")
    ad = adapter(model)
    scoring, heldout = make_samples(6).split(2, seed=0)
    S, H, N = len(scoring), len(heldout), 3
    forwards = []
    hk = ad.base.register_forward_hook(lambda *_: forwards.append(1))
    try:
        hist = run_taylor(model, scoring, heldout, TaylorConfig(num_iters=N, **CFG))
    finally:
        hk.remove()
    assert len(forwards) == H + N * (S + H)  # base held-out once; per iteration one pass per sample
    assert [r["iteration"] for r in hist] == [1, 2, 3] and [r["n_alive_after"] for r in hist] == [10, 8, 6]
    base = [loss_of(model, s) for s in heldout.samples]
    assert hist[0]["base_heldout_loss"] == pytest.approx(np.mean(base), abs=1e-6)
    for i, r in enumerate(hist):
        surgery = pruned_copy(model, [tuple(p) for p in r["pruned_total"]])
        np.testing.assert_allclose(r["heldout_losses_after"], [loss_of(surgery, s) for s in heldout.samples], atol=1e-5)
        before = pruned_copy(model, [tuple(p) for p in r["pruned_before"]])
        np.testing.assert_allclose(r["scoring_losses_before"], [loss_of(before, s) for s in scoring.samples], atol=1e-5)
        if i:  # the scoring pass of iteration i+1 gives the scoring loss after iteration i's pruning
            assert r["pruned_before"] == hist[i - 1]["pruned_total"]
        imp = importance_matrix(r)
        assert imp.shape == (ad.n_layers, ad.max_heads)
        assert np.isnan(imp).sum() == len(r["pruned_before"])
        lowest = sorted(zip(imp[~np.isnan(imp)], map(tuple, np.argwhere(~np.isnan(imp)))))[:2]
        assert sorted(r["pruned"]) == sorted([list(map(int, lh)) for _, lh in lowest])


def test_stop_factor_and_nothing_prunable():
    model = make_tiny("llama")
    scoring, heldout = make_samples(4).split(1, seed=0)
    hist = run_taylor(model, scoring, heldout, TaylorConfig(num_iters=5, stop_factor=1e-3, **CFG))
    assert len(hist) == 1 and hist[0]["stop_reason"] == "stop_factor"
    assert (
        run_taylor(model, scoring, heldout, TaylorConfig(num_iters=5, stop_factor=1e-3, **CFG), history=hist) == hist
    )  # a stopped history stays stopped
    hist = run_taylor(model, scoring, heldout, TaylorConfig(num_iters=9, prune_per_iter=4, min_heads_per_layer=2))
    assert [r["n_alive_after"] for r in hist] == [8, 6] and hist[-1]["stop_reason"] == "no_prunable_heads"
    assert hist[-1]["alive_per_layer"] == [2, 2, 2]


def test_resume_after_kill_equals_uninterrupted(tmp_path):
    model = make_tiny("llama")
    scoring, heldout = make_samples(6).split(2, seed=1)
    cfg4 = TaylorConfig(num_iters=4, estimator="token", normalize=True, **CFG)
    full = run_taylor(model, scoring, heldout, cfg4)
    store = JsonlStore(tmp_path / "t.jsonl", key_fields=("iteration",))
    run_taylor(
        model,
        scoring,
        heldout,
        TaylorConfig(num_iters=2, estimator="token", normalize=True, **CFG),
        on_record=store.append,
    )
    with open(store.path, "a") as f:  # the kill tore the third record
        f.write('{"iteration": 3, "importance": [[0.1, ')
    store = JsonlStore(store.path, key_fields=("iteration",))  # a new process after the kill
    with pytest.warns(UserWarning, match="torn"):
        done = store.read()
    assert [r["iteration"] for r in done] == [1, 2]
    with pytest.warns(UserWarning, match="torn"):
        run_taylor(model, scoring, heldout, cfg4, history=done, on_record=store.append)
    resumed = store.read()
    assert len(resumed) == len(full) == 4
    for a, b in zip(resumed, full):
        assert a["pruned"] == b["pruned"] and a["pruned_total"] == b["pruned_total"]
        np.testing.assert_allclose(importance_matrix(a), importance_matrix(b), rtol=1e-9)
        np.testing.assert_allclose(
            importance_matrix(a, "importance_raw"), importance_matrix(b, "importance_raw"), rtol=1e-9
        )
        for k in ("scoring_losses_before", "heldout_losses_after", "base_heldout_loss", "base_scoring_loss"):
            np.testing.assert_allclose(a[k], b[k], rtol=1e-9)
    # the same file cannot be continued with other settings or samples
    with pytest.raises(ValueError, match="t.jsonl:1.*settings"):
        check_history(
            resumed,
            TaylorConfig(num_iters=4, **CFG),
            adapter(model),
            scoring.samples,
            heldout.samples,
            where=str(store.path),
        )
    with pytest.raises(ValueError, match="other scoring"):
        run_taylor(model, heldout, scoring, cfg4, history=resumed)


@pytest.mark.slow
def test_main_on_embedded_model(tmp_path):
    from btp.taylor import main

    argv = ["--source", "reference", "--num-samples", "4", "--num-iters", "2", "--results-dir", str(tmp_path)]
    hist = main(argv)
    files = list(tmp_path.rglob("taylor/*.jsonl"))
    assert [f.name for f in files] == ["regular-reference.jsonl"]
    recs = read_jsonl(files[0])
    assert [r["iteration"] for r in recs] == [1, 2] and len(hist) == 2
    assert recs[0]["n_alive_after"] == 270 - 27 and recs[1]["n_alive_after"] == 270 - 54
    imp = importance_matrix(recs[1])
    assert imp.shape == (30, 9) and np.isnan(imp).sum() == 27 and (imp[~np.isnan(imp)] > 0).all()
    assert all(np.isfinite(r["heldout_loss_after"]) and r["heldout_loss_after"] > 0 for r in recs)
    assert len(recs[0]["scoring_samples"]) == 3 and len(recs[0]["heldout_samples"]) == 1
    assert recs[0]["provenance"]["model"].startswith("HuggingFaceTB/SmolLM2-135M")
    runs = json.loads(files[0].with_name("regular-reference.runs.json").read_text())
    assert runs[0]["stage"] == "taylor" and runs[0]["samples"]["used"] == 4
    z = read_npz(files[0].with_name("regular-reference.samples.npz"))
    assert z["heldout"].sum() == 1 and len(z["sample_offsets"]) == 5 and z["provenance"]["stage"] == "taylor"
    assert main(argv) == recs  # complete: nothing recomputed, nothing appended
    assert read_jsonl(files[0]) == recs


def test_cli_presets_and_flags():
    from pathlib import Path

    from btp import cli
    from btp.cli import parse_heldout as _heldout_arg
    from btp.taylor import build_parser

    root = Path(__file__).resolve().parent.parent
    a = cli.parse(build_parser(), ["--config", str(root / "configs/taylor_paper.json"), "--num-iters", "3"])
    assert not a.no_normalize and a.estimator == "gate" and a.num_iters == 3 and _heldout_arg(str(a.heldout)) == 0.25
    a = cli.parse(build_parser(), ["--config", str(root / "configs/taylor_smoke.json")])
    assert a.source == "reference" and a.num_samples == 4 and a.num_iters == 2
    assert _heldout_arg("8") == 8 and isinstance(_heldout_arg("8"), int)
    for bad in ("1.5", "x"):
        with pytest.raises(ValueError, match="--heldout"):
            _heldout_arg(bad)


def test_paper_estimator_is_the_default_and_documented():
    """Issue 12.10: the default is the paper's estimator (gate gradient, per-layer L2 normalisation) under the plain
    output name; the docs do not credit the per-token variant to the original code."""
    import btp.taylor as T

    cfg = TaylorConfig()
    assert cfg.estimator == "gate" and cfg.normalize and cfg.variant == ()
    assert TaylorConfig(normalize=False).variant == ("nonorm",)
    a = T.cli.parse(T.build_parser(), [])
    assert T.cli.config_from(TaylorConfig, a).normalize
    assert T.cli.config_from(TaylorConfig, T.cli.parse(T.build_parser(), ["--no-normalize"])).normalize is False
    assert "token` (the original code" not in T.__doc__ and "what the original code computes" in T.__doc__
