"""The head-set engine: exact batched losses of head sets equal a full forward of a weight-surgery copy (full
logits) on tiny models of every architecture and the mixed-head model, for random single- and multi-layer sets,
zero and mean ablation; batching, attention reuse and the cache change nothing; masks <-> head lists."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ARCH_NAMES, KERNELS, make_mixed, make_tiny
from test_ablation import direct_ce, tiny_set

from btp import headsets as hs
from btp.arch import adapter

TOL = 1e-5
MODELS = {
    **{a: (lambda attn="eager", a=a: make_tiny(a, attn=attn)) for a in ARCH_NAMES},
    "mixed": lambda attn="eager": make_mixed(attn=attn),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def random_sets(model, n: int, seed: int = 0) -> list[list[tuple[int, int]]]:
    """The empty set, single heads, and random sets of 2..6 heads over any layers (multi-layer most of the time)."""
    heads = adapter(model).all_heads()
    rng = np.random.default_rng(seed)
    out = [[], [heads[-1]], [heads[0]]]
    while len(out) < n:
        k = int(rng.integers(2, 7))
        out.append([heads[i] for i in sorted(rng.choice(len(heads), k, replace=False))])
    return out


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("attn", KERNELS)
def test_set_losses_equal_direct_surgery(name, attn):
    model = MODELS[name](attn)
    ss = tiny_set()
    sets = random_sets(model, 8, seed=len(name))
    assert any(len({l for l, _ in s}) > 1 for s in sets)
    res = hs.set_losses(model, ss, sets, batch_rows=3)
    ce, base = res  # unpacks as the tuple ablation used
    assert ce.shape == (len(sets), len(ss)) and base.shape == (len(ss),) and ce.dtype == np.float64
    for s, sample in enumerate(ss.samples):
        assert base[s] == pytest.approx(direct_ce(model, sample), abs=TOL)
        for i, heads in enumerate(sets):
            assert ce[i, s] == pytest.approx(direct_ce(model, sample, heads), abs=TOL), (heads, s)
    np.testing.assert_array_equal(ce[0], base)  # empty set: the base pass itself
    np.testing.assert_array_equal(res.delta, ce - base)
    assert np.abs(res.delta[1:]).max() > 1e-3  # removals do something


@pytest.mark.parametrize("name", ["llama", "gemma2", "mixed"])
def test_mean_replacement_equals_direct(name):
    model = MODELS[name]()
    ss = tiny_set()
    rep = hs.mean_o_proj_inputs(model, ss)
    ad = adapter(model)
    assert rep.shape == (ad.n_layers, ad.max_heads, ad.heads[0].head_dim) and rep.dtype == torch.float32
    sets = random_sets(model, 5, seed=7)
    ce, _ = hs.set_losses(model, ss, sets, replacement=rep)
    zero, _ = hs.set_losses(model, ss, sets)
    for s, sample in enumerate(ss.samples):
        for i, heads in enumerate(sets):
            assert ce[i, s] == pytest.approx(direct_ce(model, sample, heads, rep), abs=TOL)
    assert np.abs(ce[1:] - zero[1:]).max() > 1e-4


@pytest.mark.parametrize("name", ["llama", "gemma2", "qwen3", "mixed"])
@pytest.mark.parametrize("attn", KERNELS)
def test_batching_and_attention_reuse_change_nothing(name, attn):
    model = MODELS[name](attn)
    ss = tiny_set()
    sets = random_sets(model, 9, seed=3)
    one = hs.set_losses(model, ss, sets, batch_rows=1)
    many = hs.set_losses(model, ss, sets, batch_rows=16)
    auto = hs.set_losses(model, ss, sets)
    fresh = hs.set_losses(model, ss, sets, batch_rows=4, reuse_attention=False)
    np.testing.assert_array_equal(one.base, many.base)
    for other in (many, auto, fresh):
        np.testing.assert_allclose(other.ce, one.ce, atol=1e-6, rtol=0)


def test_scorer_groups_by_lowest_layer():
    """Sets run from their own lowest layer: only the recorded start layers may be asked for."""
    model = make_tiny("llama")
    sample = tiny_set().samples[1]
    run = hs.HeadSetScorer(model, sample, [1, 2], batch_rows=2)
    assert run.base.shape == (sample.n_scored,) and run.base.dtype == torch.float32
    sets = [[(2, 0)], [(1, 3), (2, 1)], [], [(1, 0)], [(2, 3), (1, 2)]]
    got = run.ce(sets)
    assert got.shape == (5, sample.n_scored)
    torch.testing.assert_close(got[2], run.base, atol=0, rtol=0)
    for i, heads in enumerate(sets):
        assert got[i].double().mean().item() == pytest.approx(direct_ce(model, sample, heads), abs=TOL)
    with pytest.raises(KeyError, match="layer 0 was not recorded"):
        run.ce([[(0, 1), (2, 2)]])
    assert hs.lowest_layer([(2, 1), (1, 3)]) == 1 and hs.lowest_layer([]) is None


def test_keep_masks_and_head_lists():
    model = make_mixed()
    ad = adapter(model)
    full = hs.keep_mask(model)
    assert full.shape == (3, 4) and full.sum() == ad.n_heads_total and not full[1, 2:].any()
    removed = [(0, 1), (1, 1), (2, 0), (2, 3)]
    m = hs.keep_mask(ad, removed)
    assert hs.removed_heads(model, m) == removed
    assert hs.removed_heads(model, full) == []
    # padding entries of a mask are ignored either way; tensors work too
    m2 = m.copy()
    m2[1, 2:] = True
    assert hs.removed_heads(model, torch.as_tensor(m2)) == removed
    pop = np.stack([full, m, ~full])
    sets = hs.removed_sets(model, pop)
    assert sets[0] == [] and sets[1] == removed and sets[2] == ad.all_heads()
    with pytest.raises(ValueError, match="keep-mask must be"):
        hs.removed_heads(model, full[:2])
    with pytest.raises(IndexError, match="does not exist"):
        hs.keep_mask(model, [(1, 3)])


def test_masks_drive_set_losses():
    """A CMA-ES-like population of keep-masks, one candidate per row, equals the head lists' losses."""
    model = make_tiny("qwen2")
    ss = tiny_set()
    rng = np.random.default_rng(5)
    pop = rng.random((6, 3, 4)) > 0.3
    pop[0] = True
    sets = hs.removed_sets(model, pop)
    res = hs.set_losses(model, ss, sets)
    np.testing.assert_array_equal(res.ce[0], res.base)
    for i, heads in enumerate(sets):
        for s, sample in enumerate(ss.samples):
            assert res.ce[i, s] == pytest.approx(direct_ce(model, sample, heads), abs=TOL)


