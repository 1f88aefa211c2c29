"""The entropy lens against a direct computation (full logits at every layer via output_hidden_states, then
selection), the model's own loss, chunking invariance, and a real run on the embedded model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import KERNELS, make_mixed, make_tiny

from btp.arch import adapter
from btp.entropy_lens import LensConfig, lens_sample, run_entropy_lens
from btp.samples import Sample, SampleConfig, SampleSet
from btp.store import read_npz

ARCHS = ["llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"]


def direct_lens(model, ids: torch.Tensor, positions: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """The straightforward reference: logits at every position of every layer, then select."""
    ad = adapter(model)
    with torch.no_grad():
        out = model(ids.view(1, -1), output_hidden_states=True)
        hs = out.hidden_states  # [embeddings, after layer 1, .., after layer L-1, final normed]
        assert len(hs) == ad.n_layers + 1
        logits = [ad.lens_logits(h)[0] for h in hs[1:-1]] + [out.logits[0]]
        logp = torch.log_softmax(torch.stack(logits).float(), -1)  # [L, T, V]
    p = logp.exp()
    ent = -(p * logp).sum(-1)
    nxt = ids.view(-1)[1:]
    ce = -logp[:, :-1].gather(-1, nxt.expand(logp.shape[0], -1)[..., None])[..., 0]
    kl = (p[-1] * (logp[-1] - logp)).sum(-1)
    pos = torch.as_tensor(positions)
    assert torch.equal(nxt[pos], torch.as_tensor(targets))
    return {"entropy": ent[:, pos].T.numpy(), "ce": ce[:, pos].T.numpy(), "kl": kl[:, pos].T.numpy()}


def _samples(n_vocab: int, seed: int = 3) -> dict[str, list[Sample]]:
    """Two samples per mode: regular scores the whole answer, chain_code only its code part."""
    g = np.random.default_rng(seed)
    out: dict[str, list[Sample]] = {"regular": [], "chain_code": []}
    for T, prompt, code in ((23, 7, (12, 20)), (17, 5, (9, 17))):
        ids = g.integers(1, n_vocab, T).astype(np.int64)
        out["regular"].append(Sample(f"p{T}", 0, ids, prompt, T))
        out["chain_code"].append(Sample(f"p{T}", 0, ids, *code))
    return out


@pytest.mark.parametrize("arch", ARCHS + ["mixed"])
@pytest.mark.parametrize("mode", ["regular", "chain_code"])
@pytest.mark.parametrize("attn", KERNELS)
def test_matches_direct_reference(arch, mode, attn):
    model = make_mixed(attn=attn) if arch == "mixed" else make_tiny(arch, attn=attn)
    for s in _samples(model.config.vocab_size)[mode]:
        got = lens_sample(
            model,
            torch.from_numpy(s.input_ids),
            torch.from_numpy(s.positions),
            torch.from_numpy(s.targets),
            chunk_tokens=8,
        )
        ref = direct_lens(model, torch.from_numpy(s.input_ids), s.positions, s.targets)
        for m in ("entropy", "ce", "kl"):
            assert got[m].shape == (s.n_scored, adapter(model).n_layers)
            np.testing.assert_allclose(got[m].numpy(), ref[m], atol=1e-4, rtol=0, err_msg=f"{arch} {mode} {m}")
        # the layers differ from each other (a lens reading one layer everywhere would pass nothing above)
        assert np.abs(np.diff(ref["entropy"], axis=1)).max() > 1e-3
        assert np.all(got["kl"][:, -1].numpy() == 0) and (got["kl"][:, :-1].numpy() > -1e-5).all()


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_last_layer_ce_is_model_loss(arch):
    model = make_tiny(arch)
    for s in _samples(model.config.vocab_size)["chain_code"]:
        ids = torch.from_numpy(s.input_ids)[None]
        labels = torch.full_like(ids, -100)
        labels[0, s.score_start : s.score_end] = ids[0, s.score_start : s.score_end]
        with torch.no_grad():
            loss = model(ids, labels=labels).loss.item()
        got = lens_sample(model, ids[0], torch.from_numpy(s.positions), torch.from_numpy(s.targets))
        assert got["ce"][:, -1].mean().item() == pytest.approx(loss, abs=1e-5)
        # an earlier layer is a different distribution: the check above can tell layers apart
        assert abs(got["ce"][:, 0].mean().item() - loss) > 1e-3


def test_gemma2_softcap_applied():
    model = make_tiny("gemma2")
    s = _samples(model.config.vocab_size)["regular"][0]
    got = lens_sample(model, torch.from_numpy(s.input_ids), torch.from_numpy(s.positions), torch.from_numpy(s.targets))
    # capped logits lie in [-5, 5], so the entropy is bounded below by that of the most peaked such distribution
    V, cap = model.config.vocab_size, model.config.final_logit_softcapping
    floor = np.log(1 + (V - 1) * np.exp(-2 * cap))
    assert (got["entropy"].numpy() >= floor - 1e-4).all()


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_lens_logits_into_preallocated_buffer(arch):
    """`Adapter.lens_logits(h, out=buf)` (used to reuse vocab-sized buffers) equals the plain call, softcap too."""
    model = make_tiny(arch)
    ad = adapter(model)
    h = torch.randn(2, 5, model.config.hidden_size)
    buf = torch.full((2, 5, ad.vocab_size), float("nan"))
    got = ad.lens_logits(h, out=buf)
    assert got.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(got, ad.lens_logits(h), rtol=0, atol=1e-6)


def test_chunk_sizes_give_identical_numbers():
    model = make_tiny("qwen3")
    s = _samples(model.config.vocab_size)["regular"][0]
    args = (torch.from_numpy(s.input_ids), torch.from_numpy(s.positions), torch.from_numpy(s.targets))
    base = lens_sample(model, *args, chunk_tokens=10_000)
    from btp.entropy_lens import auto_chunk

    assert auto_chunk(151_936, torch.device("cpu")) * 151_936 * 4 <= 128 * 2**20
    for ct in (1, 2, 5, 13, 64):
        got = lens_sample(model, *args, chunk_tokens=ct)
        for m in base:
            # equal up to fp32 rounding (a GEMM's summation order may depend on its row count)
            np.testing.assert_allclose(got[m].numpy(), base[m].numpy(), atol=1e-5, rtol=0, err_msg=f"chunk {ct} {m}")


def test_run_entropy_lens_fields_and_summaries():
    model = make_tiny("llama")
    samples = _samples(model.config.vocab_size)["chain_code"]
    ss = SampleSet(samples, SampleConfig(mode="chain_code"), "humaneval", "tiny")
    out = run_entropy_lens(model, ss, LensConfig(chunk_tokens=4, progress=False))
    L, N = 3, sum(s.n_scored for s in samples)
    for m in ("entropy", "ce", "kl"):
        assert out[m].shape == (N, L) and out[m].dtype == np.float32
        np.testing.assert_allclose(out[f"{m}_mean"], out[m].astype(np.float64).mean(0), rtol=1e-6)
        np.testing.assert_allclose(out[f"{m}_std"], out[m].astype(np.float64).std(0), rtol=1e-5)
        assert out[f"sample_{m}_mean"].shape == (2, L)
        np.testing.assert_allclose(out[f"sample_{m}_mean"][1], out[m][out["sample_index"] == 1].mean(0), rtol=1e-5)
    assert out["layer"].tolist() == [0, 1, 2]  # block index, 0-based
    assert out["sample_n_tokens"].tolist() == [s.n_scored for s in samples]
    # the sample fields are enough to recompute every number
    k = 5
    i, pos = out["sample_index"][k], out["position"][k]
    ids = out["input_ids"][out["sample_offsets"][i] : out["sample_offsets"][i + 1]]
    assert ids[pos + 1] == out["token_id"][k]
    again = direct_lens(model, torch.from_numpy(ids), np.array([pos]), np.array([ids[pos + 1]]))
    np.testing.assert_allclose(out["ce"][k], again["ce"][0], atol=1e-4)


def test_bad_positions_raise():
    model = make_tiny("llama")
    with pytest.raises(IndexError, match="outside"):
        lens_sample(model, torch.arange(1, 6), torch.tensor([3, 5]), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="chunk_tokens"):
        LensConfig(chunk_tokens=0)


def test_config_preset_parses():
    from pathlib import Path

    from btp import cli
    from btp.entropy_lens import build_parser

    preset = Path(__file__).resolve().parent.parent / "configs" / "entropy_reference.json"
    args = cli.parse(build_parser(), ["--config", str(preset), "--num-samples", "3"])
    assert (args.source, args.mode, args.num_samples, args.chunk_tokens) == ("reference", "chain_code", 3, None)


@pytest.mark.slow
def test_main_reference_run_on_embedded_model(tmp_path, capsys):
    from btp.entropy_lens import main

    argv = [
        "--source",
        "reference",
        "--num-samples",
        "2",
        "--mode",
        "chain_code",
        "--sample-max-tokens",
        "400",
        "--results-dir",
        str(tmp_path),
        "--no-progress",
    ]
    path = main(argv)
    assert path.parent.name == "entropy" and path.name == "chain_code-reference.npz"
    z = read_npz(path)
    L = 30
    N = len(z["token_id"])
    assert N > 20 and z["entropy"].shape == z["ce"].shape == z["kl"].shape == (N, L)
    assert z["sample_entropy_mean"].shape == (2, L) and len(z["sample_offsets"]) == 3
    assert z["provenance"]["stage"] == "entropy_lens" and z["provenance"]["mode"] == "chain_code"
    # the kernel it ran with (the default: SDPA on CPU) is recorded, and the flag as given
    assert z["provenance"]["attn_implementation"] == "sdpa"
    assert z["provenance"]["config"]["attn_implementation"] == "auto"
    meta = json.loads(path.with_suffix(".json").read_text())
    # an eager rerun is the same output (the kernel is not part of its identity): it is skipped
    capsys.readouterr()
    assert main(argv + ["--attn-implementation", "eager"]) == path
    assert "skipping" in capsys.readouterr().out
    assert meta["problem_ids"] == list(z["sample_problem_id"]) and len(meta["problem_ids"]) == 2
    # a real model: the last layer predicts reference code far better than the first
    assert z["ce_mean"][-1] < 0.5 * z["ce_mean"][0] and z["kl_mean"][-1] == 0
    # the last layer's CE is the model's own loss on the scored tokens
    from btp.models import load_model

    lm = load_model("smollm2-135m")
    i = 0
    ids = torch.from_numpy(z["input_ids"][z["sample_offsets"][i] : z["sample_offsets"][i + 1]])[None]
    sel = z["sample_index"] == i
    labels = torch.full_like(ids, -100)
    labels[0, z["position"][sel] + 1] = ids[0, z["position"][sel] + 1]
    with torch.no_grad():
        loss = lm.model(ids, labels=labels).loss.item()
    assert z["ce"][sel, -1].mean() == pytest.approx(loss, abs=1e-4)
    # a second run with the same samples is skipped
    capsys.readouterr()
    assert main(argv) == path
    assert "skipping" in capsys.readouterr().out
    # other samples under the same stem: refuse rather than mix or silently overwrite
    with pytest.raises(SystemExit, match="exists for other samples"):
        main([a if a != "2" else "1" for a in argv])


def test_summaries_are_also_sample_weighted_with_a_ci_over_problems():
    """Issue 12.9 (and 12.7): beside the token-weighted means, the mean of sample means (long samples do not
    dominate) with a bootstrap CI over problems."""
    from btp.entropy_lens import summarize

    x = np.concatenate([np.zeros((100, 2)), np.ones((2, 2))]).astype(np.float32)  # long sample 0, short sample 1
    per_token = {m: x for m in ("entropy", "ce", "kl")}
    idx = np.array([0] * 100 + [1] * 2)
    out = summarize(per_token, idx, 2, ["p0", "p1"], n_boot=100)
    np.testing.assert_allclose(out["entropy_mean"], [2 / 102] * 2, rtol=1e-5)  # token-weighted
    np.testing.assert_allclose(out["entropy_sample_mean"], [0.5, 0.5])  # sample-weighted
    assert np.all(out["entropy_ci_low"] <= 0.5) and np.all(out["entropy_ci_high"] >= 0.5)
    same = summarize(per_token, idx, 2, ["p0", "p0"], n_boot=100)  # one problem: no spread
    np.testing.assert_allclose(same["ce_ci_low"], same["ce_ci_high"])
