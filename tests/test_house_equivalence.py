"""The "one house" refactor changed nothing: every stage, run on the embedded default with the same inputs, writes
what main wrote before the change (tests/fixtures/house_before/, from tests/house_equivalence.py at 235863d):
npz arrays bitwise, JSON and JSONL equal apart from times and provenance stamps. Rewritten once since, when the
default attention kernel became SDPA (eager before): every number within 8.6e-5 nats of the eager fixture (lens KL of
early layers, 2e-5 relative), every discrete output (pruned heads, knockout order) the same. Rewritten again for
issue 20's names (no number moved, checked against the old fixture with the renames applied): the lens's `layer` as
block indices (0..L-1, was 1..L), `layer_numbering` in every analysis stamp, Taylor's `scoring_loss_before`,
`heldout_loss_after`, `n_alive_after`, and the Wilson interval beside pass@k's bootstrap.

A change that is meant to move numbers (a fixed population, a new default) rewrites the fixture in its own commit
(`python tests/house_equivalence.py write tests/fixtures/house_before`) and says why."""

from __future__ import annotations

from pathlib import Path

import pytest
from house_equivalence import canonical, differences, read_fixture, run_stages

FIXTURE = Path(__file__).parent / "fixtures" / "house_before"


@pytest.mark.slow
def test_every_stage_writes_what_it_wrote_before(tmp_path):
    before = read_fixture(FIXTURE)
    assert len(before) >= 20, "fixture missing or truncated"
    after = canonical(run_stages(tmp_path / "results"))
    diffs = differences(before, after)
    assert not diffs, "outputs changed:\n" + "\n".join(diffs[:40])


def test_differences_sees_a_one_ulp_change_and_a_json_change():
    import numpy as np

    a = {"x/e.npz": {"v": np.array([1.0, 2.0], np.float32)}, "x/s.json": {"k": [1, 2]}}
    b = {"x/e.npz": {"v": np.nextafter(np.array([1.0, 2.0], np.float32), np.float32(3))}, "x/s.json": {"k": [1, 3]}}
    d = differences(a, b)
    assert any("e.npz:v" in x for x in d) and any("s.json" in x and "[1]" in x for x in d)
    assert differences(a, a) == []
