#!/usr/bin/env bash
# Command 2: set up if needed, then lint (ruff check, ruff format --check) and run the whole test suite (CPU only).
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check btp tests scripts
.venv/bin/ruff format --check btp tests scripts
exec .venv/bin/python -m pytest -q -rs "$@" tests
