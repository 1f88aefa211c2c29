"""Head primitives: hook ablation, weight surgery and a manual recomputation agree; per-row masks;
GQA layout; prefix reuse; hook hygiene. On tiny random models of every supported architecture."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import ARCH_NAMES, KERNELS, make_mixed, make_tiny

from btp.arch import UnsupportedArchitecture, adapter
from btp.heads import gates_for, head_gates, pruned_copy, record, start_at_layer

TOL = 1e-5
HEADS = [(0, 1), (1, 0), (2, 3)]


def logits(model, ids):
    return model(input_ids=ids).logits


def manual_ablation(model, ids, heads):
    """Independent route: subtract each head's contribution W[:, slice] @ x[slice] from the o_proj output."""
    ad = adapter(model)
    handles = []
    for l in {l for l, _ in heads}:
        hs = [h for ll, h in heads if ll == l]
        d = ad.heads[l].head_dim

        def post(mod, args, out, hs=hs, d=d):
            x = args[0]
            for h in hs:
                out = out - F.linear(x[..., h * d : (h + 1) * d], mod.weight[:, h * d : (h + 1) * d])
            return out

        handles.append(ad.o_projs[l].register_forward_hook(post))
    try:
        return logits(model, ids)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("arch", ARCH_NAMES)
@pytest.mark.parametrize("attn", KERNELS)
def test_hook_surgery_manual_agree(arch, tiny_ids, attn):
    model = make_tiny(arch, attn=attn)
    ad = adapter(model)
    base = logits(model, tiny_ids)
    with head_gates(model, gates_for(ad, HEADS)):
        hooked = logits(model, tiny_ids)
    surgery = logits(pruned_copy(model, HEADS), tiny_ids)
    manual = manual_ablation(model, tiny_ids, HEADS)
    assert (hooked - base).abs().max() > 1e-3  # the ablation does something
    torch.testing.assert_close(hooked, surgery, atol=TOL, rtol=0)
    torch.testing.assert_close(hooked, manual, atol=TOL, rtol=0)
    torch.testing.assert_close(logits(model, tiny_ids), base, atol=0, rtol=0)  # hooks gone, model untouched


@pytest.mark.parametrize("arch", ARCH_NAMES)
@pytest.mark.parametrize("attn", KERNELS)
def test_per_row_masks_equal_separate_runs(arch, tiny_ids, attn):
    model = make_tiny(arch, attn=attn)
    ad = adapter(model)
    rows = [[(0, 0)], [(1, 2), (2, 1)], [], [(2, 3)]]
    ids = tiny_ids.expand(len(rows), -1)
    with head_gates(model, gates_for(ad, rows)):
        batched = logits(model, ids)
    for b, heads in enumerate(rows):
        with head_gates(model, gates_for(ad, heads)):
            single = logits(model, tiny_ids)
        torch.testing.assert_close(batched[b : b + 1], single, atol=TOL, rtol=0)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_scaling_gate_and_mean_replacement(arch, tiny_ids):
    model = make_tiny(arch)
    ad = adapter(model)
    g = gates_for(ad, [(1, 1)], value=0.25)
    with head_gates(model, g):
        scaled = logits(model, tiny_ids)
    with torch.no_grad():
        m = pruned_copy(model, [])
        d = ad.heads[1].head_dim
        adapter(m).o_projs[1].weight[:, d : 2 * d] *= 0.25
    torch.testing.assert_close(scaled, logits(m, tiny_ids), atol=TOL, rtol=0)
    # mean ablation: replacing a head with a constant vector equals adding W_slice @ v after zeroing it
    rep = torch.zeros(ad.n_layers, ad.max_heads, ad.heads[0].head_dim)
    rep[1, 1] = torch.randn(ad.heads[0].head_dim)
    with head_gates(model, gates_for(ad, [(1, 1)]), replacement=rep):
        meaned = logits(model, tiny_ids)
    m2 = pruned_copy(model, [(1, 1)])
    o = adapter(m2).o_projs[1]
    bias_add = F.linear(rep[1, 1], adapter(model).o_projs[1].weight[:, d : 2 * d])
    if o.bias is None:
        o.bias = torch.nn.Parameter(torch.zeros(o.out_features), requires_grad=False)
    with torch.no_grad():
        o.bias += bias_add
    torch.testing.assert_close(meaned, logits(m2, tiny_ids), atol=TOL, rtol=0)


