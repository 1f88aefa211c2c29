"""Walls of the house (docs: /work/shared/DESIGN.md), checked on the sources so that a regression fails here:
only `heads` registers hooks on models or tensors (or swaps a module's forward), only `arch` and `scoring` unpack
what a Hugging Face model returns, core rooms never import a stage and stages never import each other."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

BTP = Path(__file__).resolve().parent.parent / "btp"
SOURCES = sorted(p for p in BTP.rglob("*.py") if "__pycache__" not in p.parts)

HOOKS = re.compile(r"\.register_\w*hook\s*\(|\bregister_module_\w+\s*\(")
HOOK_OWNERS = {"heads.py"}
# attributes of transformers ModelOutput / GenerateOutput records
HF_OUTPUT_ATTRS = {
    "logits",
    "hidden_states",
    "last_hidden_state",
    "past_key_values",
    "attentions",
    "loss",
    "sequences",
    "scores",
    "cross_attentions",
    "router_logits",
}
# positional unpacking of a model output held in one of these names (`out[0]`): tuples of HF models
OUTPUT_NAMES = {"out", "outs", "output", "outputs", "model_out", "model_output"}
OUTPUT_OWNERS = {"arch.py", "scoring.py"}
CORE = {
    "store",
    "results",
    "models",
    "arch",
    "heads",
    "headsets",
    "scoring",
    "prompts",
    "sandbox",
    "stats",
    "samples",
    "data",
    "cli",
    "service",
    "sweepfile",
    "pruning",
}
STAGES = {
    "generate",
    "evaluate",
    "entropy_lens",
    "ablation",
    "taylor",
    "cmaes_search",
    "circuits",
    "pruned",
    "check",
    "plots",
    "merge",
    "sweep",
}


def _rel(p: Path) -> str:
    return str(p.relative_to(BTP))


def test_sources_found():
    names = {_rel(p) for p in SOURCES}
    assert {"heads.py", "arch.py", "scoring.py", "headsets.py", "ablation.py"} <= names


def test_only_heads_registers_hooks():
    bad = []
    for p in SOURCES:
        if _rel(p) in HOOK_OWNERS:
            continue
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if HOOKS.search(line) or re.search(r"\.forward\s*=(?!=)", line):
                bad.append(f"{_rel(p)}:{i}: {line.strip()}")
    assert not bad, "hooks (or forward swaps) outside btp/heads.py:\n" + "\n".join(bad)


def _output_unpacking(tree: ast.AST) -> list[tuple[int, str]]:
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in HF_OUTPUT_ATTRS:
            hits.append((node.lineno, f".{node.attr}"))
        elif (
            isinstance(node, ast.Subscript)
            and isinstance(node.value, ast.Name)
            and node.value.id in OUTPUT_NAMES
            and isinstance(node.slice, ast.Constant)
            and isinstance(node.slice.value, int)
        ):
            hits.append((node.lineno, f"{node.value.id}[{node.slice.value}]"))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and node.args[1].value in HF_OUTPUT_ATTRS
        ):
            hits.append((node.lineno, f"{node.func.id}(.., {node.args[1].value!r})"))
    return sorted(hits)


def test_only_arch_and_scoring_unpack_model_outputs():
    bad = []
    for p in SOURCES:
        if _rel(p) in OUTPUT_OWNERS:
            continue
        bad += [f"{_rel(p)}:{line}: {what}" for line, what in _output_unpacking(ast.parse(p.read_text()))]
    assert not bad, "HF model outputs unpacked outside btp/arch.py and btp/scoring.py:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "src, found",
    [
        ("x = model(ids).logits", [".logits"]),
        ("h = out[0]", ["out[0]"]),
        ("h = getattr(o, 'hidden_states')", ["getattr(.., 'hidden_states')"]),
        ("c = o.outputs[0]\nrow = out[:, 3:]", []),  # vLLM request outputs, tensor slicing: not HF records
    ],
)
def test_output_scan_itself(src, found):
    assert [w for _, w in _output_unpacking(ast.parse(src))] == found


def _imports(p: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(p.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("btp."):
            out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("btp.")}
    return out


def test_core_never_imports_a_stage():
    bad = [
        f"{_rel(p)} imports {sorted(_imports(p) & STAGES)}"
        for p in SOURCES
        if p.parent == BTP and p.stem in CORE and _imports(p) & STAGES
    ]
    assert not bad, "\n".join(bad)


def test_stages_never_import_each_other():
    bad = [
        f"{_rel(p)} imports {sorted((_imports(p) & STAGES) - {p.stem})}"
        for p in SOURCES
        if p.parent == BTP and p.stem in STAGES and (_imports(p) & STAGES) - {p.stem}
    ]
    assert not bad, "\n".join(bad)


def test_headsets_is_core():
    assert not _imports(BTP / "headsets.py") & STAGES
