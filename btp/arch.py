"""Per-architecture facts, as data: where the layers, output projections, final norm and unembedding live,
the head layout of every layer (GQA, mixed head dims), and logit soft-capping.

Only this module knows attribute names of model classes. Everything else asks an `Adapter`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    """Dotted attribute paths, relative to the *ForCausalLM model."""

    base: str = "model"  # the decoder stack (returns normed last hidden state)
    layers: str = "model.layers"
    attn: str = "self_attn"  # relative to a layer
    o_proj: str = "o_proj"  # relative to attn; its input is [.., heads * head_dim]
    final_norm: str = "model.norm"
    unembed: str = "lm_head"


_DEFAULT = ArchSpec()
_GEMMA3_MM = ArchSpec(
    base="model.language_model", layers="model.language_model.layers", final_norm="model.language_model.norm"
)

# Architecture support as data: add a class name here (with its paths) to support a new decoder.
ARCHS: dict[str, ArchSpec] = {
    "LlamaForCausalLM": _DEFAULT,
    "MistralForCausalLM": _DEFAULT,
    "Qwen2ForCausalLM": _DEFAULT,
    "Qwen3ForCausalLM": _DEFAULT,
    "Gemma2ForCausalLM": _DEFAULT,
    "Gemma3ForCausalLM": _DEFAULT,
    "Gemma3ForConditionalGeneration": _GEMMA3_MM,
    "Phi3ForCausalLM": _DEFAULT,
}


def attn_softcap(config) -> float | None:
    """Soft-capping of attention logits (Gemma2): eager and FlashAttention apply it, torch's SDPA cannot (it would
    silently compute another model)."""
    text = getattr(config, "text_config", None) or config
    return getattr(text, "attn_logit_softcapping", None) or None


def attn_kernel(model: nn.Module) -> str:
    """The attention implementation the model runs with ("eager", "sdpa", "flash_attention_2", ...)."""
    return getattr(model.config, "_attn_implementation", None) or "eager"


class UnsupportedArchitecture(ValueError):
    pass


@dataclass(frozen=True)
class HeadLayout:
    """One layer's attention heads: query heads, KV heads, dim per head."""

    n_heads: int
    n_kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        """Query heads sharing one KV head (GQA); query head h uses KV head h // group_size."""
        return self.n_heads // self.n_kv_heads

    def kv_head(self, h: int) -> int:
        return h // self.group_size


def _get(obj: object, path: str, what: str, arch: str) -> object:
    cur = obj
    for part in path.split("."):
        if not hasattr(cur, part):
            raise UnsupportedArchitecture(
                f"{arch}: cannot find the {what} at '{path}' (missing attribute '{part}' on "
                f"{type(cur).__name__}); add an ArchSpec for this class in btp/arch.py"
            )
        cur = getattr(cur, part)
    return cur


