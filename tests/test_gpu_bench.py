"""scripts/gpu_bench.sh runs to completion in its reduced CPU mode: every agreement check and every timing row."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_bench_cpu_smoke():
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_bench.sh"), "--cpu-smoke"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "32/32 checks agree" in out and "FAIL" not in out
    timing = out.split("2. timing")[1]
    for what in ("ablation, 16 heads", "atp, all 16 heads", "entropy lens", "CMA-ES fitness"):
        assert timing.count(what) == 4, what  # 2 models x 2 dtypes
