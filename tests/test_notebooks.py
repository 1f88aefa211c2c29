"""The four notebooks, executed top to bottom with nbclient on a real results tree (tests/results_tree.py): each
produces its figures; on a tree without analysis outputs they say so instead of failing; they are thin (call
btp.plots), take the results dir and model from a `parameters` cell, and never run a stage."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from results_tree import model_dir, results_tree, tree_copy  # noqa: F401  (session fixture)

NB_DIR = Path(__file__).resolve().parent.parent / "notebooks"
# notebook -> the smallest number of figures it must show on the test tree (counted from what the tree holds:
# generation 4; entropy 4 outputs x 3 + modes 1 + populations 2 + datasets 1; ablation 2 x 3 + overlap 1;
# Taylor 3; CMA-ES 5: fitness, sigma, mask, mask changes, controls)
NOTEBOOKS = {"generation_analysis": 4, "entropy_analysis": 16, "head_ablation_analysis": 7, "optimization_analysis": 8}


def execute(
    name: str, results_dir: Path | None, model: str = "smollm2-135m", cwd: Path = NB_DIR, **params: object
) -> nbformat.NotebookNode:
    """Run a notebook top to bottom in `cwd` (Jupyter's default: the notebook's folder) with RESULTS_DIR (None:
    the notebook's own default), MODEL and any other `params` injected after its `parameters` cell, as papermill
    would."""
    nb = nbformat.read(NB_DIR / f"{name}.ipynb", as_version=4)
    i = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    values = {**({"RESULTS_DIR": str(results_dir)} if results_dir is not None else {}), "MODEL": model, **params}
    inj = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in values.items()))
    inj.metadata["tags"] = ["injected-parameters"]  # as papermill would inject them
    nb.cells.insert(i + 1, inj)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def outputs(nb) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


def n_images(nb) -> int:
    return sum("image/png" in o.get("data", {}) for o in outputs(nb))


def printed(nb) -> str:
    return "".join(o.get("text", "") for o in outputs(nb) if o.get("output_type") == "stream")


@pytest.mark.parametrize("name", list(NOTEBOOKS))
def test_notebook_is_thin_and_parametrised(name):
    nb = nbformat.read(NB_DIR / f"{name}.ipynb", as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and "RESULTS_DIR" in params[0].source and "MODEL" in params[0].source
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "bp.show(" in code and "import btp.plots as bp" in code
    # never runs a stage: no stage imports, no subprocesses, no shell escapes
    stages = r"(generate|evaluate|entropy_lens|ablation|taylor|cmaes_search)\b"
    assert not re.search(
        rf"(import|from)\s+btp\.{stages}|from\s+btp\s+import\s+.*{stages}|subprocess|os\.system"
        r"|^\s*[!%]",
        code,
        re.M,
    ), name
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit notebooks without outputs"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(NOTEBOOKS))
def test_notebook_runs_and_shows_figures(name, results_tree):
    nb = execute(name, results_tree)
    assert not [o for o in outputs(nb) if o.get("output_type") == "error"]
    assert n_images(nb) >= NOTEBOOKS[name], (name, n_images(nb), printed(nb))
    assert "No results to show" not in printed(nb)


@pytest.mark.slow
def test_notebooks_say_when_results_are_absent(results_tree, tmp_path):
    root = tree_copy(results_tree, tmp_path / "t")
    for d in model_dir(root).iterdir():  # generations and evaluations only
        for stage in ("entropy", "ablation", "taylor", "cmaes"):
            shutil.rmtree(d / stage, ignore_errors=True)
    expect = {
        "entropy_analysis": "No entropy-lens outputs",
        "head_ablation_analysis": "No ablation outputs",
        "optimization_analysis": "No Taylor pruning outputs",
    }
    for name, msg in expect.items():
        nb = execute(name, root)
        assert n_images(nb) == 0 and msg in printed(nb), (name, printed(nb))
        if name == "optimization_analysis":
            assert "No CMA-ES search outputs" in printed(nb)
    nb = execute("generation_analysis", tmp_path / "missing")  # no results dir at all
    assert n_images(nb) == 0 and "No results to show" in printed(nb)


@pytest.mark.slow
def test_notebook_opened_from_notebooks_dir_finds_the_repository_results(results_tree, tmp_path):
    """Jupyter starts the kernel in notebooks/: the default RESULTS_DIR = "results" is the repository's results/,
    not notebooks/results (a checkout laid out as this one: pyproject.toml, btp/, notebooks/, results/)."""
    repo = tmp_path / "repo"
    (repo / "btp").mkdir(parents=True)
    (repo / "pyproject.toml").write_text("[project]\nname = 'btp'\n")
    (repo / "notebooks").mkdir()
    tree_copy(results_tree, repo / "results")
    nb = execute("generation_analysis", None, cwd=repo / "notebooks")
    assert not [o for o in outputs(nb) if o.get("output_type") == "error"]
    assert n_images(nb) >= NOTEBOOKS["generation_analysis"], printed(nb)
    assert "No results to show" not in printed(nb) and "verdicts, 2 problems" in printed(nb)


@pytest.mark.slow
def test_generation_notebook_beside_the_reference_self_check(results_tree, tmp_path):
    """The README's flow leaves `evaluate --reference` beside the model: MODEL = None still means the only model,
    and the notebook names the self-check instead of plotting it as a model."""
    root = tree_copy(results_tree, tmp_path / "t")
    ref = root / "reference" / "mbpp"  # the model's judged files, filed as the self-check's
    ref.mkdir(parents=True)
    for f in ("evaluations.jsonl", "summary.json"):
        shutil.copy(model_dir(results_tree) / "mbpp" / f, ref / f)
    nb = execute("generation_analysis", root, model=None)
    assert not [o for o in outputs(nb) if o.get("output_type") == "error"]
    assert n_images(nb) >= NOTEBOOKS["generation_analysis"], printed(nb)
    assert "Not shown below: the reference self-check (btp.evaluate --reference): mbpp " in printed(nb), printed(nb)