def test_mixed_head_counts(tiny_ids):
    model = make_mixed()
    ad = adapter(model)
    assert ad.layer_num_heads == [4, 2, 4] and ad.heads[1].n_kv_heads == 1 and ad.max_heads == 4
    heads = [(1, 1), (2, 3)]
    with head_gates(model, gates_for(ad, heads)):
        hooked = logits(model, tiny_ids)
    torch.testing.assert_close(hooked, logits(pruned_copy(model, heads), tiny_ids), atol=TOL, rtol=0)
    torch.testing.assert_close(hooked, manual_ablation(model, tiny_ids, heads), atol=TOL, rtol=0)
    with pytest.raises(IndexError):
        gates_for(ad, [(1, 2)])  # layer 1 has only 2 heads


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2"])
def test_gqa_layout(arch, tiny_ids):
    """Perturbing KV head j's value projection changes exactly the o_proj slices of query heads h with
    h // group_size == j."""
    model = make_tiny(arch)
    ad = adapter(model)
    lay = ad.heads[0]
    attn = ad.attns[0]
    with record(model, o_proj_inputs=[0]) as rec:
        model(input_ids=tiny_ids)
    before = rec["o_proj_in", 0].view(1, -1, lay.n_heads, lay.head_dim).clone()
    v = attn.v_proj if hasattr(attn, "v_proj") else None
    assert v is not None
    j = 1
    with torch.no_grad():
        v.weight[j * lay.head_dim : (j + 1) * lay.head_dim] += 1.0
    with record(model, o_proj_inputs=[0]) as rec:
        model(input_ids=tiny_ids)
    after = rec["o_proj_in", 0].view(1, -1, lay.n_heads, lay.head_dim)
    changed = [(after[..., h, :] - before[..., h, :]).abs().max().item() > 1e-6 for h in range(lay.n_heads)]
    assert changed == [lay.kv_head(h) == j for h in range(lay.n_heads)]


def test_phi3_fused_qkv_layout(tiny_ids):
    model = make_tiny("phi3")
    ad = adapter(model)
    lay = ad.heads[0]
    assert (lay.n_heads, lay.n_kv_heads, lay.head_dim) == (4, 2, 16)


@pytest.mark.parametrize("arch", ARCH_NAMES)
@pytest.mark.parametrize("attn", KERNELS)
def test_start_at_layer_is_exact(arch, tiny_ids, attn):
    model = make_tiny(arch, attn=attn)
    ad = adapter(model)
    full = logits(model, tiny_ids)
    for l in range(ad.n_layers):
        with record(model, layer_inputs=[l]) as rec:
            model(input_ids=tiny_ids)
        cached = rec["layer_in", l]
        with start_at_layer(model, l, cached):
            resumed = logits(model, tiny_ids.expand(2, -1))
        torch.testing.assert_close(resumed, full.expand(2, -1, -1), atol=TOL, rtol=0)
        # with a head of layer l ablated, resuming equals the full ablated run
        with head_gates(model, gates_for(ad, [(l, 0)])):
            abl_full = logits(model, tiny_ids)
            with start_at_layer(model, l, cached):
                abl_resumed = logits(model, tiny_ids)
        torch.testing.assert_close(abl_resumed, abl_full, atol=TOL, rtol=0)
    assert all("forward" not in m.__dict__ for m in ad.layers)


def test_hooks_removed_on_exception_and_others_untouched(tiny_ids):
    model = make_tiny("llama")
    ad = adapter(model)
    calls = []
    user = ad.o_projs[0].register_forward_pre_hook(lambda m, a: calls.append(1))
    n_before = {i: len(o._forward_pre_hooks) for i, o in enumerate(ad.o_projs)}
    with pytest.raises(RuntimeError):
        with head_gates(model, gates_for(ad, [(0, 0), (1, 1)])):
            assert len(ad.o_projs[1]._forward_pre_hooks) == n_before[1] + 1
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        with start_at_layer(model, 2, torch.zeros(1, tiny_ids.shape[1], 64)):
            raise RuntimeError("boom")
    assert {i: len(o._forward_pre_hooks) for i, o in enumerate(ad.o_projs)} == n_before
    assert all(len(layer._forward_pre_hooks) == 0 and "forward" not in layer.__dict__ for layer in ad.layers)
    model(input_ids=tiny_ids)
    assert calls == [1]  # the user's hook survived and still fires
    user.remove()


def test_gate_gradient_flows_in_fp32(tiny_ids):
    model = make_tiny("qwen2")
    ad = adapter(model)
    g = torch.ones(1, ad.n_layers, ad.max_heads, requires_grad=True)
    with head_gates(model, g):
        loss = model(input_ids=tiny_ids, labels=tiny_ids).loss
    loss.backward()
    assert g.grad is not None and g.grad.dtype == torch.float32 and g.grad.abs().sum() > 0


