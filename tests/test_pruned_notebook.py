"""notebooks/pruned_analysis.ipynb, executed with nbclient on a results tree holding a pruned comparison (made by
the stage's own run with a fake generate/evaluate, tests/test_pruned.py), and on one without: thin, parametrised,
never runs a stage."""

from __future__ import annotations

import re

import nbformat
import pytest
from test_notebooks import NB_DIR, execute, n_images, printed
from test_pruned import FakeRunner, _run

NAME = "pruned_analysis"


def test_notebook_is_thin_and_parametrised():
    nb = nbformat.read(NB_DIR / f"{NAME}.ipynb", as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and "RESULTS_DIR" in params[0].source and "MODEL" in params[0].source
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "bp.show(" in code and "import btp.plots as bp" in code
    assert not re.search(
        r"(import|from)\s+btp\.(pruned|generate|evaluate)\b|subprocess|os\.system|^\s*[!%]", code, re.M
    )
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit notebooks without outputs"


@pytest.mark.slow
def test_notebook_shows_the_comparison_and_says_when_absent(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(NB_DIR.parent))  # the kernel imports this checkout's btp
    _run(tmp_path / "r", FakeRunner(["HumanEval/0", "HumanEval/1", "HumanEval/2"]), loads=[])
    nb = execute(NAME, tmp_path / "r", model="org/m")
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("output_type") == "error"]
    assert n_images(nb) == 1 and "heads:L0H1,L2H3" in printed(nb) and "controls mean" in printed(nb), printed(nb)
    (tmp_path / "r" / "org--m" / "humaneval" / "pruned" / "comparison.json").unlink()
    nb = execute(NAME, tmp_path / "r", model="org/m")
    assert n_images(nb) == 0 and "No pruned-inference results" in printed(nb)
