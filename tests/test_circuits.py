"""btp.circuits on tiny random models of every architecture (saved as safetensors folders and read tensor by tensor)
and on the embedded SmolLM2 against itself and a copy with a few heads perturbed."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ARCH_NAMES, make_mixed, make_tiny

from btp import circuits as C
from btp.arch import UnsupportedArchitecture

EPS = 1e-9  # "exactly 1" in float64 up to rounding


def save(model: torch.nn.Module, path: Path) -> Path:
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pair_folders(tmp_path_factory):
    """arch -> (folder of seed 0, folder of seed 1)."""
    root = tmp_path_factory.mktemp("tiny")
    return {a: (save(make_tiny(a, 0), root / f"{a}0"), save(make_tiny(a, 1), root / f"{a}1")) for a in ARCH_NAMES}


def changed(c: C.Comparison, col: str, tol: float = EPS) -> set[tuple[int, int]]:
    return {(r["layer"], r["head"]) for r in c.rows if r[col] < 1 - tol}


# ---------------------------------------------------------------- the factored form is the materialised one


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_factored_equals_materialised(arch, pair_folders):
    r1, r2 = (C.WeightReader(p) for p in pair_folders[arch])
    for l in range(r1.n_layers):
        f1, f2 = C.factors(r1.layer(l)), C.factors(r2.layer(l))
        res = C.compare_factors(f1, f2, r1.rotary_dim)
        ref = C.materialised(f1, f2)
        np.testing.assert_allclose(res.ov_cos, ref["ov_cos"], atol=1e-5)
        np.testing.assert_allclose(res.qk_cos, ref["qk_cos"], atol=1e-5)
        # the null matrix: every (h, g) pair against its materialised cosine; its diagonal is the matched cosine
        ov_null, qk_null = C.null_cosines(f1, f2, res)
        np.testing.assert_allclose(np.diag(qk_null), res.qk_cos, atol=1e-5)
        kv = f1.kv_of
        for h, g in ((0, 1), (1, 0), (3, 2)):
            m1, m2 = f1.q[h].T @ f1.k[kv[h]], f2.q[g].T @ f2.k[kv[g]]
            assert abs(qk_null[h, g] - float((m1 * m2).sum() / (m1.norm() * m2.norm()))) < 1e-5
            m1, m2 = f1.v[kv[h]].T @ f1.o[h], f2.v[kv[g]].T @ f2.o[g]
            assert abs(ov_null[h, g] - float((m1 * m2).sum() / (m1.norm() * m2.norm()))) < 1e-5


def _rot(phi: float) -> torch.Tensor:
    c, s = np.cos(phi), np.sin(phi)
    return torch.tensor([[c, -s], [s, c]], dtype=torch.float64)  # HF rotate_half on (x_i, x_{i+rot/2})


def test_rotary_pairs_equal_materialised(pair_folders):
    r1, r2 = (C.WeightReader(p) for p in pair_folders["llama"])
    f1, f2 = C.factors(r1.layer(1)), C.factors(r2.layer(1))
    res = C.compare_factors(f1, f2, r1.rotary_dim)
    a, b = C.pair_index(f1.layout.head_dim, r1.rotary_dim)
    kv = f1.kv_of
    for h in range(f1.layout.n_heads):
        for i in range(len(a)):
            p = [int(a[i]), int(b[i])]
            L1, R1, L2, R2 = f1.q[h][p], f1.k[kv[h]][p], f2.q[h][p], f2.k[kv[h]][p]
            m1, m2 = L1.T @ R1, L2.T @ R2
            assert abs(res.pair_inner[h, i] - (m1 * m2).sum()) < 1e-8 * (m1.norm() * m2.norm())
            # averaged over the relative rotation: 3+ equally spaced angles integrate a degree-2 trig polynomial
            phis = np.linspace(0, 2 * np.pi, 6, endpoint=False)
            avg = np.mean([float(((L1.T @ _rot(f) @ R1) * (L2.T @ _rot(f) @ R2)).sum()) for f in phis])
            assert abs(float(res.avg_inner[h, i]) - avg) < 1e-8 * float(m1.norm() * m2.norm() + 1)


# ---------------------------------------------------------------- identities and single-head changes


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_model_against_itself_is_one(arch, pair_folders):
    r = C.WeightReader(pair_folders[arch][0])
    c = C.compare(r, r, C.CircuitConfig(random_baseline=False))
    for col in ("ov_cos", "qk_cos", "qk_cos_pos_avg"):
        np.testing.assert_allclose(c.matrix(col), 1.0, atol=1e-12)
    for col in ("ov_rel", "qk_rel", "q_rel", "k_rel", "v_rel", "o_rel", "norm_rel"):
        np.testing.assert_allclose(c.matrix(col), 0.0, atol=1e-6)
    np.testing.assert_allclose(c.pair_cos, 1.0, atol=1e-12)
    assert (c.matrix("ov_cos_null_max") < 1 - 1e-3).all()  # distinct heads of a random model differ


def test_mixed_layout_against_itself(tmp_path):
    r = C.WeightReader(save(make_mixed(), tmp_path / "m"))
    c = C.compare(r, r, C.CircuitConfig(random_baseline=False))
    m = c.matrix("qk_cos")
    assert np.isnan(m[1, 2:]).all() and np.isfinite(m[1, :2]).all()  # layer 1 has 2 heads
    np.testing.assert_allclose(m[np.isfinite(m)], 1.0, atol=1e-12)
    assert [r["kv_head"] for r in c.rows if r["layer"] == 1] == [0, 0]


def test_replaced_heads_change_only_there(tmp_path):
    base = make_tiny("llama", 0)
    other = make_tiny("llama", 0)
    dh, gen = 16, torch.Generator().manual_seed(5)
    att = [layer.self_attn for layer in other.model.layers]
    with torch.no_grad():
        att[2].q_proj.weight[1 * dh : 2 * dh] = torch.randn(dh, 64, generator=gen)  # QK of (2, 1)
        att[0].o_proj.weight[:, 2 * dh : 3 * dh] = torch.randn(64, dh, generator=gen)  # OV of (0, 2)
        att[1].k_proj.weight[1 * dh : 2 * dh] = torch.randn(dh, 64, generator=gen)  # KV head 1: QK of (1, 2), (1, 3)
        att[2].v_proj.weight[0:dh] = torch.randn(dh, 64, generator=gen)  # KV head 0: OV of (2, 0), (2, 1)
    c = C.compare(C.WeightReader(save(base, tmp_path / "a")), C.WeightReader(save(other, tmp_path / "b")))
    assert changed(c, "qk_cos") == {(2, 1), (1, 2), (1, 3)}
    assert changed(c, "ov_cos") == {(0, 2), (2, 0), (2, 1)}
    assert {(r["layer"], r["head"]) for r in c.rows if r["k_rel"] > 0} == {(1, 2), (1, 3)}
    assert {(r["layer"], r["head"]) for r in c.rows if r["o_rel"] > 0} == {(0, 2)}


def test_phi3_fused_qkv_is_split_per_head(tmp_path):
    other = make_tiny("phi3", 0)
    dh, H = 16, 4
    with torch.no_grad():  # rows of qkv_proj: [q (H dh) | k (KV dh) | v (KV dh)]; change KV head 1's k, KV head 0's v
        w = other.model.layers[1].self_attn.qkv_proj.weight
        w[H * dh + dh : H * dh + 2 * dh] += torch.randn(dh, 64, generator=torch.Generator().manual_seed(1))
        w[H * dh + 2 * dh : H * dh + 3 * dh] += torch.randn(dh, 64, generator=torch.Generator().manual_seed(2))
    base = save(make_tiny("phi3", 0), tmp_path / "a")
    c = C.compare(C.WeightReader(base), C.WeightReader(save(other, tmp_path / "b")))
    assert changed(c, "qk_cos") == {(1, 2), (1, 3)} and changed(c, "ov_cos") == {(1, 0), (1, 1)}


# ---------------------------------------------------------------- norms, biases


def _hand_qk_ov(model: torch.nn.Module, l: int, h: int, arch: str, fold: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """W_QK and W_OV of head h built by hand from the loaded model's modules (d_model x d_model)."""
    layer, dh = model.model.layers[l], 16
    att = layer.self_attn
    off = 1.0 if "gemma" in arch else 0.0
    g = (layer.input_layernorm.weight.double() + off) if fold else torch.ones(64, dtype=torch.float64)
    kvh = h // 2
    wq = att.q_proj.weight.double()[h * dh : (h + 1) * dh] * g
    wk = att.k_proj.weight.double()[kvh * dh : (kvh + 1) * dh] * g
    wv = att.v_proj.weight.double()[kvh * dh : (kvh + 1) * dh] * g
    if fold and hasattr(att, "q_norm"):
        wq = wq * (att.q_norm.weight.double() + off)[:, None]
        wk = wk * (att.k_norm.weight.double() + off)[:, None]
    wo = att.o_proj.weight.double()[:, h * dh : (h + 1) * dh]
    return wq.T @ wk, wv.T @ wo.T


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum() / (a.norm() * b.norm()))