def test_unknown_architecture_error():
    class Weird(torch.nn.Module):
        config = None

    with pytest.raises(UnsupportedArchitecture, match="Weird.*decoder"):
        adapter(Weird())


def test_bad_gates_shape(tiny_ids):
    model = make_tiny("llama")
    with pytest.raises(ValueError, match="gates must be"):
        with head_gates(model, torch.ones(1, 2, 4)):
            pass


def test_start_at_layer_skips_the_prefix(tiny_ids):
    model = make_tiny("llama")
    ad = adapter(model)
    ran = []
    hs = [ad.attns[i].register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i in range(ad.n_layers)]
    with record(model, layer_inputs=[2]) as rec:
        model(input_ids=tiny_ids)
    ran.clear()
    with start_at_layer(model, 2, rec["layer_in", 2]):
        model(input_ids=tiny_ids)
    assert ran == [2]
    for h in hs:
        h.remove()


# ---------------------------------------------------------------- o_proj input gradients (Taylor)


def _direct_input_grad(model, ids, l):
    """Independent route: make only layer l's o_proj input a leaf and differentiate the loss w.r.t. it."""
    ad = adapter(model)
    box = {}

    def pre(mod, args):
        box["x"] = args[0].detach().requires_grad_(True)
        return (box["x"], *args[1:])

    h = ad.o_projs[l].register_forward_pre_hook(pre)
    try:
        loss = model(input_ids=ids, labels=ids).loss
    finally:
        h.remove()
    return box["x"].detach(), torch.autograd.grad(loss, box["x"])[0]


@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("attn", KERNELS)
def test_o_proj_input_grads_equal_direct(mixed, tiny_ids, attn):
    from btp.heads import o_proj_input_grads

    model = make_mixed(attn=attn) if mixed else make_tiny("llama", attn=attn)
    ad = adapter(model)
    got = {}
    with o_proj_input_grads(model, lambda l, x, g: got.setdefault(l, []).append((x, g))):
        model(input_ids=tiny_ids, labels=tiny_ids).loss.backward()
    assert sorted(got) == list(range(ad.n_layers)) and all(len(v) == 1 for v in got.values())  # once each
    for l in range(ad.n_layers):
        x, g = _direct_input_grad(model, tiny_ids, l)
        assert g.abs().max() > 0
        torch.testing.assert_close(got[l][0][0], x, atol=0, rtol=0)
        torch.testing.assert_close(got[l][0][1], g, atol=1e-7, rtol=1e-5)
    assert all(len(o._forward_pre_hooks) == 0 for o in ad.o_projs)
    with torch.no_grad(), o_proj_input_grads(model, lambda *a: got.clear()):
        model(input_ids=tiny_ids)  # no graph: nothing registered, nothing fires
    assert got


def test_gate_gradient_accumulates_in_fp32_for_bf16_models(tiny_ids):
    """dL/dg of a bf16 model is the fp32 sum of bf16 grad * activation, not a bf16 reduction."""
    from btp.heads import o_proj_input_grads

    model = make_tiny("llama").to(torch.bfloat16)
    ad = adapter(model)
    g = torch.ones(1, ad.n_layers, ad.max_heads, requires_grad=True)
    dots = torch.zeros(ad.n_layers, ad.max_heads)

    def on(l, x, grad):
        dots[l] = (grad.float() * x.float()).view(*x.shape[:-1], 4, 16).sum((0, 1, 3))

    with head_gates(model, g), o_proj_input_grads(model, on):
        model(input_ids=tiny_ids, labels=tiny_ids).loss.float().backward()
    assert g.grad.dtype == torch.float32 and dots.abs().min() > 0
    torch.testing.assert_close(g.grad[0], dots, atol=1e-6, rtol=1e-4)


def test_record_keeps_only_the_asked_positions(tiny_ids):
    """`positions` keeps [B, P, ...] as activations pass: the same values as the full record, indexed."""
    model = make_tiny("llama", attn="auto")
    pos = torch.tensor([0, 5, 11])
    with torch.no_grad(), record(model, layer_inputs=[1, 2], o_proj_inputs=[0]) as full:
        model(tiny_ids)
    with torch.no_grad(), record(model, layer_inputs=[1, 2], o_proj_inputs=[0], positions=pos) as some:
        model(tiny_ids)
    assert some.keys() == full.keys()
    for k in full:
        assert some[k].shape[1] == 3 and torch.equal(some[k], full[k][:, pos])