class Adapter:
    """Architecture facts of one loaded causal LM."""

    def __init__(self, model: nn.Module, spec: ArchSpec | None = None):
        self.model = model
        self.arch = type(model).__name__
        if spec is None:
            spec = ARCHS.get(self.arch)
            if spec is None:
                spec = self._guess()
        self.spec = spec
        self.base: nn.Module = _get(model, spec.base, "decoder stack", self.arch)  # type: ignore[assignment]
        self.layers: list[nn.Module] = list(_get(model, spec.layers, "decoder layers", self.arch))  # type: ignore
        self.final_norm: nn.Module = _get(model, spec.final_norm, "final norm", self.arch)  # type: ignore
        self.unembed: nn.Linear = _get(model, spec.unembed, "unembedding", self.arch)  # type: ignore
        self.o_projs: list[nn.Linear] = [
            _get(layer, f"{spec.attn}.{spec.o_proj}", "attention output projection", self.arch)  # type: ignore
            for layer in self.layers
        ]
        self.attns: list[nn.Module] = [_get(layer, spec.attn, "attention", self.arch) for layer in self.layers]  # type: ignore
        self.heads = [self._layout(i) for i in range(len(self.layers))]

    def _guess(self) -> ArchSpec:
        """Unknown class names: accept only if the standard layout is fully present."""
        try:
            Adapter(self.model, _DEFAULT)
        except UnsupportedArchitecture as e:
            known = ", ".join(sorted(ARCHS))
            raise UnsupportedArchitecture(f"unsupported architecture {self.arch} (known: {known}); {e}") from None
        return _DEFAULT

    @cached_property
    def config(self):
        cfg = self.model.config
        return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg

    def _layout(self, i: int) -> HeadLayout:
        attn, o = self.attns[i], self.o_projs[i]
        cfg = self.config
        head_dim = (
            getattr(attn, "head_dim", None)
            or getattr(cfg, "head_dim", None)
            or cfg.hidden_size // cfg.num_attention_heads
        )
        if o.in_features % head_dim:
            raise UnsupportedArchitecture(
                f"{self.arch} layer {i}: o_proj input {o.in_features} is not a multiple of head_dim {head_dim}"
            )
        n_heads = o.in_features // head_dim  # from the weights: right for pruned/mixed models too
        groups = getattr(attn, "num_key_value_groups", None)
        if groups:
            n_kv = max(1, n_heads // groups)
        else:
            n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
        if n_heads % n_kv:
            raise UnsupportedArchitecture(f"{self.arch} layer {i}: {n_heads} query heads, {n_kv} KV heads")
        return HeadLayout(n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim)

    # ------------------------------------------------------------------ facts
    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def layer_num_heads(self) -> list[int]:
        return [h.n_heads for h in self.heads]

    @property
    def max_heads(self) -> int:
        return max(self.layer_num_heads)

    @property
    def n_heads_total(self) -> int:
        return sum(self.layer_num_heads)

    def all_heads(self) -> list[tuple[int, int]]:
        return [(l, h) for l, lay in enumerate(self.heads) for h in range(lay.n_heads)]

    @property
    def softcap(self) -> float | None:
        return getattr(self.config, "final_logit_softcapping", None) or None

    @property
    def vocab_size(self) -> int:
        return self.unembed.out_features

    @property
    def device(self) -> torch.device:
        """Where the logits are computed (the unembedding's execution device): outputs and scores live here."""
        return module_device(self.unembed)

    def layer_device(self, l: int) -> torch.device:
        """Where layer l computes (a device map may spread the layers): its gates and cached tensors go there."""
        return module_device(self.layers[l])

    # ------------------------------------------------------------------ lens
    def logits_from_normed(self, h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Unembed an already-normed hidden state, with soft-capping as the model does. `out`: a preallocated
        tensor of the logits' shape and the weights' dtype to write into (reused across chunks, it spares CPU
        runs fresh page-faulted memory for every vocab-sized block)."""
        w = self.unembed.weight
        if out is None or type(self.unembed) is not nn.Linear or w.device.type == "meta":  # meta: offloaded
            logits = self.unembed(h.to(w.dtype))
            if out is not None:
                logits = out.copy_(logits)
        else:
            logits = torch.matmul(h.to(w.dtype), w.t(), out=out)  # what nn.Linear computes
            if self.unembed.bias is not None:
                logits.add_(self.unembed.bias)
        cap = self.softcap
        if cap:
            logits = logits.div_(cap).tanh_().mul_(cap) if out is not None else torch.tanh(logits / cap) * cap
        return logits

    def lens_logits(self, h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Logit lens of a residual-stream state: unembed(final_norm(h)), soft-capped."""
        return self.logits_from_normed(self.final_norm(h.to(self.device)), out=out)


def module_device(m: nn.Module) -> torch.device:
    """The device a module computes on: the execution device of its accelerate hook when a device map
    dispatched it (its weights may sit on "meta" until the hook loads them from CPU or disk), else its weights'."""
    hook = getattr(m, "_hf_hook", None)
    for h in [hook, *getattr(hook, "hooks", ())]:  # a SequentialHook holds several
        dev = getattr(h, "execution_device", None)
        if dev is not None:
            return torch.device(dev if not isinstance(dev, int) else f"cuda:{dev}")
    for t in (*m.parameters(), *m.buffers()):
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def adapter(model: nn.Module) -> Adapter:
    """The (cached) adapter of a model."""
    a = getattr(model, "_btp_adapter", None)
    if a is None or a.model is not model:
        a = Adapter(model)
        try:
            object.__setattr__(model, "_btp_adapter", a)
        except Exception:
            pass
    return a


# ================================================================ weights on disk (the circuit reader)
# The attention weights as stored in safetensors shards, so that a reader can take them tensor by tensor without
# instantiating the model. HF Linear weights are [out, in]: q/k/v are [heads * head_dim, d_model] (d_model is the
# *input* side), o is [d_model, heads * head_dim] (d_model is the *output* side).


@dataclass(frozen=True)
class WeightSpec:
    """Safetensors key names of one decoder layer's attention, relative to a layer prefix."""

    layer_prefixes: tuple[str, ...] = ("model.layers.{layer}.", "layers.{layer}.")  # first one present is used
    q: str = "self_attn.q_proj"  # `.weight` / `.bias` appended
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    qkv: str | None = None  # a fused projection, rows [q | k | v] (Phi3); then q/k/v are unused
    input_norm: str = "input_layernorm"  # the norm whose output the attention reads
    q_norm: str | None = None  # per-head RMSNorm of q and k after projection (Qwen3, Gemma3)
    k_norm: str | None = None
    norm_offset: float = 0.0  # RMSNorm scale = weight + offset (Gemma: 1, its weights are stored as w - 1)


_W_DEFAULT = WeightSpec()
_W_QKNORM = WeightSpec(q_norm="self_attn.q_norm", k_norm="self_attn.k_norm")
_W_GEMMA2 = WeightSpec(norm_offset=1.0)
_W_GEMMA3 = WeightSpec(q_norm="self_attn.q_norm", k_norm="self_attn.k_norm", norm_offset=1.0)
_W_GEMMA3_MM = WeightSpec(
    layer_prefixes=("model.language_model.layers.{layer}.", "language_model.model.layers.{layer}."),
    q_norm="self_attn.q_norm",
    k_norm="self_attn.k_norm",
    norm_offset=1.0,
)

WEIGHT_SPECS: dict[str, WeightSpec] = {
    "LlamaForCausalLM": _W_DEFAULT,
    "MistralForCausalLM": _W_DEFAULT,
    "Qwen2ForCausalLM": _W_DEFAULT,  # q/k/v biases: present as `.bias` keys, found by the reader
    "Qwen3ForCausalLM": _W_QKNORM,
    "Gemma2ForCausalLM": _W_GEMMA2,
    "Gemma3ForCausalLM": _W_GEMMA3,
    "Gemma3ForConditionalGeneration": _W_GEMMA3_MM,
    "Phi3ForCausalLM": WeightSpec(qkv="self_attn.qkv_proj"),
}


def text_config(config: dict) -> dict:
    """The decoder's part of a config.json (multimodal configs nest it under `text_config`)."""
    return config.get("text_config") or config


def config_arch(config: dict) -> str:
    archs = config.get("architectures") or []
    if not archs:
        raise UnsupportedArchitecture("config.json names no `architectures`; cannot tell how its weights are named")
    return archs[0]


def weight_spec(config: dict) -> WeightSpec:
    """The on-disk attention layout of a config.json's architecture; UnsupportedArchitecture if unknown."""
    arch = config_arch(config)
    spec = WEIGHT_SPECS.get(arch)
    if spec is None:
        raise UnsupportedArchitecture(
            f"unsupported architecture {arch} for reading attention weights "
            f"(known: {', '.join(sorted(WEIGHT_SPECS))}); add a WeightSpec in btp/arch.py"
        )
    return spec


def config_head_layout(config: dict) -> HeadLayout:
    """Query heads, KV heads and head dim as the config states them (uniform over layers; a reader checks them
    against the weight shapes, which win for pruned or mixed models)."""
    c = text_config(config)
    n_heads = int(c["num_attention_heads"])
    n_kv = int(c.get("num_key_value_heads") or n_heads)
    head_dim = int(c.get("head_dim") or c["hidden_size"] // n_heads)
    return HeadLayout(n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim)


def config_rotary_dim(config: dict, head_dim: int) -> int:
    """Dims of a head that rotary embeddings rotate (HF rotate_half: pairs (i, i + rot/2), i < rot/2); the rest
    (partial rotary) are position-independent."""
    c = text_config(config)
    rp = c.get("rope_parameters") or c.get("rope_scaling") or {}
    factor = c.get("partial_rotary_factor") or (rp.get("partial_rotary_factor") if isinstance(rp, dict) else None)
    rot = int(head_dim * float(factor or 1.0))
    return rot - rot % 2
