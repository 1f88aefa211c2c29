"""Head interventions, all at the input of each layer's output projection (one slice per query head).

Used by ablation, Taylor, CMA-ES and pruning alike. Only this module registers hooks on a model; every
context manager removes exactly the hooks it added, also on exceptions.

- `head_gates`: multiply head h of layer l by gates[b, l, h] (zero = ablate, 1 = keep, any value = scale,
  a tensor with requires_grad = Taylor gate), a different mask per batch row; optional replacement
  vectors for mean ablation.
- `zero_heads_` / `pruned_copy` / `save_pruned`: the same zeroing as weight surgery (o_proj columns).
- `start_at_layer`: resume the forward pass at layer l from a cached residual stream (the prefix of the
  network is not recomputed).
- `fixed_attention`: a layer's attention returns o_proj of a cached o_proj input (its attention is not
  recomputed when only that layer's heads are gated).
- `record`: capture residual streams at layer inputs and o_proj inputs.
- `o_proj_input_grads`: the gradient of a loss w.r.t. each o_proj input, with that input (per-token Taylor).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .arch import Adapter, adapter

Head = tuple[int, int]


def gates_for(
    ad: Adapter,
    ablate: Sequence[Iterable[Head]] | Iterable[Head],
    *,
    batch: int | None = None,
    value: float = 0.0,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> torch.Tensor:
    """Gates [B, L, Hmax] of ones with `value` at the listed heads. `ablate` is one head list (B = batch or 1)
    or a list of head lists, one per batch row. Padding heads of narrower layers stay 1 (they do not exist)."""
    rows = list(ablate)
    per_row = bool(rows) and not (isinstance(rows[0], tuple) and len(rows[0]) == 2 and isinstance(rows[0][0], int))
    if not per_row:
        rows = [rows] * (batch or 1)
    g = torch.ones(len(rows), ad.n_layers, ad.max_heads, dtype=dtype, device=device)
    for b, heads in enumerate(rows):
        for l, h in heads:
            if not (0 <= l < ad.n_layers and 0 <= h < ad.heads[l].n_heads):
                raise IndexError(
                    f"head ({l}, {h}) does not exist (layer {l} has "
                    f"{ad.heads[l].n_heads if 0 <= l < ad.n_layers else 0} heads)"
                )
            g[b, l, h] = value
    return g


@contextmanager
def head_gates(
    model: nn.Module,
    gates: torch.Tensor,
    *,
    replacement: torch.Tensor | None = None,
    layers: Iterable[int] | None = None,
) -> Iterator[None]:
    """Scale each query head's slice of the o_proj input: x[b, :, l, h] *= gates[b, l, h].

    gates: [B or 1, L, Hmax]. With `replacement` [L, Hmax, head_dim] (mean ablation) the slice becomes
    g * x + (1 - g) * replacement. Layers whose gates are all 1 (and need no gradient) are not hooked,
    unless listed in `layers`.
    """
    ad = adapter(model)
    if gates.dim() != 3 or gates.shape[1] != ad.n_layers or gates.shape[2] < ad.max_heads:
        raise ValueError(f"gates must be [B, {ad.n_layers}, {ad.max_heads}], got {tuple(gates.shape)}")
    if layers is None:
        layers = [
            l
            for l in range(ad.n_layers)
            if gates.requires_grad or not bool((gates[:, l, : ad.heads[l].n_heads] == 1).all())
        ]
    handles = []
    try:
        for l in layers:
            handles.append(
                ad.o_projs[l].register_forward_pre_hook(
                    _gate_hook(gates, l, ad.heads[l].n_heads, ad.heads[l].head_dim, replacement)
                )
            )
        yield
    finally:
        for h in handles:
            h.remove()


def _gate_hook(gates: torch.Tensor, l: int, n_heads: int, head_dim: int, replacement: torch.Tensor | None):
    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        shape = x.shape
        xs = x.view(*shape[:-1], n_heads, head_dim)
        # Taylor gates: the product, hence dL/dg (a sum over tokens x head_dim), in the gates' precision or
        # wider, never in a bf16 model's; plain masks keep the model dtype.
        dt = torch.promote_types(gates.dtype, x.dtype) if gates.requires_grad else x.dtype
        g = gates[:, l, :n_heads].to(device=x.device, dtype=dt)
        if g.shape[0] != 1 and g.shape[0] != shape[0]:
            raise ValueError(f"gates batch {g.shape[0]} does not match activations batch {shape[0]}")
        g = g.view(g.shape[0], *([1] * (xs.dim() - 3)), n_heads, 1)
        out = xs.to(dt) * g
        if replacement is not None:
            out = out + (1 - g) * replacement[l, :n_heads].to(device=x.device, dtype=dt)
        return (out.to(x.dtype).reshape(shape), *args[1:])

    return hook


# ---------------------------------------------------------------- weight surgery


@torch.no_grad()
def zero_heads_(model: nn.Module, heads: Iterable[Head]) -> nn.Module:
    """Zero the o_proj input columns of the given heads, in place: equal to gating them to 0."""
    ad = adapter(model)
    for l, h in heads:
        lay = ad.heads[l]
        if not 0 <= h < lay.n_heads:
            raise IndexError(f"head ({l}, {h}) does not exist (layer {l} has {lay.n_heads} heads)")
        ad.o_projs[l].weight[:, h * lay.head_dim : (h + 1) * lay.head_dim] = 0
    return model


def pruned_copy(model: nn.Module, heads: Iterable[Head]) -> nn.Module:
    """A deep copy of the model with the given heads zeroed in its weights."""
    m = copy.deepcopy(model)
    if hasattr(m, "_btp_adapter"):
        object.__delattr__(m, "_btp_adapter")
    return zero_heads_(m, heads)


def save_pruned(
    model: nn.Module, tokenizer, heads: Iterable[Head], out_dir: str | Path, provenance: dict | None = None
) -> Path:
    """Save a pruned copy as a plain HF folder (loadable by vLLM and transformers), with the pruned heads
    and provenance in `btp_pruning.json`. The original model is untouched."""
    heads = sorted({(int(l), int(h)) for l, h in heads})
    out = Path(out_dir)
    pruned = pruned_copy(model, heads)
    pruned.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    from .store import write_json

    write_json(out / "btp_pruning.json", {"pruned_heads": heads, "provenance": provenance or {}})
    del pruned
    return out


# ---------------------------------------------------------------- prefix reuse and capture


@contextmanager
def start_at_layer(model: nn.Module, layer: int, hidden: torch.Tensor) -> Iterator[None]:
    """Within the block, a forward pass skips layers < `layer` and feeds `hidden` ([1 or B, T, d], the residual
    stream at the input of `layer`, e.g. from `record`) into it. Embedding, masks and rotary embeddings are still
    built by the model itself, so every architecture's quirks stay the model's own."""
    ad = adapter(model)
    if not 0 <= layer < ad.n_layers:
        raise IndexError(f"layer {layer} out of range 0..{ad.n_layers - 1}")
    skipped = ad.layers[:layer]

    def identity(hidden_states, *args, **kwargs):
        return hidden_states

    def inject(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        h = hidden.to(device=x.device, dtype=x.dtype).expand(x.shape[0], -1, -1)
        if h.shape != x.shape:
            raise ValueError(f"cached residual {tuple(hidden.shape)} does not fit activations {tuple(x.shape)}")
        if args:
            return (h, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h}

    handle = ad.layers[layer].register_forward_pre_hook(inject, with_kwargs=True)
    try:
        with _forwards_swapped([(m, identity) for m in skipped]):
            yield
    finally:
        handle.remove()


@contextmanager
def _forwards_swapped(swaps: Sequence[tuple[nn.Module, Callable]]) -> Iterator[None]:
    """Shadow each module's forward by an instance attribute, then put back what was there: the class's forward,
    or the wrapper an accelerate device map installed as an instance attribute (deleting it would lose the hook
    that moves inputs and loads offloaded weights)."""
    saved = [(m, m.__dict__.get("forward")) for m, _ in swaps]
    try:
        for m, f in swaps:
            m.forward = f
        yield
    finally:
        for m, old in saved:
            if old is not None:
                m.forward = old
            elif "forward" in m.__dict__:
                del m.forward


@contextmanager
def fixed_attention(model: nn.Module, layer: int, o_proj_input: torch.Tensor) -> Iterator[None]:
    """Within the block, layer `layer`'s attention skips its own computation and returns
    `o_proj(o_proj_input)` ([1 or B, T, heads*head_dim], e.g. from `record`). Exact whenever nothing below the
    layer differs from the run that recorded it (e.g. with `start_at_layer` at the same layer); head gates on
    this layer still apply, since they hook o_proj. Relies on HF attention modules returning
    (attn_output, attn_weights), as every supported architecture does."""
    ad = adapter(model)
    attn, o_proj = ad.attns[layer], ad.o_projs[layer]

    def forward(*args, **kwargs):
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        inp = o_proj_input.to(device=x.device, dtype=x.dtype)
        if inp.dim() != 3 or inp.shape[0] not in (1, x.shape[0]) or inp.shape[1] != x.shape[1]:
            raise ValueError(
                f"cached o_proj input {tuple(o_proj_input.shape)} does not fit activations {tuple(x.shape)}"
            )
        return o_proj(inp.expand(x.shape[0], -1, -1)), None

    with _forwards_swapped([(attn, forward)]):
        yield


@contextmanager
def record(
    model: nn.Module,
    *,
    layer_inputs: Iterable[int] = (),
    o_proj_inputs: Iterable[int] = (),
    detach: bool = True,
    positions: torch.Tensor | None = None,
) -> Iterator[dict]:
    """Capture activations during forward passes in the block: `out["layer_in", l]` is the residual stream
    entering layer l, `out["o_proj_in", l]` the o_proj input [B, T, heads*head_dim] of layer l. With
    `positions` [P], only those positions are kept ([B, P, ...]): memory grows with P, not with the sequence."""
    ad = adapter(model)
    out: dict = {}
    handles = []

    def keep(key):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            if positions is not None:
                x = x.index_select(1, positions.to(x.device))
            out[key] = x.detach() if detach else x

        return hook

    try:
        for l in layer_inputs:
            handles.append(ad.layers[l].register_forward_pre_hook(keep(("layer_in", l)), with_kwargs=True))
        for l in o_proj_inputs:
            handles.append(ad.o_projs[l].register_forward_pre_hook(keep(("o_proj_in", l)), with_kwargs=True))
        yield out
    finally:
        for h in handles:
            h.remove()


@contextmanager
def o_proj_input_grads(
    model: nn.Module, fn: Callable[[int, torch.Tensor, torch.Tensor], None], layers: Iterable[int] | None = None
) -> Iterator[None]:
    """During backward passes through forwards run in the block, call `fn(l, x, grad)` once per listed layer:
    x [B, T, heads*head_dim] the o_proj input of layer l as o_proj receives it (after the gates of an enclosing
    `head_gates`), detached, and grad = dLoss/dx (same shape, the model's dtype). Per-token Taylor scores
    <grad[t, h], x[t, h]> come from this. Where x needs no gradient (layer 0 of a frozen model) it is made a
    leaf that does: no value and no other gradient changes. Under gradient checkpointing (reentrant or not)
    fn still fires once per backward: only the forward that gradients flow through calls it."""
    ad = adapter(model)
    layers = range(ad.n_layers) if layers is None else list(layers)
    handles = []

    def pre(l: int):
        def hook(module: nn.Module, args: tuple):
            if not torch.is_grad_enabled():  # reentrant checkpointing's first forward, or inference
                return None
            x = args[0]
            if not x.requires_grad:
                x = x.detach().requires_grad_(True)
            xd = x.detach()
            x.register_hook(lambda grad: fn(l, xd, grad))  # returns None: the gradient is not changed
            return (x, *args[1:])

        return hook

    try:
        for l in layers:
            handles.append(ad.o_projs[l].register_forward_pre_hook(pre(l)))
        yield
    finally:
        for h in handles:
            h.remove()


def heads_to_json(heads: Iterable[Head]) -> str:
    return json.dumps(sorted([int(l), int(h)] for l, h in heads))


@contextmanager
def frozen_weights(model: torch.nn.Module) -> Iterator[None]:
    """No weight gradients (only activations or gates are differentiated); restores the flags it turned off."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)
