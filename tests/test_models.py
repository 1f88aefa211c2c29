"""Model loading: the embedded default (GGUF -> cached safetensors), local folders, clear errors."""

from __future__ import annotations

import time

import pytest
import torch

from btp.arch import adapter
from btp.models import load_model, parse_dtype, resolve_model


@pytest.mark.slow
def test_embedded_default_loads_fast_from_cache():
    resolve_model("smollm2-135m")  # converts once if needed
    t0 = time.time()
    lm = load_model("smollm2-135m", device="cpu")
    took = time.time() - t0
    ad = adapter(lm.model)
    assert type(lm.model).__name__ == "LlamaForCausalLM"
    assert ad.n_layers == 30 and ad.layer_num_heads == [9] * 30 and ad.heads[0].n_kv_heads == 3
    assert lm.dtype == torch.float32 and lm.revision.startswith("gguf-sha256:")
    assert lm.model_id == "HuggingFaceTB/SmolLM2-135M-Instruct-Q4_1-gguf"
    assert took < 30, f"cached load took {took:.1f}s"
    # the dequantized model is a working language model: low loss on ordinary code
    ids = lm.tokenizer("def add(a, b):\n    return a + b\n", return_tensors="pt").input_ids
    loss = lm.model(input_ids=ids, labels=ids).loss.item()
    assert loss < 3.0
    # the same folder loads by path and keeps the same identity
    lm2 = load_model(lm.path, device="cpu", dtype="bfloat16")
    assert lm2.model_id == lm.model_id and lm2.dtype == torch.bfloat16


def test_bad_names_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="neither an embedded model"):
        resolve_model("not-a-model")
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ValueError, match="unknown dtype"):
        parse_dtype("float8")


def test_local_folder_roundtrip(tmp_path):
    from conftest import make_tiny

    m = make_tiny("qwen2")
    m.save_pretrained(tmp_path / "tiny")
    ref = resolve_model(str(tmp_path / "tiny"))
    assert ref.revision.startswith("folder-sha256:") and ref.path.endswith("tiny")


def test_attention_kernel_resolution():
    """auto: FA2 on CUDA in half precision when importable, else SDPA; eager where SDPA cannot compute the model
    (Gemma2's attention logit soft-capping), and an explicit sdpa there is refused."""
    from conftest import _configs

    from btp.models import resolve_attn

    cpu, llama, gemma2 = torch.device("cpu"), _configs()["llama"](), _configs()["gemma2"]()
    assert resolve_attn("auto", cpu, torch.float32, llama) == "sdpa"
    assert resolve_attn(None, cpu, torch.float32, llama) == "sdpa"
    assert resolve_attn("eager", cpu, torch.float32, llama) == "eager"
    assert resolve_attn("auto", cpu, torch.float32, gemma2) == "eager"
    assert resolve_attn("auto", torch.device("cuda"), torch.float32, llama) == "sdpa"  # FA2 needs bf16/fp16
    with pytest.raises(ValueError, match="soft-capping"):
        resolve_attn("sdpa", cpu, torch.float32, gemma2)
    with pytest.raises(ValueError, match="unknown attention"):
        resolve_attn("flex", cpu, torch.float32, llama)
