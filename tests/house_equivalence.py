"""The refactor proof of the "one house" change: every stage run on the embedded default model, on the same inputs,
before and after, must write the same outputs (npz arrays bitwise, JSON/JSONL equal apart from times and
provenance stamps).

`python tests/house_equivalence.py write DIR` runs the stages into a scratch tree and writes their canonical form to
DIR (the committed "before" fixture, tests/fixtures/house_before/, was written from main at 235863d, before the
change, and rewritten when SDPA became the default kernel); `tests/test_house_equivalence.py` runs them again and
compares. One torch thread, so that float reductions run in one order on every machine.
"""

from __future__ import annotations

import importlib
import json
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np

MODEL = "smollm2-135m"
# provenance, timing and the machine's isolation facts: allowed to differ between two runs of the same numbers
VOLATILE = {
    "isolation",
    "cgroup",
    "created",
    "host",
    "seconds",
    "git_commit",
    "versions",
    "config",
    "run",
    "run_key",
    "provenance",
    "duration",
    "stage",
    "model",
    "revision",
    "dataset",
    "mode",
    "seed",
    "device",
    "started",
    "finished",
    "elapsed",
    "identity",
    "settings",
    "attn_implementation",
    "inputs",  # content hashes of the inputs read: generation records carry their timings
}


def stages(root: Path) -> list[tuple[str, list[str]]]:
    r = ["--results-dir", str(root), "--model", MODEL]
    gen = r + ["--backend", "hf", "--max-tokens", "16"]
    he, mb = ["--dataset", "humaneval"], ["--dataset", "mbpp"]
    q = ["--no-progress"]
    small = ["--num-samples", "2", "--sample-max-tokens", "40"]
    ref = ["--source", "reference", "--num-samples", "2", "--sample-max-tokens", "40"]
    abl = ["--layers", "28,29", "--knockout-ks", "1,2,4", "--random-seeds", "2", "--n-boot", "200"] + q
    return [
        ("generate", gen + he + ["--limit", "2", "--n", "2", "--temperature", "0.8"]),
        ("generate", gen + mb + ["--limit", "2", "--n", "1"]),
        ("evaluate", r + he + ["--workers", "2", "--n-boot", "200"]),
        ("evaluate", r + mb + ["--workers", "2", "--n-boot", "200"]),
        (
            "evaluate",
            [
                "--results-dir",
                str(root),
                "--dataset",
                "mbpp",
                "--reference",
                "--limit",
                "3",
                "--workers",
                "2",
                "--n-boot",
                "200",
            ],
        ),
        ("entropy_lens", r + he + ["--select", "all", "--mode", "regular"] + small + q),
        ("entropy_lens", r + he + ["--select", "all", "--mode", "chain_code"] + small + q),
        ("entropy_lens", r + mb + ["--mode", "regular"] + ref + q),
        (
            "ablation",
            r + he + ["--select", "all", "--mode", "regular", "--greedy", "--greedy-candidates", "4"] + small + abl,
        ),
        ("ablation", r + mb + ["--mode", "chain_code", "--ablation", "mean"] + ref + abl),
        (
            "taylor",
            r
            + he
            + [
                "--select",
                "all",
                "--mode",
                "regular",
                "--sample-max-tokens",
                "40",
                "--num-iters",
                "2",
                "--prune-per-iter",
                "20",
                "--heldout",
                "1",
            ],
        ),
        (
            "taylor",
            r
            + mb
            + [
                "--mode",
                "regular",
                "--source",
                "reference",
                "--num-samples",
                "3",
                "--sample-max-tokens",
                "40",
                "--num-iters",
                "2",
                "--prune-per-iter",
                "30",
                "--heldout",
                "1",
            ],
        ),
    ]


def run_stages(root: Path) -> Path:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for stage, argv in stages(root):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                importlib.import_module(f"btp.{stage}").main(argv)
    finally:
        torch.set_num_threads(threads)
    return root


def _strip(obj, root: str):
    """Provenance and timings dropped (`time_*` keys too), the scratch root written as `<root>`."""
    if isinstance(obj, dict):
        return {k: _strip(v, root) for k, v in obj.items() if k not in VOLATILE and not k.startswith("time_")}
    if isinstance(obj, list):
        return [_strip(v, root) for v in obj]
    if isinstance(obj, str):
        return obj.replace(root, "<root>")
    return obj


