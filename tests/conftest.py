"""Shared fixtures: tiny random models of every supported architecture (fp32, CPU, seconds to build)."""

from __future__ import annotations

import pytest
import torch

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
)


def _configs():
    import transformers as tf

    out = {
        "llama": lambda: tf.LlamaConfig(**TINY),
        "mistral": lambda: tf.MistralConfig(**TINY, sliding_window=None),
        "qwen2": lambda: tf.Qwen2Config(**TINY),
        "qwen3": lambda: tf.Qwen3Config(**TINY),
        "gemma2": lambda: tf.Gemma2Config(
            **TINY, final_logit_softcapping=5.0, attn_logit_softcapping=20.0, query_pre_attn_scalar=16, sliding_window=8
        ),
        "gemma3": lambda: tf.Gemma3TextConfig(
            **TINY, final_logit_softcapping=5.0, query_pre_attn_scalar=16, sliding_window=8
        ),
        "phi3": lambda: tf.Phi3Config(
            **{k: v for k, v in TINY.items() if k != "head_dim"}, pad_token_id=0, bos_token_id=1, eos_token_id=2
        ),
    }
    return out


ARCH_NAMES = list(_configs())
# The exactness tests run under each: "auto" is what the stages load by default (SDPA here; eager for Gemma2,
# whose attention soft-capping SDPA cannot compute), "eager" the kernel that materialises attention scores.
KERNELS = ["auto", "eager"]


def make_tiny(arch: str = "llama", seed: int = 0, attn: str = "eager", **overrides) -> torch.nn.Module:
    """A tiny random causal LM of the given architecture, eval mode, fp32, with the attention kernel `attn`
    (resolved as btp.models.load_model resolves it)."""
    from transformers import AutoModelForCausalLM

    from btp.models import resolve_attn

    cfg = _configs()[arch]()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    attn = resolve_attn(attn, torch.device("cpu"), torch.float32, cfg)
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
    # random init of norms too, so that norm placement errors show up in the tests
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.normal_(0.0, 0.3).add_(1.0 if "gemma" not in arch else 0.0)
    return model.eval().requires_grad_(False)


def make_mixed(seed: int = 0, attn: str = "eager") -> torch.nn.Module:
    """A tiny Llama whose layer 1 has 2 query heads sharing 1 KV head (the others: 4 heads, 2 KV heads):
    a mixed layout as in pruned or non-uniform models."""
    from torch import nn

    model = make_tiny("llama", seed, attn=attn)
    sa = model.model.layers[1].self_attn
    d, hd, nq, nkv = 64, 16, 2, 1
    torch.manual_seed(seed + 1)
    sa.q_proj, sa.k_proj, sa.v_proj = (
        nn.Linear(d, nq * hd, bias=False),
        nn.Linear(d, nkv * hd, bias=False),
        nn.Linear(d, nkv * hd, bias=False),
    )
    sa.o_proj = nn.Linear(nq * hd, d, bias=False)
    sa.head_dim, sa.num_key_value_groups, sa.scaling = hd, nq // nkv, hd**-0.5
    return model.eval().requires_grad_(False)


@pytest.fixture(params=ARCH_NAMES)
def tiny_model(request):
    return make_tiny(request.param)


@pytest.fixture
def tiny_ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(1, 128, (1, 12), generator=g)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny random Llama with the embedded tokenizer's vocabulary, saved as a HF folder: every stage (and a
    subprocess of it) runs on it in seconds."""
    from btp.models import load_tokenizer

    tok = load_tokenizer()
    out = tmp_path_factory.mktemp("tinyllama")
    make_tiny("llama", vocab_size=len(tok)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): on a shared small
    machine, threads under contention run far slower (2 threads ~15x slower measured on 2 busy cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