@pytest.mark.parametrize("arch", ["llama", "gemma2", "qwen3", "gemma3"])
@pytest.mark.parametrize("fold", [True, False])
def test_norm_folding_equals_folding_by_hand(arch, fold, pair_folders):
    m0, m1 = make_tiny(arch, 0), make_tiny(arch, 1)
    c = C.compare(
        *(C.WeightReader(p) for p in pair_folders[arch]),
        C.CircuitConfig(fold_norms=fold, null=False, random_baseline=False),
    )
    for l, h in ((0, 0), (1, 3), (2, 1)):
        qk0, ov0 = _hand_qk_ov(m0, l, h, arch, fold)
        qk1, ov1 = _hand_qk_ov(m1, l, h, arch, fold)
        assert abs(c.matrix("qk_cos")[l, h] - _cos(qk0, qk1)) < 1e-6
        assert abs(c.matrix("ov_cos")[l, h] - _cos(ov0, ov1)) < 1e-6


def test_norm_change_is_seen_only_when_folded(tmp_path):
    other = make_tiny("llama", 0)
    with torch.no_grad():
        other.model.layers[1].input_layernorm.weight.mul_(torch.linspace(0.5, 1.5, 64))
    a, b = save(make_tiny("llama", 0), tmp_path / "a"), save(other, tmp_path / "b")
    folded = C.compare(C.WeightReader(a), C.WeightReader(b))
    raw = C.compare(C.WeightReader(a), C.WeightReader(b), C.CircuitConfig(fold_norms=False))
    assert {l for l, _ in changed(folded, "qk_cos")} == {1} and {l for l, _ in changed(folded, "ov_cos")} == {1}
    assert not changed(raw, "qk_cos") and not changed(raw, "ov_cos")
    assert {r["layer"] for r in folded.rows if r["norm_rel"] > 0} == {1}