def _order(records: list) -> list:
    """Evaluations are appended as the parallel judges finish: compare them in (problem, sample) order."""
    if all(isinstance(r, dict) and "problem_id" in r and "sample" in r for r in records):
        return sorted(records, key=lambda r: (str(r["problem_id"]), r["sample"]))
    return records


def canonical(root: Path) -> dict[str, object]:
    """Relative path -> canonical content: npz -> {name: array} (provenance dropped), json -> stripped object,
    jsonl -> list of stripped records. Runs files are provenance only and left out."""
    out: dict[str, object] = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.name.endswith(".runs.json"):
            continue
        rel = p.relative_to(root).as_posix()
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                out[rel] = {k: z[k] for k in z.files if k != "provenance"}
        elif p.suffix == ".json":
            out[rel] = _strip(json.loads(p.read_text()), str(root))
        elif p.suffix == ".jsonl":
            out[rel] = _order(
                [_strip(json.loads(line), str(root)) for line in p.read_text().splitlines() if line.strip()]
            )
    return out


def write_fixture(root: Path, dest: Path) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    for rel, content in canonical(root).items():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, dict) and rel.endswith(".npz"):
            np.savez_compressed(target, **content)
        else:
            target.with_suffix(target.suffix + ".canon.json").write_text(
                json.dumps(content, indent=1, sort_keys=True) + "\n"
            )


def read_fixture(src: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    for p in sorted(src.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(src).as_posix()
        if rel.endswith(".npz"):
            with np.load(p, allow_pickle=False) as z:
                out[rel] = {k: z[k] for k in z.files}
        elif rel.endswith(".canon.json"):
            # stripped again: keys made volatile after the fixture was written drop out on both sides
            out[rel[: -len(".canon.json")]] = _strip(json.loads(p.read_text()), "\0")
    return out


def differences(before: dict[str, object], after: dict[str, object]) -> list[str]:
    """Readable differences; empty when the trees are equal (npz bitwise, JSON exactly)."""
    diffs = [f"missing after: {k}" for k in sorted(before.keys() - after.keys())]
    diffs += [f"new after: {k}" for k in sorted(after.keys() - before.keys())]
    for k in sorted(before.keys() & after.keys()):
        b, a = before[k], after[k]
        if k.endswith(".npz"):
            for name in sorted(b.keys() | a.keys()):
                if name not in a or name not in b:
                    diffs.append(f"{k}: array {name} only {'before' if name in b else 'after'}")
                elif b[name].dtype != a[name].dtype or b[name].shape != a[name].shape:
                    diffs.append(f"{k}:{name}: {b[name].dtype}{b[name].shape} -> {a[name].dtype}{a[name].shape}")
                elif b[name].tobytes() != a[name].tobytes():
                    diffs.append(f"{k}:{name}: values differ")
        else:
            a = json.loads(json.dumps(a, sort_keys=True))  # the fixture went through JSON: compare like with like
            if a != b:
                diffs.append(f"{k}: content differs: {_first_diff(b, a)}")
    return diffs


def _first_diff(b, a, path: str = "") -> str:
    if isinstance(b, dict) and isinstance(a, dict):
        for key in sorted(b.keys() | a.keys()):
            if b.get(key, "<absent>") != a.get(key, "<absent>"):
                return _first_diff(b.get(key, "<absent>"), a.get(key, "<absent>"), f"{path}.{key}")
    if isinstance(b, list) and isinstance(a, list) and len(b) == len(a):
        for i, (x, y) in enumerate(zip(b, a)):
            if x != y:
                return _first_diff(x, y, f"{path}[{i}]")
    return f"{path or '<root>'}: {str(b)[:200]} != {str(a)[:200]}"


if __name__ == "__main__":  # python tests/house_equivalence.py write DEST [SCRATCH]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's btp, not an installed one
    if len(sys.argv) < 3 or sys.argv[1] != "write":
        sys.exit("usage: python tests/house_equivalence.py write DEST [SCRATCH]")
    scratch = Path(sys.argv[3] if len(sys.argv) > 3 else "/tmp/house_equivalence")
    if scratch.exists():
        shutil.rmtree(scratch)
    write_fixture(run_stages(scratch), Path(sys.argv[2]))