def test_cache_runs_only_new_sets(monkeypatch):
    model = make_tiny("gemma2")
    ss = tiny_set()
    sets = random_sets(model, 6, seed=11)
    want = hs.set_losses(model, ss, sets)
    calls = []
    orig = hs.set_losses
    monkeypatch.setattr(hs, "set_losses", lambda m, s, sets, **kw: calls.append(len(sets)) or orig(m, s, sets, **kw))
    cache = hs.SetLossCache(model, ss, max_sets=6)
    got = cache(sets + [list(reversed(sets[3]))])  # a repeat, in another order: one key
    assert calls == [6] and len(cache) == 6 and cache.misses == 6 and cache.hits == 1
    np.testing.assert_allclose(got.ce[:6], want.ce, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(got.ce[6], got.ce[3])
    np.testing.assert_array_equal(got.base, want.base)
    again = cache(sets[::-1])
    assert calls == [6] and cache.hits == 7
    np.testing.assert_array_equal(again.ce, got.ce[:6][::-1])
    new = [[(0, 0), (2, 2)], [(1, 1)]]
    more = cache(new + sets[:1])
    assert calls == [6, 2] and len(cache) == 6  # least recently used entries dropped
    for i, heads in enumerate(new):
        for s, sample in enumerate(ss.samples):
            assert more.ce[i, s] == pytest.approx(direct_ce(model, sample, heads), abs=TOL)
    assert frozenset(sets[5]) not in cache._ce and frozenset(sets[4]) not in cache._ce
    assert frozenset(sets[0]) in cache._ce and frozenset(sets[1]) in cache._ce


def test_cache_with_mean_replacement():
    model = make_tiny("llama")
    ss = tiny_set()
    rep = hs.mean_o_proj_inputs(model, ss)
    sets = random_sets(model, 4, seed=2)
    cache = hs.SetLossCache(model, ss, replacement=rep, batch_rows=2)
    np.testing.assert_allclose(cache(sets).ce, hs.set_losses(model, ss, sets, replacement=rep).ce, atol=1e-6)
    empty = hs.SetLossCache(model, ss)([])
    assert empty.ce.shape == (0, 2) and empty.base.shape == (2,)


def test_sample_check():
    model = make_tiny("llama")
    bad = tiny_set(specs=((10, 0),))
    with pytest.raises(ValueError, match="scored span"):
        hs.set_losses(model, bad, [[(0, 0)]])
    hs.check_sample(tiny_set().samples[0])


def test_memory_sizing():
    model = make_tiny("llama")
    rows, budget = hs.auto_rows(model, 32)
    assert hs.auto_rows(model, 32).rows == rows
    assert 1 <= rows <= 4096 and budget > 0
    assert hs.auto_rows(model, 4096)[0] <= rows
    assert hs.logits_chunk(model, 1, budget) >= hs.logits_chunk(model, 64, budget) >= 1
    # without eager's [heads, T, T] scores a long sequence fits many more rows
    assert hs.auto_rows(make_tiny("llama", attn="auto"), 4096).rows >= 8 * hs.auto_rows(model, 4096).rows


@pytest.mark.parametrize("name", ["llama", "gemma3", "mixed"])
@pytest.mark.parametrize("attn", KERNELS)
def test_common_start_is_exact(name, attn):
    """All sets resumed at the lowest layer any set touches (one group, full batches) give the same losses."""
    model = MODELS[name](attn)
    ss = tiny_set()
    sets = [[(2, 1)], [(1, 0), (2, 0)], [], [(2, 0), (2, 1)], [(1, 1)]]
    own = hs.set_losses(model, ss, sets, batch_rows=2)
    common = hs.set_losses(model, ss, sets, batch_rows=2, common_start=True)
    np.testing.assert_allclose(common.ce, own.ce, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(common.ce[2], common.base)
    run = hs.HeadSetScorer(model, ss.samples[0], [2], start=2)
    with pytest.raises(ValueError, match="above a set's lowest layer"):
        run.ce([[(1, 0)]])


def test_noop_row_measures_the_batching_noise_floor():
    """Issue 12.11: with `noop_row`, every batched pass carries a row with no head removed; its distance to the base
    pass is recorded, and the other rows are unchanged."""
    from btp.headsets import HeadSetScorer

    model = make_tiny("llama")
    ss = tiny_set()
    sets = [[(l, h)] for l in range(3) for h in range(4)]
    plain = HeadSetScorer(model, ss.samples[0], range(3), batch_rows=3)
    noop = HeadSetScorer(model, ss.samples[0], range(3), batch_rows=3, noop_row=True)
    assert np.isnan(noop.noop_delta)
    np.testing.assert_allclose(noop.ce(sets).numpy(), plain.ce(sets).numpy(), atol=1e-5)
    assert 0 <= noop.noop_delta < 1e-5 and np.isnan(plain.noop_delta)


@pytest.mark.parametrize("name", ["llama", "mixed"])
@pytest.mark.parametrize("attn", KERNELS)
def test_without_the_base_nothing_changes_and_layer_0_needs_no_base_pass(name, attn, monkeypatch):
    """`need_base=False` (CMA-ES populations): the same losses, no base; when every set resumes at layer 0 the
    rows start from the embeddings and no base pass runs (one forward per sample less); the empty set is a row."""
    model = MODELS[name](attn)
    ss = tiny_set()
    sets = [[(0, 1), (2, 0)], [], [(1, 1)], [(0, 0), (1, 0), (2, 1)]]
    want = hs.set_losses(model, ss, sets, batch_rows=2)
    passes = []
    orig = hs.final_hidden
    monkeypatch.setattr(hs, "final_hidden", lambda m, ids: passes.append(ids.shape[0]) or orig(m, ids))
    for common in (True, False):
        passes.clear()
        got = hs.set_losses(model, ss, sets, batch_rows=2, common_start=common, need_base=False)
        assert got.base is None
        np.testing.assert_allclose(got.ce, want.ce, atol=TOL, rtol=0)
        # per sample: two passes of 2 rows (common start at 0) / the base pass for layer 1, then 3 groups
        assert passes == ([2, 2] * len(ss) if common else [1, 2, 1, 1] * len(ss)), passes
    cache = hs.SetLossCache(model, ss, common_start=True, need_base=False)
    np.testing.assert_allclose(cache(sets).ce, want.ce, atol=TOL, rtol=0)
    passes.clear()
    assert cache(sets[:2]).base is None and passes == []  # nothing new: nothing runs
    with pytest.raises(ValueError, match="need_base"):
        hs.HeadSetScorer(model, ss.samples[0], [0], noop_row=True, need_base=False)