def test_qwen2_biases_are_their_own_terms(tmp_path):
    base, other = make_tiny("qwen2", 0), make_tiny("qwen2", 0)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in (base, other):
            for layer in m.model.layers:
                for p in (layer.self_attn.q_proj.bias, layer.self_attn.k_proj.bias, layer.self_attn.v_proj.bias):
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        other.model.layers[0].self_attn.q_proj.bias[16:32] = torch.randn(16, generator=gen)  # head 1's b_q
        other.model.layers[2].self_attn.v_proj.bias[0:16] = torch.randn(16, generator=gen)  # KV head 0's b_v
    c = C.compare(C.WeightReader(save(base, tmp_path / "a")), C.WeightReader(save(other, tmp_path / "b")))
    assert c.biases == ["k", "q", "v"]
    assert not changed(c, "qk_cos") and not changed(c, "ov_cos")  # weights untouched
    assert changed(c, "qk_bias_cos") == {(0, 1)}
    assert changed(c, "ov_bias_cos") == {(2, 0), (2, 1)}
    assert {(r["layer"], r["head"]) for r in c.rows if r["q_bias_rel"] > 0} == {(0, 1)}
    assert {(r["layer"], r["head"]) for r in c.rows if r["v_bias_rel"] > 0} == {(2, 0), (2, 1)}


