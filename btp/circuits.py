"""Stage: OV/QK circuit comparison of two models of one layout (a base model and its distilled or fine-tuned
variant): does the other model keep or rebuild each attention head's function?

`python -m btp.circuits --base MODEL_A --other MODEL_B [--results-dir results]` (HF ids, folders or the embedded
name) writes `results/circuits/<base-slug>__<other-slug>.csv` (one row per query head), `.npz` (the same as
[L, Hmax] matrices, per-rotary-pair cosines [L, Hmax, rot/2], the importance matrices joined) and `.json`
(provenance of both models, what each number means, summaries, the join with the base model's analyses).

Circuits. Row-vector convention, d_model on the outside: query head h of a layer reads KV head kv(h) (GQA) and
- W_QK[h] = W_Q[h]^T W_K[kv(h)]   (d_model x d_model; score(x_q, x_k) = x_q W_QK x_k^T),
- W_OV[h] = W_V[kv(h)]^T W_O[h]^T (d_model x d_model; a key's contribution to the output is x_k W_OV),
with W_Q[h], W_K[kv], W_V[kv] the [d_head, d_model] row blocks of the HF [out, in] weights and W_O[h]^T the
[d_head, d_model] transpose of o_proj's column block. Both are products L^T R of two [d_head, d_model] factors, so
<L1^T R1, L2^T R2>_F = sum((L1 L2^T) * (R1 R2^T)) needs d_head x d_head products only: no d_model x d_model
matrix is ever built (memory O(d_model x d_head) beyond one layer's weights).

Folding (on by default, as TransformerLens does; fine-tuning changes norm weights too): the input norm's scale
(weight, or weight + 1 for Gemma) multiplies the d_model columns of W_Q, W_K, W_V; Qwen3/Gemma3's per-head q/k
RMSNorm scales multiply the d_head rows of W_Q/W_K (the RMS division is a positive per-token factor, not a
weight). Biases (Qwen2's q/k/v) are their own terms, never dropped: the key-side score term b_q W_K[kv] and the
constant output b_v W_O[h]^T are d_model vectors compared by cosine, and each bias's relative change is reported.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import cli
from .arch import (
    HeadLayout,
    UnsupportedArchitecture,
    WeightSpec,
    config_arch,
    config_head_layout,
    config_rotary_dim,
    text_config,
    weight_spec,
)
from .results import circuits_paths, head_importances
from .store import provenance, read_json, write_json, write_npz, write_text

STAGE = "circuits"


# ---------------------------------------------------------------- output place (moves to btp/results.py at merge)

# ---------------------------------------------------------------- config


@dataclass
class CircuitConfig:
    fold_norms: bool = True  # fold the input norm (and q/k norms) scales into the projections
    null: bool = True  # each base head against the other model's other heads of its layer
    random_baseline: bool = True  # each base head against a random-weight model of the same shapes
    seed: int = 0
    top_k: int = 10  # heads called important in the join with the analyses
    n_boot: int = 2000


class LayoutMismatch(ValueError):
    """The two models' attention layouts differ; the message names the layer and the shapes."""


# ---------------------------------------------------------------- reading weights, tensor by tensor


@dataclass
class LayerWeights:
    """One layer's attention as stored, split per head: every factor is [n, d_head, d_model] (d_head rows,
    d_model columns). `o[h]` is o_proj's column block of head h transposed. Raw (unfolded) values."""

    layout: HeadLayout
    q: torch.Tensor  # [H, dh, dm]
    k: torch.Tensor  # [KV, dh, dm]
    v: torch.Tensor  # [KV, dh, dm]
    o: torch.Tensor  # [H, dh, dm]
    norm: torch.Tensor  # [dm] the input norm's effective scale (offset applied)
    q_norm: torch.Tensor | None = None  # [dh] effective per-head q/k norm scale
    k_norm: torch.Tensor | None = None
    bias: dict[str, torch.Tensor] = field(default_factory=dict)  # q [H, dh], k/v [KV, dh], o [dm]
    shapes: dict[str, tuple] = field(default_factory=dict)  # stored tensor shapes, for layout errors


