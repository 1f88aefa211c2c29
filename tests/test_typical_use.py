"""The README's "Typical use" block, run top to bottom on a fresh results tree: every command must exit 0 without a
traceback and write what it says it writes.

The commands are read from README.md (the fenced block under `### Typical use`), so the README and this test cannot
drift apart. What differs from the README, and why, is all below: model ids become tiny local models (`MODELS`), a
hub-only flag becomes the local fixture (`REPLACE`), and each stage gets size limits (`ADD`, flags appended after
the README's own, so they win). Each command runs as a subprocess in a fresh working directory, so the README's
`results/` and `figures/` resolve there.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_tiny

from btp.results import REFERENCE

ROOT = Path(__file__).resolve().parent.parent
LCB = ROOT / "tests" / "fixtures" / "lcb_mini.jsonl"

# README model ids -> the local stand-ins built below. `M` is the model under study (a tiny random Llama with the
# embedded tokenizer: enough layers and heads for `heads:L3H1` and `ablation:top32`); the circuit comparison needs
# two models of one architecture: M and a second seed.
MODELS = {
    "M": "tiny",
    "Qwen/Qwen2.5-Coder-1.5B-Instruct": "tiny",
    "Qwen/Qwen2.5-Math-1.5B": "tiny",
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": "other",
}
# hub-only flags -> local ones: (flag, its value)
REPLACE = {"--release": ("--data-file", str(LCB))}

# Per-stage flags appended to the README's (argparse keeps the last value). The tiny model solves nothing, so the
# analyses use the reference solutions (`--source reference`) instead of the default correct generations.
CAP = "--sample-max-tokens"  # the analyses' per-sample context cap
SAMPLES = ["--source", "reference", "--num-samples", "2", CAP, "64", "--no-progress"]
ADD = {
    "generate": ["--limit", "2", "--n", "2", "--max-tokens", "16", "--backend", "hf"],
    "evaluate": ["--limit", "2", "--n-boot", "200"],
    "entropy_lens": SAMPLES,
    "ablation": SAMPLES
    + ["--knockout-ks", "1,2", "--random-seeds", "1", "--greedy-candidates", "3"]
    + ["--n-boot", "100"],
    "taylor": SAMPLES + ["--num-iters", "2", "--heldout", "1"],
    "pruned": ["--limit", "2", "--n", "1", "--max-tokens", "16", "--backend", "hf", "--controls", "1"]
    + ["--num-samples", "2", "--sample-max-tokens", "64", "--n-boot", "100"],  # its CE samples' cap
    "circuits": ["--n-boot", "100"],
    "cmaes_search": SAMPLES + ["--max-generations", "2", "--popsize", "4", "--n-boot", "100"],
}

# stage -> what each command must leave behind (globs under its working directory; {dataset} per --dataset entry,
# {model} the model's folder, or the reference self-check's for `evaluate --reference`)
EXPECT = {
    "generate": ["results/{model}/{dataset}/generations.jsonl"],
    "evaluate": ["results/{model}/{dataset}/evaluations.jsonl", "results/{model}/{dataset}/summary.json"],
    "entropy_lens": ["results/{model}/{dataset}/entropy/*.npz"],
    "ablation": ["results/{model}/{dataset}/ablation/*.npz", "results/{model}/{dataset}/ablation/*_knockout.json"],
    "taylor": ["results/{model}/{dataset}/taylor/*.jsonl"],
    "pruned": ["results/{model}/{dataset}/pruned/comparison.json"],
    "circuits": ["results/circuits/*.csv", "results/circuits/*.npz"],
    "cmaes_search": ["results/{model}/{dataset}/cmaes/*.json"],
    "plots": ["figures/*.png"],
}


# plots: the figure families the commands above must produce (substrings of the file names)
FIGURES = ("generation_pass_at_k", "entropy_", "ablation_", "taylor_", "cmaes_", "pruned_", "circuits_")


def typical_use() -> list[str]:
    """The command lines of the README's "Typical use" block."""
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^### Typical use\n+```bash\n(.*?)^```", text, re.M | re.S)
    assert m, "README.md has no ```bash block under '### Typical use'"
    return [ln for ln in m.group(1).splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def stage_of(argv: list[str]) -> str:
    """`python -m btp.taylor ...` -> `taylor`; `./run_check.sh` -> `run_check.sh`."""
    return argv[2].removeprefix("btp.") if argv[:2] == ["python", "-m"] else Path(argv[0]).name


def localize(line: str, models: dict[str, str]) -> list[str]:
    """A README command line as this test runs it (see the module doc)."""
    argv, out = shlex.split(line, comments=True), []
    it = iter(argv)
    for a in it:
        if a in REPLACE:
            next(it)  # the hub-only value
            out += REPLACE[a]
        else:
            out.append(models.get(a, a))
    stage = stage_of(argv)
    out += ADD.get(stage, [])
    if out[:2] == ["python", "-m"]:
        out[0] = sys.executable
    elif out[0].startswith("./"):
        out[0] = str(ROOT / out[0])
    return out


def expected(stage: str, argv: list[str]) -> list[str]:
    ds = argv[argv.index("--dataset") + 1].split(",") if "--dataset" in argv else [""]
    model = REFERENCE if "--reference" in argv else "*"
    return [g.format(dataset=d, model=model) for g in EXPECT.get(stage, []) for d in ds]


def test_readme_block_is_read_and_every_model_is_replaced():
    lines = typical_use()
    stages = [stage_of(shlex.split(ln, comments=True)) for ln in lines]
    assert stages[0] == "generate" and "plots" in stages and stages[-1] == "run_check.sh", stages
    # every model id the README names is one this test replaces (a new id in the README must be added above)
    for ln in lines:
        argv = shlex.split(ln, comments=True)
        for flag in ("--model", "--base", "--other"):
            if flag in argv:
                assert argv[argv.index(flag) + 1] in MODELS, (flag, ln)
    # each stage the README runs has its size limits or needs none
    assert set(stages) - set(ADD) <= {"plots", "run_check.sh"}, set(stages) - set(ADD)
    argv = localize("python -m btp.generate --model M --dataset livecodebench --release v6  # x", {"M": "/m"})
    assert argv[1:] == ["-m", "btp.generate", "--model", "/m", "--dataset", "livecodebench"] + [
        "--data-file",
        str(LCB),
        *ADD["generate"],
    ]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from btp.models import load_tokenizer

    tok = load_tokenizer()
    root = tmp_path_factory.mktemp("typical")
    shape = dict(num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4, head_dim=8)
    out = {}
    for name, seed in (("tiny", 0), ("other", 1)):
        m = make_tiny("llama", seed, vocab_size=len(tok), max_position_embeddings=4096, **shape)
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = str(root / name)
    return out


@pytest.mark.slow
def test_typical_use_runs_top_to_bottom(tiny_models, tmp_path):
    models = {k: tiny_models[v] for k, v in MODELS.items()}
    work = tmp_path / "work"
    work.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for line in typical_use():
        argv = localize(line, models)
        stage = stage_of(shlex.split(line, comments=True))
        t0 = time.time()
        p = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=600)
        print(f"[typical use] {time.time() - t0:6.1f} s  {line.split('#')[0].strip()}", file=sys.stderr)
        said = f"{shlex.join(argv)}\n--- stdout\n{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-3000:]}"
        assert p.returncode == 0, said
        assert "Traceback" not in p.stderr and "error:" not in p.stderr, said
        for g in expected(stage, argv):
            assert list(work.glob(g)), f"{g} missing after\n{said}"
        if stage == "plots":  # a figure of every family the commands above feed, none empty
            figs = [f.name for f in work.glob("figures/*.png") if f.stat().st_size > 0]
            for family in FIGURES:
                assert any(family in f for f in figs), (family, sorted(figs))
            assert "not plotted: the reference self-check (btp.evaluate --reference): mbpp 2/2 pass" in p.stderr, said
        if stage == "run_check.sh":  # every model and the self-check, nothing broken, stale or cut short
            print(p.stdout, file=sys.stderr)
            assert f"model {Path(models['M']).parent.name}--tiny" in p.stdout, said
            assert "reference solutions (harness self-check)" in p.stdout, said
            assert not re.search(r"^(BROKEN|STALE|INCOMPLETE|TORN) ", p.stdout, re.M), said