def test_reads_only_attention_tensors_one_at_a_time(pair_folders, monkeypatch):
    """No model is instantiated and nothing but the attention weights and the input norm is read."""
    seen: list[str] = []
    real = C.WeightReader.get
    monkeypatch.setattr(C.WeightReader, "get", lambda self, name: (seen.append(name), real(self, name))[1])
    r = C.WeightReader(pair_folders["qwen3"][0])
    C.compare(r, r, C.CircuitConfig(null=False, random_baseline=False))
    assert seen and all(".self_attn." in n or n.endswith("input_layernorm.weight") for n in seen)
    assert len(seen) == 2 * 3 * 7  # both sides, 3 layers, q k v o q_norm k_norm input_norm


# ---------------------------------------------------------------- layouts and architectures


def test_different_layouts_raise(tmp_path):
    a = save(make_tiny("llama", 0), tmp_path / "a")
    b = save(make_tiny("llama", 0, num_key_value_heads=4), tmp_path / "b")
    with pytest.raises(C.LayoutMismatch, match=r"layer 0: .*k_proj.weight: \(32, 64\) vs \(64, 64\)"):
        C.compare(C.WeightReader(a), C.WeightReader(b))
    d = save(make_tiny("llama", 0, num_hidden_layers=2), tmp_path / "d")
    with pytest.raises(C.LayoutMismatch, match="3 layers .* but 2"):
        C.compare(C.WeightReader(a), C.WeightReader(d))