class WeightReader:
    """A model folder's attention weights, read from its safetensors shards one tensor at a time (the model is never
    instantiated). Architecture facts (key names, norm convention, head layout) come from `btp.arch`."""

    def __init__(self, folder: str | Path, dtype: torch.dtype = torch.float64):
        self.folder = Path(folder)
        cfg_path = self.folder / "config.json"
        if not cfg_path.exists():
            raise FileNotFoundError(f"{self.folder}: no config.json")
        self.config = json.loads(cfg_path.read_text())
        self.arch = config_arch(self.config)
        self.spec: WeightSpec = weight_spec(self.config)
        self.dtype = dtype
        self.files = self._weight_map()
        self.layout = config_head_layout(self.config)
        self.rotary_dim = config_rotary_dim(self.config, self.layout.head_dim)
        self.prefix = self._prefix()
        self.n_layers = int(text_config(self.config)["num_hidden_layers"])

    def _weight_map(self) -> dict[str, Path]:
        from safetensors import safe_open

        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            wm = json.loads(index.read_text())["weight_map"]
            return {k: self.folder / f for k, f in wm.items()}
        shards = sorted(self.folder.glob("*.safetensors"))
        if not shards:
            raise FileNotFoundError(f"{self.folder}: no *.safetensors weights (a .bin-only checkpoint is not read)")
        out: dict[str, Path] = {}
        for s in shards:
            with safe_open(str(s), framework="pt") as f:
                out.update({k: s for k in f.keys()})
        return out

    def _prefix(self) -> str:
        probe = (self.spec.qkv or self.spec.q) + ".weight"
        for p in self.spec.layer_prefixes:
            if p.format(layer=0) + probe in self.files:
                return p
        raise UnsupportedArchitecture(
            f"{self.folder} ({self.arch}): no '{probe}' of layer 0 under any of {list(self.spec.layer_prefixes)}"
        )

    def has(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.files:
            raise KeyError(f"{self.folder}: tensor {name} not in the checkpoint")
        with safe_open(str(self.files[name]), framework="pt") as f:
            return f.get_tensor(name).to(self.dtype)

    def _opt(self, name: str) -> torch.Tensor | None:
        return self.get(name) if self.has(name) else None

    def layer(self, l: int) -> LayerWeights:
        if not 0 <= l < self.n_layers:
            raise IndexError(f"layer {l} out of range ({self.n_layers} layers)")
        p, s, dh = self.prefix.format(layer=l), self.spec, self.layout.head_dim
        shapes: dict[str, tuple] = {}

        def take(rel: str) -> torch.Tensor | None:
            t = self._opt(p + rel)
            if t is not None:
                shapes[rel] = tuple(t.shape)
            return t

        o = take(s.o + ".weight")
        if o is None:
            raise UnsupportedArchitecture(f"{self.folder}: no {p}{s.o}.weight")
        if o.shape[1] % dh:
            raise UnsupportedArchitecture(
                f"{self.arch} layer {l}: o_proj input {o.shape[1]} is not a multiple of head_dim {dh}"
            )
        H = o.shape[1] // dh  # from the weights: right for pruned or mixed layouts too
        if s.qkv:
            w, b = take(s.qkv + ".weight"), take(s.qkv + ".bias")
            kv_rows = (w.shape[0] - H * dh) // 2
            q, k, v = w.split([H * dh, kv_rows, kv_rows])
            bq, bk, bv = b.split([H * dh, kv_rows, kv_rows]) if b is not None else (None, None, None)
        else:
            q, k, v = (take(getattr(s, n) + ".weight") for n in "qkv")
            bq, bk, bv = (take(getattr(s, n) + ".bias") for n in "qkv")
        if k.shape[0] % dh or q.shape[0] != H * dh:
            raise UnsupportedArchitecture(
                f"{self.arch} layer {l}: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                f"o {tuple(o.shape)} do not fit head_dim {dh}"
            )
        KV = k.shape[0] // dh
        if H % KV:
            raise UnsupportedArchitecture(f"{self.arch} layer {l}: {H} query heads, {KV} KV heads")
        dm = q.shape[1]
        off = s.norm_offset
        norm = take(s.input_norm + ".weight")
        if norm is None:
            raise UnsupportedArchitecture(f"{self.folder}: no {p}{s.input_norm}.weight")
        qn = take(s.q_norm + ".weight") if s.q_norm else None
        kn = take(s.k_norm + ".weight") if s.k_norm else None
        bias = {n: t.reshape(m, dh) for n, t, m in (("q", bq, H), ("k", bk, KV), ("v", bv, KV)) if t is not None}
        if (bo := take(s.o + ".bias")) is not None:
            bias["o"] = bo
        return LayerWeights(
            layout=HeadLayout(n_heads=H, n_kv_heads=KV, head_dim=dh),
            q=q.reshape(H, dh, dm),
            k=k.reshape(KV, dh, dm),
            v=v.reshape(KV, dh, dm),
            o=o.t().reshape(H, dh, dm),
            norm=norm + off,
            q_norm=None if qn is None else qn + off,
            k_norm=None if kn is None else kn + off,
            bias=bias,
            shapes=shapes,
        )


def check_layouts(a: WeightReader, b: WeightReader) -> None:
    """Same number of layers and the same head dim (per-layer shapes are checked as layers are read)."""
    if a.n_layers != b.n_layers:
        raise LayoutMismatch(f"{a.n_layers} layers in {a.folder} but {b.n_layers} in {b.folder}")
    if a.layout.head_dim != b.layout.head_dim or a.rotary_dim != b.rotary_dim:
        raise LayoutMismatch(
            f"head_dim/rotary dims {a.layout.head_dim}/{a.rotary_dim} in {a.folder} but "
            f"{b.layout.head_dim}/{b.rotary_dim} in {b.folder}"
        )


def check_layer(l: int, a: LayerWeights, b: LayerWeights, names: tuple[str, str]) -> None:
    if a.shapes != b.shapes:
        diff = [
            f"{k}: {a.shapes.get(k, 'absent')} vs {b.shapes.get(k, 'absent')}"
            for k in sorted(set(a.shapes) | set(b.shapes))
            if a.shapes.get(k) != b.shapes.get(k)
        ]
        raise LayoutMismatch(
            f"layer {l}: the attention layouts of {names[0]} and {names[1]} differ (" + "; ".join(diff) + ")"
        )


# ---------------------------------------------------------------- circuits as factors


@dataclass
class Factors:
    """Folded circuit factors of one layer: W_QK[h] = q[h]^T k[kv(h)], W_OV[h] = v[kv(h)]^T o[h]."""

    layout: HeadLayout
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor

    @property
    def kv_of(self) -> torch.Tensor:
        return torch.arange(self.layout.n_heads) // self.layout.group_size


def factors(w: LayerWeights, fold: bool = True) -> Factors:
    """The circuit factors, with the input norm scale folded into the d_model columns of q/k/v and the q/k norm
    scales into the d_head rows of q/k when `fold`."""
    q, k, v = w.q, w.k, w.v
    if fold:
        g = w.norm[None, None, :]
        q, k, v = q * g, k * g, v * g
        if w.q_norm is not None:
            q = q * w.q_norm[None, :, None]
        if w.k_norm is not None:
            k = k * w.k_norm[None, :, None]
    return Factors(w.layout, q, k, v, w.o)


def _grams(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[n, dh, dh]: a[i] b[i]^T (matched factor pairs). A factor against itself (the norms) goes through numpy, whose
    matmul calls BLAS syrk for x @ x.T: half the flops of a general product (torch has no syrk)."""
    if a is b and a.device.type == "cpu" and not a.requires_grad:
        x = a.numpy()
        return torch.from_numpy(x @ x.transpose(0, 2, 1))
    return torch.bmm(a, b.transpose(1, 2))


def matched_terms(
    L1: torch.Tensor, R1: torch.Tensor, L2: torch.Tensor, R2: torch.Tensor, li: torch.Tensor, ri: torch.Tensor
) -> torch.Tensor:
    """[H, dh, dh] elementwise terms whose sum is <L1[li]^T R1[ri], L2[li]^T R2[ri]>_F per head."""
    return _grams(L1, L2)[li] * _grams(R1, R2)[ri]


def cross_inner(
    L1: torch.Tensor, R1: torch.Tensor, L2: torch.Tensor, R2: torch.Tensor, li: torch.Tensor, ri: torch.Tensor
) -> torch.Tensor:
    """[H, H]: <circuit h of model 1, circuit g of model 2>_F for every pair of query heads of a layer, one base head
    at a time (its d_head x (n d_head) products only, memory O(d_model x d_head))."""
    H = len(li)
    out = torch.empty(H, H, dtype=L1.dtype)
    dh = L1.shape[1]
    L2f, R2f = L2.reshape(-1, L2.shape[2]), R2.reshape(-1, R2.shape[2])
    last_l = last_r = None
    for h in range(H):
        if last_l is None or last_l[0] != int(li[h]):  # GQA: consecutive heads share a KV factor
            last_l = (int(li[h]), (L1[li[h]] @ L2f.T).reshape(dh, -1, dh).transpose(0, 1))
        if last_r is None or last_r[0] != int(ri[h]):
            last_r = (int(ri[h]), (R1[ri[h]] @ R2f.T).reshape(dh, -1, dh).transpose(0, 1))
        out[h] = (last_l[1][li] * last_r[1][ri]).sum((1, 2))
    return out


def pair_index(head_dim: int, rotary_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HF rotate_half pairs: dims (i, i + rot/2) rotate together at frequency i, i < rot/2."""
    a = torch.arange(rotary_dim // 2)
    return a, a + rotary_dim // 2


def pair_static(M: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[H, P]: from the [H, dh, dh] terms M = (L1 L2^T) * (R1 R2^T) of a QK circuit, the static inner product of each
    rotary pair's own form L_i^T R_i (the pair's 2x2 block of M summed)."""
    return M[:, a, a] + M[:, a, b] + M[:, b, a] + M[:, b, b]


def rotation_averaged(GL: torch.Tensor, GR: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[H, P]: E_phi <L1_i^T R(phi) R1_i, L2_i^T R(phi) R2_i>_F for each pair i (phi uniform): with X = GL's and
    Y = GR's 2x2 block of the pair, (tr X tr Y + (X10 - X01)(Y10 - Y01)) / 2."""
    tx = GL[:, a, a] + GL[:, b, b]
    ty = GR[:, a, a] + GR[:, b, b]
    return (tx * ty + (GL[:, b, a] - GL[:, a, b]) * (GR[:, b, a] - GR[:, a, b])) / 2


# ---------------------------------------------------------------- one layer compared


@dataclass
class LayerResult:
    ov_inner: torch.Tensor  # [H] <W_OV1[h], W_OV2[h]>
    ov_n1: torch.Tensor  # [H] ||W_OV1[h]||^2
    ov_n2: torch.Tensor
    qk_inner: torch.Tensor
    qk_n1: torch.Tensor
    qk_n2: torch.Tensor
    pair_inner: torch.Tensor  # [H, P] static per rotary pair
    pair_n1: torch.Tensor
    pair_n2: torch.Tensor
    avg_inner: torch.Tensor  # [H, P] rotation-averaged per pair
    avg_n1: torch.Tensor
    avg_n2: torch.Tensor
    rest_inner: torch.Tensor  # [H] the unrotated dims (partial rotary), static
    rest_n1: torch.Tensor
    rest_n2: torch.Tensor

    @staticmethod
    def cos(inner: torch.Tensor, n1: torch.Tensor, n2: torch.Tensor) -> np.ndarray:
        den = torch.sqrt(n1 * n2)
        return torch.where(den > 0, inner / den, torch.full_like(inner, float("nan"))).numpy()

    @staticmethod
    def rel(inner: torch.Tensor, n1: torch.Tensor, n2: torch.Tensor) -> np.ndarray:
        """||W2 - W1|| / ||W1|| from the Gram form (float64 keeps the cancellation harmless)."""
        d2 = torch.clamp(n1 + n2 - 2 * inner, min=0)
        return torch.where(n1 > 0, torch.sqrt(d2 / n1), torch.full_like(n1, float("nan"))).numpy()

    @property
    def ov_cos(self) -> np.ndarray:
        return self.cos(self.ov_inner, self.ov_n1, self.ov_n2)

    @property
    def qk_cos(self) -> np.ndarray:
        return self.cos(self.qk_inner, self.qk_n1, self.qk_n2)

    @property
    def qk_pos_avg_cos(self) -> np.ndarray:
        """W_QK compared averaged over relative positions: pairs' rotation-averaged terms plus the unrotated dims;
        cross-pair terms average to zero (distinct frequencies, independent uniform phases)."""
        return self.cos(
            self.avg_inner.sum(1) + self.rest_inner,
            self.avg_n1.sum(1) + self.rest_n1,
            self.avg_n2.sum(1) + self.rest_n2,
        )


def compare_factors(f1: Factors, f2: Factors, rotary_dim: int) -> LayerResult:
    """Matched heads of one layer, factored: d_head x d_head products only."""
    kv, hh = f1.kv_of, torch.arange(f1.layout.n_heads)
    dh = f1.layout.head_dim
    a, b = pair_index(dh, rotary_dim)
    rest = torch.arange(rotary_dim, dh)

    def qk(x: Factors, y: Factors) -> tuple[torch.Tensor, ...]:
        GL, GR = _grams(x.q, y.q), _grams(x.k, y.k)[kv]
        M = GL * GR
        return M.sum((1, 2)), pair_static(M, a, b), rotation_averaged(GL, GR, a, b), M[:, rest][:, :, rest].sum((1, 2))

    def ov(x: Factors, y: Factors) -> torch.Tensor:
        return matched_terms(x.v, x.o, y.v, y.o, kv, hh).sum((1, 2))

    i12, i11, i22 = qk(f1, f2), qk(f1, f1), qk(f2, f2)
    return LayerResult(
        ov(f1, f2),
        ov(f1, f1),
        ov(f2, f2),
        i12[0],
        i11[0],
        i22[0],
        i12[1],
        i11[1],
        i22[1],
        i12[2],
        i11[2],
        i22[2],
        i12[3],
        i11[3],
        i22[3],
    )


def null_cosines(f1: Factors, f2: Factors, n1: LayerResult) -> tuple[np.ndarray, np.ndarray]:
    """[H, H] cosines of base head h against every head g of the other model's same layer (diagonal: matched),
    OV and QK; float32 (unrelated heads sit near 0, where float32 is ample)."""
    kv, hh = f1.kv_of, torch.arange(f1.layout.n_heads)
    f = lambda t: t.float()
    ov = cross_inner(f(f1.v), f(f1.o), f(f2.v), f(f2.o), kv, hh).double()
    qk = cross_inner(f(f1.q), f(f1.k), f(f2.q), f(f2.k), hh, kv).double()
    cos = lambda x, a, b: (x / torch.sqrt(a[:, None] * b[None, :])).numpy()
    return cos(ov, n1.ov_n1, n1.ov_n2), cos(qk, n1.qk_n1, n1.qk_n2)


def random_like(w: LayerWeights, gen: torch.Generator) -> LayerWeights:
    """A random-weight layer of the same shapes: Gaussian projections with each stored tensor's std, unit norm
    scales, no biases (a model at initialisation, as far as the circuits see)."""

    def r(t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape, generator=gen, dtype=t.dtype) * t.std()

    return LayerWeights(layout=w.layout, q=r(w.q), k=r(w.k), v=r(w.v), o=r(w.o), norm=torch.ones_like(w.norm))


def bias_terms(w: LayerWeights, f: Factors, fold: bool = True) -> dict[str, torch.Tensor]:
    """Per query head, d_model vectors of the bias terms (folded factors): `qk` the key-side score term
    b_q[h] W_K[kv] (the query-side term x_q W_Q^T b_k and b_q.b_k are constant over keys, so softmax ignores
    them without rotary), `ov` the constant output b_v[kv] W_O[h]^T (attention weights sum to 1)."""
    kv = f.kv_of
    out = {}
    if "q" in w.bias:
        bq = w.bias["q"] * (w.q_norm if fold and w.q_norm is not None else 1)  # q_norm scales b_q too
        out["qk"] = torch.einsum("hd,hdm->hm", bq, f.k[kv])
    if "v" in w.bias:
        out["ov"] = torch.einsum("hd,hdm->hm", w.bias["v"][kv], f.o)
    return out


def _vec_cos(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    den = a.norm(dim=-1) * b.norm(dim=-1)
    return torch.where(den > 0, (a * b).sum(-1) / den, torch.full_like(den, float("nan"))).numpy()


def _rel(a: torch.Tensor, b: torch.Tensor, dims: tuple[int, ...]) -> np.ndarray:
    n = a.square().sum(dims).sqrt()
    return torch.where(n > 0, (b - a).square().sum(dims).sqrt() / n, torch.full_like(n, float("nan"))).numpy()


def materialised(f1: Factors, f2: Factors) -> dict[str, np.ndarray]:
    """The straightforward computation, for tests and the benchmark: build every head's d_model x d_model W_OV and
    W_QK in both models and take the Frobenius cosines of the matched heads (O(d_model^2) memory per head)."""
    kv = f1.kv_of
    out: dict[str, list] = {"ov_cos": [], "qk_cos": []}
    for h in range(f1.layout.n_heads):
        for name, m1, m2 in (
            ("ov", f1.v[kv[h]].T @ f1.o[h], f2.v[kv[h]].T @ f2.o[h]),
            ("qk", f1.q[h].T @ f1.k[kv[h]], f2.q[h].T @ f2.k[kv[h]]),
        ):
            out[f"{name}_cos"].append(float((m1 * m2).sum() / (m1.norm() * m2.norm())))
    return {k: np.array(v) for k, v in out.items()}


# ---------------------------------------------------------------- the comparison

COLUMNS = (
    "layer",
    "head",
    "kv_head",
    "ov_cos",
    "qk_cos",
    "qk_cos_pos_avg",
    "ov_cos_null_mean",
    "ov_cos_null_max",
    "qk_cos_null_mean",
    "qk_cos_null_max",
    "ov_cos_random",
    "qk_cos_random",
    "ov_rel",
    "qk_rel",
    "q_rel",
    "k_rel",
    "v_rel",
    "o_rel",
    "norm_rel",
    "ov_bias_cos",
    "qk_bias_cos",
    "q_bias_rel",
    "k_bias_rel",
    "v_bias_rel",
)


@dataclass
class Comparison:
    rows: list[dict]  # one per query head, COLUMNS
    pair_cos: np.ndarray  # [L, Hmax, P] static per rotary pair
    pair_cos_pos_avg: np.ndarray  # [L, Hmax, P] rotation-averaged per pair
    null_ov: list[np.ndarray]  # per layer [H, H]
    null_qk: list[np.ndarray]
    n_layers: int
    max_heads: int
    biases: list[str]
    seconds: float

    def matrix(self, col: str) -> np.ndarray:
        m = np.full((self.n_layers, self.max_heads), np.nan)
        for r in self.rows:
            m[r["layer"], r["head"]] = r[col]
        return m


def compare(
    base: WeightReader,
    other: WeightReader,
    cfg: CircuitConfig | None = None,
    names: tuple[str, str] = ("base", "other"),
    progress: bool = False,
) -> Comparison:
    """Every query head of every layer, one layer of each model in memory at a time."""
    cfg = cfg or CircuitConfig()
    t0 = time.perf_counter()
    check_layouts(base, other)
    gen = torch.Generator().manual_seed(cfg.seed)
    rows: list[dict] = []
    pairs, pairs_avg, nov, nqk, biases = [], [], [], [], set()
    for l in range(base.n_layers):
        w1, w2 = base.layer(l), other.layer(l)
        check_layer(l, w1, w2, names)
        f1, f2 = factors(w1, cfg.fold_norms), factors(w2, cfg.fold_norms)
        res = compare_factors(f1, f2, base.rotary_dim)
        H, kv = w1.layout.n_heads, f1.kv_of
        pairs.append(LayerResult.cos(res.pair_inner, res.pair_n1, res.pair_n2))
        pairs_avg.append(LayerResult.cos(res.avg_inner, res.avg_n1, res.avg_n2))
        col: dict[str, np.ndarray] = {
            "ov_cos": res.ov_cos,
            "qk_cos": res.qk_cos,
            "qk_cos_pos_avg": res.qk_pos_avg_cos,
            "ov_rel": res.rel(res.ov_inner, res.ov_n1, res.ov_n2),
            "qk_rel": res.rel(res.qk_inner, res.qk_n1, res.qk_n2),
            "q_rel": _rel(w1.q, w2.q, (1, 2)),
            "k_rel": _rel(w1.k, w2.k, (1, 2))[kv],
            "v_rel": _rel(w1.v, w2.v, (1, 2))[kv],
            "o_rel": _rel(w1.o, w2.o, (1, 2)),
            "norm_rel": np.full(H, _rel(w1.norm[None], w2.norm[None], (1,))[0]),
        }
        if cfg.null:
            ov_n, qk_n = null_cosines(f1, f2, res)
            nov.append(ov_n)
            nqk.append(qk_n)
            off = ~np.eye(H, dtype=bool)
            for c, m in (("ov", ov_n), ("qk", qk_n)):
                o = np.where(off, m, np.nan)
                col[f"{c}_cos_null_mean"] = np.nanmean(o, 1) if H > 1 else np.full(H, np.nan)
                col[f"{c}_cos_null_max"] = np.nanmax(o, 1) if H > 1 else np.full(H, np.nan)
        if cfg.random_baseline:
            rnd = compare_factors(f1, factors(random_like(w2, gen), fold=False), base.rotary_dim)
            col["ov_cos_random"], col["qk_cos_random"] = rnd.ov_cos, rnd.qk_cos
        b1, b2 = bias_terms(w1, f1, cfg.fold_norms), bias_terms(w2, f2, cfg.fold_norms)
        for c in b1:
            col[f"{c}_bias_cos"] = _vec_cos(b1[c], b2[c])
        for n, idx in (("q", torch.arange(H)), ("k", kv), ("v", kv)):
            if n in w1.bias:
                biases.add(n)
                col[f"{n}_bias_rel"] = _rel(w1.bias[n], w2.bias[n], (1,))[idx]
        if "o" in w1.bias:
            biases.add("o")
        for h in range(H):
            rows.append(
                {
                    "layer": l,
                    "head": h,
                    "kv_head": int(kv[h]),
                    **{c: float(col[c][h]) if c in col else float("nan") for c in COLUMNS[3:]},
                }
            )
        if progress:
            print(
                f"[btp.circuits] layer {l}: mean ov_cos {np.nanmean(col['ov_cos']):.4f}, "
                f"qk_cos {np.nanmean(col['qk_cos']):.4f}",
                flush=True,
            )
    Hmax = max(r["head"] for r in rows) + 1
    P = base.rotary_dim // 2

    def pad(xs: list[np.ndarray]) -> np.ndarray:
        out = np.full((base.n_layers, Hmax, P), np.nan)
        for l, x in enumerate(xs):
            out[l, : x.shape[0]] = x
        return out

    return Comparison(
        rows, pad(pairs), pad(pairs_avg), nov, nqk, base.n_layers, Hmax, sorted(biases), time.perf_counter() - t0
    )


# ---------------------------------------------------------------- baselines and the join with the analyses


def _finite(x: np.ndarray) -> np.ndarray:
    return x[np.isfinite(x)]


def summary(c: Comparison) -> dict:
    out: dict = {}
    for circ in ("ov", "qk"):
        cos = np.array([r[f"{circ}_cos"] for r in c.rows])
        s: dict = {
            "mean": float(np.nanmean(cos)),
            "median": float(np.nanmedian(cos)),
            "min": float(np.nanmin(cos)),
            "per_layer_mean": np.nanmean(c.matrix(f"{circ}_cos"), 1).tolist(),
        }
        nmax = np.array([r[f"{circ}_cos_null_max"] for r in c.rows])
        if np.isfinite(nmax).any():
            ok = np.isfinite(nmax) & np.isfinite(cos)
            s["null_mean"] = float(np.nanmean([r[f"{circ}_cos_null_mean"] for r in c.rows]))
            s["share_above_null_max"] = float(np.mean(cos[ok] > nmax[ok])) if ok.any() else None
        rnd = _finite(np.array([r[f"{circ}_cos_random"] for r in c.rows]))
        if rnd.size:
            s["random_mean"], s["random_sd"] = float(rnd.mean()), float(rnd.std())
            s["random_abs_max"] = float(np.abs(rnd).max())
        out[circ] = s
    out["qk_pos_avg_mean"] = float(np.nanmean([r["qk_cos_pos_avg"] for r in c.rows]))
    return out


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (many heads sit at cosine 1.0 in near-identical models)."""
    r = np.empty(len(x))
    r[np.argsort(x, kind="stable")] = np.arange(len(x))
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(inv, weights=r) / counts)[inv]


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = _ranks(x), _ranks(y)
    sx, sy = rx.std(), ry.std()
    return float(np.mean((rx - rx.mean()) * (ry - ry.mean())) / (sx * sy)) if sx > 0 and sy > 0 else float("nan")


def importance_join(cos: np.ndarray, importance: np.ndarray, k: int, n_boot: int = 2000, seed: int = 0) -> dict:
    """Is importance preserved? The top-k heads by importance against the rest: difference of mean cosine, with a
    percentile bootstrap CI over heads (top and rest resampled separately, so that no resample lacks a group),
    and the Spearman correlation of importance and cosine with a bootstrap CI (btp.stats)."""
    from .stats import bootstrap_ci

    ok = np.isfinite(cos) & np.isfinite(importance)
    c, imp = cos[ok], importance[ok]
    if c.size < k + 2 or k < 1:
        return {"error": f"{c.size} heads with both values; need more than top_k + 1 = {k + 1}"}
    order = np.argsort(-imp, kind="stable")
    top, rest = c[order[:k]], c[order[k:]]
    rng = np.random.default_rng(seed)
    boots = top[rng.integers(0, k, (n_boot, k))].mean(1) - rest[rng.integers(0, rest.size, (n_boot, rest.size))].mean(1)
    lo, hi = np.quantile(boots, [0.025, 0.975])
    rho = bootstrap_ci(
        np.stack([imp, c], 1),
        stat=lambda v: np.asarray(_spearman(v[:, 0], v[:, 1])),
        n_boot=min(n_boot, 1000),
        seed=seed,
    )
    return {
        "top_k": k,
        "rule": "the top_k heads by largest importance against the rest",
        "n_heads": int(c.size),
        "top_mean": float(top.mean()),
        "rest_mean": float(rest.mean()),
        "diff": float(top.mean() - rest.mean()),
        "ci_low": float(lo),
        "ci_high": float(hi),
        "ci_level": 0.95,
        "n_boot": n_boot,
        "spearman": rho.as_dict(),
    }


def join_analyses(c: Comparison, analyses: Sequence[dict], cfg: CircuitConfig) -> list[dict]:
    out = []
    for a in analyses:
        rec = {k: a[k] for k in ("stage", "dataset", "name", "what")}
        imp = a["importance"]
        if imp.shape != (c.n_layers, c.max_heads):
            rec["error"] = f"importance shape {imp.shape} does not fit [{c.n_layers}, {c.max_heads}]"
        else:
            for circ in ("ov_cos", "qk_cos", "qk_cos_pos_avg"):
                rec[circ] = importance_join(c.matrix(circ).ravel(), imp.ravel(), cfg.top_k, cfg.n_boot, cfg.seed)
        out.append(rec)
    return out


# ---------------------------------------------------------------- what the numbers mean (written into the JSON)

EXPLAIN = {
    "ov_cos": "Frobenius cosine of W_OV[h] = W_V[kv(h)]^T W_O[h]^T (d_model x d_model, what head h writes for what "
    "it reads) between the two models; computed factored, never materialised.",
    "qk_cos": "Frobenius cosine of the static W_QK[h] = W_Q[h]^T W_K[kv(h)]: the bilinear score form with query and "
    "key at the same rotary phase (relative position 0), as TransformerLens compares it. With rotary "
    "embeddings the form at relative offset D is sum_i W_Q,i^T R(theta_i D) W_K,i over frequency pairs i, "
    "so the static cosine also weighs cross-pair terms that rotate away at D != 0.",
    "qk_cos_pos_avg": "cosine of W_QK averaged over relative positions, each pair's phase theta_i D taken uniform "
    "and independent: cross-pair terms vanish and each pair keeps only its rotation-commuting part "
    "(exact for fast pairs over long contexts; the slowest pairs barely rotate within a context).",
    "qk_pair_cos": "npz [L, Hmax, rot/2]: static cosine of each rotary pair's W_QK (q/k dims i and i + rot/2, HF "
    "rotate_half); qk_pair_cos_pos_avg: the same pair averaged over its rotation. Pair i rotates at "
    "theta_i = base^(-2i/rot): low i fast (local position), high i slow (content).",
    "null": "ov/qk_cos_null_mean/max: base head h against the other model's heads g != h of the same layer (the "
    "cosine two functionally unrelated heads of these models reach); npz null_ov/null_qk hold [H, H] per "
    "layer.",
    "random": "ov/qk_cos_random: base head against a random Gaussian model of the same shapes (each tensor's std, "
    "unit norm scales, no biases).",
    "rel": "ov_rel/qk_rel: ||W2 - W1||_F / ||W1||_F of the folded circuits; q/k/v/o_rel: of the raw projection "
    "blocks of the head (k/v: its KV head); norm_rel: the layer's input norm scale.",
    "biases": "ov_bias_cos: cosine of the constant output b_v[kv] W_O[h]^T; qk_bias_cos: of the key-side score term "
    "b_q[h] W_K[kv] (the query-side term and b_q.b_k are constant over keys, so softmax drops them "
    "without rotary); *_bias_rel: relative change of each bias block. NaN: the models have no such bias.",
    "folding": "fold_norms: the input norm scale (Gemma: weight + 1) is folded into the d_model side of W_Q, W_K, "
    "W_V; Qwen3/Gemma3 q_norm/k_norm scales into the d_head side of W_Q/W_K (their RMS division is a "
    "positive per-token factor, left out: the compared form is the score up to that factor).",
    "scaling": "the score scale (1/sqrt(d_head), Gemma's query_pre_attn_scalar) and Gemma2's attention logit "
    "soft-capping act on the bilinear form's value, identically in two models of one layout: the "
    "cosines compare the form before them (a common scale leaves a cosine unchanged; *_rel are of the "
    "unscaled form).",
}


# ---------------------------------------------------------------- models and files


def local_folder(name: str, revision: str | None = None) -> tuple[Path, str, str | None]:
    """(folder, model id, revision) of an embedded name, a folder or an HF id (a local snapshot of config and
    safetensors, downloaded if not cached)."""
    from .models import resolve_model

    ref = resolve_model(name, revision)
    p = Path(ref.path)
    if p.is_dir():
        return p, ref.model_id, ref.revision
    try:  # the real download path needs the hub (or its cache); offline it ends in the error below
        from huggingface_hub import snapshot_download

        pats = ["config.json", "*.safetensors", "*.safetensors.index.json"]
        try:
            d = snapshot_download(ref.path, revision=ref.revision, allow_patterns=pats, local_files_only=True)
        except Exception:  # noqa: BLE001  not cached: download
            d = snapshot_download(ref.path, revision=ref.revision, allow_patterns=pats)
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(
            f"cannot get the weights of {name} from the Hugging Face hub ({type(e).__name__}: {e}); "
            f"offline? download it first (huggingface-cli download {name}) or pass a local folder"
        ) from None
    return Path(d), ref.model_id, ref.revision


def write_csv(path: Path, rows: Sequence[dict], columns: Sequence[str] = COLUMNS) -> Path:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(
            {
                k: (repr(v) if isinstance(v, float) and not math.isnan(v) else ("" if isinstance(v, float) else v))
                for k, v in r.items()
            }
        )
    return write_text(path, buf.getvalue())


def read_csv(path: str | Path) -> list[dict]:
    """Rows of a circuits CSV with ints and floats back (empty cells: NaN)."""
    with open(path, newline="") as f:
        return [
            {
                k: (int(v) if k in ("layer", "head", "kv_head") else float(v) if v else float("nan"))
                for k, v in r.items()
            }
            for r in csv.DictReader(f)
        ]


def run(
    base: str,
    other: str,
    results_dir: str | Path = "results",
    cfg: CircuitConfig | None = None,
    progress: bool = True,
    config: dict | None = None,
) -> dict[str, Path]:
    """Compare two models and write the CSV, npz and JSON; returns their paths."""
    cfg = cfg or CircuitConfig()
    fa, id_a, rev_a = local_folder(base)
    fb, id_b, rev_b = local_folder(other)
    ra, rb = WeightReader(fa), WeightReader(fb)
    c = compare(ra, rb, cfg, names=(base, other), progress=progress)
    paths = circuits_paths(results_dir, id_a, id_b)
    analyses, notes = head_importances(results_dir, id_a)
    joins = join_analyses(c, analyses, cfg)
    if not analyses:
        notes.append(
            "no ablation or Taylor outputs of the base model: run python -m btp.ablation / btp.taylor "
            "on it to join importance with circuit similarity"
        )
    stamp = provenance(
        stage=STAGE,
        model=id_a,
        revision=rev_a,
        seed=cfg.seed,
        config=config or asdict(cfg),
        other_model=id_b,
        other_revision=rev_b,
        base_name=base,
        other_name=other,
        base_arch=ra.arch,
        other_arch=rb.arch,
        seconds=round(c.seconds, 2),
    )
    write_csv(paths["csv"], c.rows)
    arrays = {
        "qk_pair_cos": c.pair_cos,
        "qk_pair_cos_pos_avg": c.pair_cos_pos_avg,
        **{col: c.matrix(col) for col in COLUMNS[3:]},
    }
    for l, (o, q) in enumerate(zip(c.null_ov, c.null_qk)):
        arrays[f"null_ov_{l}"], arrays[f"null_qk_{l}"] = o, q
    for i, a in enumerate(analyses):
        arrays[f"importance_{i}"] = a["importance"]
    write_npz(paths["npz"], provenance=stamp, **arrays)
    layout = {
        "n_layers": c.n_layers,
        "max_heads": c.max_heads,
        "head_dim": ra.layout.head_dim,
        "rotary_dim": ra.rotary_dim,
        "n_kv_heads_config": ra.layout.n_kv_heads,
        "biases": c.biases,
        "q_norm_k_norm": ra.spec.q_norm is not None,
        "norm_offset": ra.spec.norm_offset,
    }
    write_json(
        paths["json"],
        {
            **stamp,
            "layout": layout,
            "explain": EXPLAIN,
            "summary": summary(c),
            "importance": [{**j, "npz_key": f"importance_{i}"} for i, j in enumerate(joins)],
            "notes": notes,
            "files": {k: p.name for k, p in paths.items()},
        },
    )
    return paths


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(
        STAGE,
        "OV/QK circuit similarity of each attention head between a base model and another "
        "(e.g. distilled) model of the same layout",
    )
    p.add_argument("--base", default=None, help="HF id, local folder, or an embedded name (required)")
    p.add_argument("--other", default=None, help="HF id, local folder, or an embedded name (required)")
    p.add_argument("--results-dir", default="results", help="root of the results tree")
    p.add_argument("--no-fold-norms", dest="fold_norms", action="store_false", help="compare unfolded projections")
    p.add_argument("--no-null", dest="null", action="store_false", help="skip the other-heads null distribution")
    p.add_argument("--no-random", dest="random_baseline", action="store_false", help="skip the random-model baseline")
    p.add_argument(
        "--top-k",
        type=int,
        default=10,
        help="top heads by importance in the join with the analyses",
        check=cli.at_least(1),
    )
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples for CIs", check=cli.at_least(1))
    p.add_argument("--seed", type=int, default=0, help="seed of the null draws, the random model and the bootstrap")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--verbose", action="store_true", help=cli.VERBOSE_HELP)
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    p = build_parser()
    args = cli.parse(p, argv)  # --base/--other may come from a --config preset, so they are checked here
    if not args.base or not args.other:
        p.error("--base and --other are required (on the command line or in the --config preset)")
    cfg = CircuitConfig(
        fold_norms=args.fold_norms,
        null=args.null,
        random_baseline=args.random_baseline,
        seed=args.seed,
        top_k=args.top_k,
        n_boot=args.n_boot,
    )
    paths = run(
        args.base, args.other, args.results_dir, cfg, config=cli.config_dict(args), progress=not args.no_progress
    )
    s = read_json(paths["json"])["summary"]
    print(
        f"[btp.circuits] OV cos mean {s['ov']['mean']:.4f} (min {s['ov']['min']:.4f}), QK cos mean "
        f"{s['qk']['mean']:.4f} (min {s['qk']['min']:.4f}); wrote {paths['csv']}, {paths['json'].name}, "
        f"{paths['npz'].name}"
    )
    return paths


if __name__ == "__main__":
    cli.entry("circuits", main)
