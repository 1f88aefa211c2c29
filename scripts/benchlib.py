"""What the speed benchmarks share: the straightforward method's model as a user loads it (transformers defaults),
long samples for `--seq-len`, peak memory per timed segment, and the machine's load.
"""

from __future__ import annotations

import os
import resource
from dataclasses import replace

import numpy as np
import torch


def user_model(path: str, device: torch.device | str | None = None):
    """The model as a researcher's straightforward code loads it: `from_pretrained` with transformers' defaults for
    attention (SDPA) and dtype (the checkpoint's), weights frozen and in eval mode (so that no weight gradients are
    computed), moved to the device btp uses."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path)
    return m.to(device or "cpu").eval().requires_grad_(False)


def kernel(model) -> str:
    return getattr(model.config, "_attn_implementation", None) or "eager"


def stretch(samples: list, seq_len: int | None) -> list:
    """Each sample lengthened to `seq_len` tokens by prepending the other samples' tokens as context (cycled), its
    scored span kept and moved along: a long context with code scored at its end, as in a reasoning trace. None or
    a length the sample already has: unchanged."""
    if not seq_len:
        return list(samples)
    pool = np.concatenate([s.input_ids for s in samples])
    out = []
    for s in samples:
        n = seq_len - len(s.input_ids)
        if n <= 0:
            out.append(s)
            continue
        ctx = np.resize(np.roll(pool, -int(s.score_end)), n)  # cycled: any length
        out.append(
            replace(
                s,
                input_ids=np.concatenate([ctx, s.input_ids]).astype(np.int64),
                score_start=s.score_start + n,
                score_end=s.score_end + n,
            )
        )
    return out


def free_bytes(device: str | None = None) -> int:
    """Free memory of the device the benchmark runs on (CUDA: the GPU's; else MemAvailable)."""
    if (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda"):
        return int(torch.cuda.mem_get_info()[0])
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 4 << 30


def load_line() -> str:
    a, b, c = os.getloadavg()
    return f"load average {a:.1f} {b:.1f} {c:.1f} on {os.cpu_count()} CPUs"


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class Peak:
    """Peak memory above the start of each timed segment: on CUDA max_memory_allocated, on CPU the resident
    high-water mark (VmHWM, reset through /proc/self/clear_refs at each segment's start; without that, ru_maxrss over
    the whole process, marked approximate). `gib(name)`: the largest over a method's segments. On CPU this is
    resident memory: a segment that reuses heap freed by an earlier one shows less than it used."""

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"
        self.peak: dict[str, list[int]] = {}
        self.exact = True

    def __call__(self, name: str) -> _Segment:
        return _Segment(self, name)

    def gib(self, name: str, how=max) -> float:
        return how(self.peak.get(name, [0])) / 2**30


class _Segment:
    def __init__(self, p: Peak, name: str):
        self.p, self.name = p, name

    def __enter__(self) -> None:
        if self.p.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.p.exact = False
        self.base = (_status_kb("VmRSS") or 0) * 1024

    def __exit__(self, *exc) -> None:
        if self.p.cuda:
            torch.cuda.synchronize()
            top = torch.cuda.max_memory_allocated()
        else:
            top = (
                (_status_kb("VmHWM") if self.p.exact else None) or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            ) * 1024
        self.p.peak.setdefault(self.name, []).append(top - self.base)