def test_unknown_architecture_is_a_clear_error(tmp_path):
    d = shutil.copytree(save(make_tiny("llama", 0), tmp_path / "a"), tmp_path / "x")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["FooForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitecture, match="FooForCausalLM.*known: .*LlamaForCausalLM"):
        C.WeightReader(d)


# ---------------------------------------------------------------- outputs and the join with analyses


def test_importance_join_sees_preserved_importance():
    rng = np.random.default_rng(0)
    imp = rng.normal(size=200)
    cos = 0.5 + 0.1 * (imp > np.sort(imp)[-11]) + rng.normal(scale=0.01, size=200)  # top-10 heads kept better
    j = C.importance_join(cos, imp, k=10, n_boot=500)
    assert j["diff"] > 0.05 and j["ci_low"] > 0 and j["spearman"]["estimate"] > 0
    null = C.importance_join(rng.normal(size=200), imp, k=10, n_boot=500)
    assert null["ci_low"] < 0 < null["ci_high"]


def test_run_writes_csv_json_npz_and_joins(tmp_path):
    a, b = save(make_tiny("llama", 0), tmp_path / "m" / "a"), save(make_tiny("llama", 1), tmp_path / "m" / "b")
    res = tmp_path / "results"
    paths = C.run(str(a), str(b), res, C.CircuitConfig(top_k=2, n_boot=200), progress=False)
    meta = json.loads(paths["json"].read_text())
    assert paths["csv"].name == "m--a__m--b.csv"
    assert meta["model"] == str(a.resolve()) and meta["other_model"] == str(b.resolve())
    assert meta["revision"].startswith("folder-sha256:") and meta["other_revision"].startswith("folder-sha256:")
    assert meta["importance"] == [] and any("no ablation or Taylor" in n for n in meta["notes"])
    assert "rotary" in meta["explain"]["qk_cos"] and meta["layout"]["rotary_dim"] == 16
    rows = C.read_csv(paths["csv"])
    assert list(rows[0]) == list(C.COLUMNS) and len(rows) == 12
    z = np.load(paths["npz"])
    assert z["qk_pair_cos"].shape == (3, 4, 8) and z["null_ov_0"].shape == (4, 4)
    # an ablation output of the base model is joined
    abl = res / "m--a" / "humaneval" / "ablation"
    abl.mkdir(parents=True)
    np.savez(abl / "regular.npz", delta_mean=np.arange(12.0).reshape(3, 4))
    (abl / "regular.json").write_text("{}")
    meta = json.loads(
        C.run(str(a), str(b), res, C.CircuitConfig(top_k=2, n_boot=200), progress=False)["json"].read_text()
    )
    (j,) = meta["importance"]
    assert j["stage"] == "ablation" and j["dataset"] == "humaneval" and j["npz_key"] == "importance_0"
    assert {"diff", "ci_low", "ci_high", "spearman"} <= set(j["ov_cos"]) and j["ov_cos"]["top_k"] == 2


def test_cli(tmp_path, capsys):
    a, b = save(make_tiny("qwen2", 0), tmp_path / "m" / "a"), save(make_tiny("qwen2", 1), tmp_path / "m" / "b")
    paths = C.main(["--base", str(a), "--other", str(b), "--results-dir", str(tmp_path / "r"), "--no-null"])
    assert paths["csv"].exists() and "OV cos mean" in capsys.readouterr().out
    assert np.isnan(C.read_csv(paths["csv"])[0]["ov_cos_null_max"])
    with pytest.raises(SystemExit):
        C.main(["--base", str(a)])
    preset = tmp_path / "p.json"
    preset.write_text(json.dumps({"base": str(a), "other": str(a), "results-dir": str(tmp_path / "r2")}))
    assert C.main(["--config", str(preset), "--no-random"])["csv"].name == "m--a__m--a.csv"


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    import huggingface_hub

    import btp.models

    def offline(*a, **k):
        raise OSError("no connection")

    monkeypatch.setattr(btp.models, "_hub_revision", lambda repo, rev: rev)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(RuntimeError, match="cannot get the weights of org/model .*offline.*local folder"):
        C.local_folder("org/model")


# ---------------------------------------------------------------- the embedded model

PERTURBED = {"q": (3, 4), "o": (10, 0), "v": (20, 1)}  # (layer, head) or (layer, KV head) for v


def perturbed_copy(src: str | Path, dst: Path, seed: int = 0) -> Path:
    """A copy of a (single-file) safetensors model whose PERTURBED heads carry noise: the untouched weights stay in
    the original file (symlinked as shard 1), the changed tensors go to shard 2 of an index."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True)
    shutil.copy(src / "config.json", dst / "config.json")
    cfg = json.loads((src / "config.json").read_text())
    dh = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    os.symlink(src / "model.safetensors", dst / "model-00001-of-00002.safetensors")
    gen = torch.Generator().manual_seed(seed)
    changed_t = {}
    with safe_open(str(src / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        for proj, (l, h) in PERTURBED.items():
            name = f"model.layers.{l}.self_attn.{proj}_proj.weight"
            w = f.get_tensor(name).clone()
            blk = w[:, h * dh : (h + 1) * dh] if proj == "o" else w[h * dh : (h + 1) * dh]
            blk += 0.5 * blk.std() * torch.randn(blk.shape, generator=gen)
            changed_t[name] = w
    save_file(changed_t, str(dst / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    wm = {k: "model-00002-of-00002.safetensors" if k in changed_t else "model-00001-of-00002.safetensors" for k in keys}
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return dst


@pytest.mark.slow
def test_embedded_against_itself_and_a_perturbed_copy(tmp_path):
    from btp.models import resolve_model

    src = resolve_model("smollm2-135m").path
    r = C.WeightReader(src)
    assert (r.n_layers, r.layout.n_heads, r.layout.n_kv_heads) == (30, 9, 3)
    same = C.compare(r, r, C.CircuitConfig(null=False, random_baseline=False))
    np.testing.assert_allclose(same.matrix("ov_cos"), 1.0, atol=1e-12)
    np.testing.assert_allclose(same.matrix("qk_cos"), 1.0, atol=1e-12)
    c = C.compare(r, C.WeightReader(perturbed_copy(src, tmp_path / "p")), C.CircuitConfig(random_baseline=False))
    (lq, hq), (lo, ho), (lv, kv) = PERTURBED["q"], PERTURBED["o"], PERTURBED["v"]
    assert changed(c, "qk_cos") == {(lq, hq)}
    assert changed(c, "ov_cos") == {(lo, ho)} | {(lv, h) for h in range(3 * kv, 3 * kv + 3)}
    # a perturbed head still resembles itself more than any other head of its layer
    assert c.matrix("qk_cos")[lq, hq] > c.matrix("qk_cos_null_max")[lq, hq]
