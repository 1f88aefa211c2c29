"""notebooks/circuit_comparison.ipynb executed with nbclient on a real circuits output (the embedded SmolLM2 against a
copy with a few heads perturbed, plus an ablation output of the base so that the importance join shows), and the
circuit figures of btp.plots; on a tree without circuits the notebook says so instead of failing."""

from __future__ import annotations

import os
import re
from pathlib import Path

import nbformat
import numpy as np
import pytest
from results_tree import results_tree, tree_copy  # noqa: F401  (session fixture)
from test_circuits import perturbed_copy
from test_notebooks import execute as run_notebook
from test_notebooks import n_images, outputs  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
NB_DIR = ROOT / "notebooks"
NAME = "circuit_comparison"


@pytest.fixture(autouse=True)
def kernel_imports_this_checkout(monkeypatch):
    """The kernel imports the btp under test (this checkout), whatever the environment has installed."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def execute(results_dir: Path, base: str | None, other: str | None) -> nbformat.NotebookNode:
    return run_notebook(NAME, results_dir, BASE=base, OTHER=other)


def printed(nb) -> str:
    return "".join(o.get("text", "") for o in outputs(nb) if o.get("output_type") == "stream")


@pytest.fixture(scope="module")
def circuits_tree(tmp_path_factory):
    """results/ with the embedded model against a perturbed copy, and an ablation output of the base."""
    from btp import circuits as C
    from btp.models import resolve_model
    from btp.results import model_slug
    from btp.store import write_json, write_npz

    root = tmp_path_factory.mktemp("circ")
    ref = resolve_model("smollm2-135m")
    other = perturbed_copy(ref.path, root / "models" / "perturbed")
    res = root / "results"
    abl = res / model_slug(ref.model_id) / "humaneval" / "ablation"
    write_npz(abl / "regular.npz", delta_mean=np.random.default_rng(0).normal(size=(30, 9)))
    write_json(abl / "regular.json", {"mode": "regular"})
    C.run("smollm2-135m", str(other), res, C.CircuitConfig(n_boot=300), progress=False)
    return res, str(other)


def test_notebook_is_thin_and_parametrised():
    nb = nbformat.read(NB_DIR / f"{NAME}.ipynb", as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and all(k in params[0].source for k in ("RESULTS_DIR", "BASE", "OTHER"))
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "bp.show(" in code and "import btp.plots as bp" in code
    assert not re.search(r"(import|from)\s+btp\.circuits|subprocess|os\.system|^\s*[!%]", code, re.M)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit notebooks without outputs"


@pytest.mark.slow
def test_notebook_runs_and_shows_figures(circuits_tree):
    res, other = circuits_tree
    nb = execute(res, "smollm2-135m", other)
    assert not [o for o in outputs(nb) if o.get("output_type") == "error"]
    assert n_images(nb) == 3, printed(nb)  # heatmaps, rotary pairs, importance scatter
    text = printed(nb)
    assert "L3H4" in text and "relative position 0" in text
    nb = execute(res, "smollm2-135m", None)  # the only comparison of the base
    assert n_images(nb) == 3


@pytest.mark.slow
def test_notebook_says_when_absent(tmp_path):
    nb = execute(tmp_path / "none", "smollm2-135m", None)
    assert n_images(nb) == 0 and "No circuit comparison to show" in printed(nb)


@pytest.mark.slow
def test_plots_family(circuits_tree, tmp_path):
    import btp.plots as bp

    res, _ = circuits_tree
    names = [n for n, _ in bp.FAMILIES["circuits"](res, "smollm2-135m")]
    assert len(names) == 3 and names[0].endswith("_heatmaps") and "importance_0" in names[2]
    files = bp.write_figures(res, "smollm2-135m", tmp_path / "fig", families=["circuits"])
    assert len(files) == 3 and all(f.read_bytes().startswith(b"\x89PNG") for f in files)


@pytest.mark.slow
def test_join_with_real_analyses(results_tree, tmp_path):  # noqa: F811
    """The real ablation (humaneval, mbpp; layers 28-29 only) and Taylor outputs of the test tree are joined."""
    import json

    import btp.plots as bp
    from btp import circuits as C
    from btp.models import resolve_model

    root = tree_copy(results_tree, tmp_path / "t")  # a circuits dir beside the model would change the tree
    other = perturbed_copy(resolve_model("smollm2-135m").path, tmp_path / "p")
    paths = C.run(
        "smollm2-135m", str(other), root, C.CircuitConfig(null=False, random_baseline=False, n_boot=200), progress=False
    )
    joins = json.loads(paths["json"].read_text())["importance"]
    assert {(j["stage"], j["dataset"]) for j in joins} >= {
        ("ablation", "humaneval"),
        ("ablation", "mbpp"),
        ("taylor", "humaneval"),
    }
    for j in joins:
        assert "error" not in j and "error" not in j["ov_cos"], j
        assert j["ov_cos"]["ci_low"] <= j["ov_cos"]["diff"] <= j["ov_cos"]["ci_high"]
    abl = next(j for j in joins if j["stage"] == "ablation")
    assert abl["ov_cos"]["n_heads"] == 18  # the matrix covers layers 28-29 only: NaN rows skipped
    names = [n for n, _ in bp.FAMILIES["circuits"](root, "smollm2-135m")]
    assert len(names) == 2 + len(joins)
