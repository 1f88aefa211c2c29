"""btp.sweep: a sweep file expanded into the stages' own command lines with dependencies; run on a local Ray
instance it writes the same results tree as run serially; a rerun skips every job (each stage's `--check-done`);
a failing job is retried by Ray and reported, its dependents blocked; check shows the progress."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from house_equivalence import canonical

from btp import check, results, sweep, sweepfile
from btp.store import UserError

pytestmark = pytest.mark.slow


def _write(tmp_path: Path, text: str, name: str = "t.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# ---------------------------------------------------------------- the plan


PLAN = """
results_dir: {root}
models: [m1, org/m2]
datasets: [humaneval]
modes: [regular, chain_code]
retries: 2
stages:
  cmaes_search: {{num_samples: 2}}
  generate: {{backend: hf, limit: 2, resources: {{num_cpus: 2}}}}
  evaluate: {{workers: 1}}
  entropy_lens: {{source: reference, layers: [0, 1], no_progress: true, greedy: false}}
  abl-mean: {{stage: ablation, ablation: mean, select: all}}
  taylor: {{}}
"""


def test_plan_expands_models_datasets_modes_stages(tmp_path):
    sw = sweepfile.load(_write(tmp_path, PLAN.format(root=tmp_path / "r")))
    assert sw.name == "t" and sw.retries == 2 and sw.results_dir == str(tmp_path / "r")
    ids = [j.id for j in sw.jobs]
    # per model: generate, evaluate, then 2 modes of each analysis, in dependency order whatever the file's order
    assert len(ids) == 2 * (2 + 4 * 2) and ids[:2] == ["generate/m1/humaneval", "evaluate/m1/humaneval"]
    assert "taylor/org--m2/humaneval/chain_code" in ids
    pos = {j: i for i, j in enumerate(ids)}
    for j in sw.jobs:
        assert all(pos[a] < pos[j.id] for a in j.after), j  # topological
    job = {j.id: j for j in sw.jobs}
    assert job["evaluate/m1/humaneval"].after == ("generate/m1/humaneval",)
    assert job["entropy_lens/m1/humaneval/regular"].after == ()  # references need no generation
    assert job["abl-mean/m1/humaneval/chain_code"].after == ("evaluate/m1/humaneval",)
    assert job["cmaes_search/m1/humaneval/regular"].after == (
        "evaluate/m1/humaneval",
        "taylor/m1/humaneval/regular",  # its warm start reads Taylor and ablation outputs of its mode
        "abl-mean/m1/humaneval/regular",
    )
    assert (job["generate/m1/humaneval"].level, job["taylor/m1/humaneval/regular"].level) == (0, 2)
    assert job["cmaes_search/m1/humaneval/regular"].level == 3
    assert job["generate/m1/humaneval"].resources == {"num_cpus": 2}
    lens = job["entropy_lens/org--m2/humaneval/chain_code"]
    assert lens.command() == [
        "python",
        "-m",
        "btp.entropy_lens",
        "--model",
        "org/m2",
        "--dataset",
        "humaneval",
        "--results-dir",
        str(tmp_path / "r"),
        "--mode",
        "chain_code",
        "--source",
        "reference",
        "--layers",
        "0,1",
        "--no-progress",
    ]
    assert job["abl-mean/m1/humaneval/regular"].stage == "ablation"
    # a job survives the plan file (Ray tasks and check read it), and a shard becomes the stage's --shard
    assert sweepfile.Job.from_json(lens.to_json()) == lens
    sharded = sweepfile.Job(lens.id, lens.stage, lens.argv, shard=(1, 4))
    assert sharded.command()[-2:] == ["--shard", "1/4"]
    assert sweep.resources(lens, gpus=True) == {"num_gpus": 1}
    assert sweep.resources(lens, gpus=False) == {"num_cpus": 1}
    assert sweep.resources(job["evaluate/m1/humaneval"], gpus=True) == {"num_cpus": 1}


@pytest.mark.parametrize(
    "body, says",
    [
        ("models: [m]\ndatasets: [humaneval]\nstages: {pruned: {}}", "not sweepable"),
        ("models: [m]\ndatasets: [nope]\nstages: {generate: {}}", "unknown datasets nope"),
        ("models: [m]\ndatasets: [humaneval]\nstages: {generate: {model: x}}", "set by the sweep"),
        ("models: [m]\ndatasets: [humaneval]\nstages: {taylor: {shards: 4}}", "--shard and btp.merge"),
        ("models: [m]\ndatasets: [humaneval]\nstage: {generate: {}}", "unknown key stage"),
        ("datasets: [humaneval]\nstages: {generate: {}}", "`models` must be"),
        ("models: [m]\ndatasets: [humaneval]\nmodes: [fast]\nstages: {generate: {}}", "unknown modes fast"),
    ],
)
def test_plan_errors_name_what_to_do(tmp_path, body, says):
    with pytest.raises(UserError, match=says):
        sweepfile.load(_write(tmp_path, body))


# ---------------------------------------------------------------- running it


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance (2 CPUs) for the module; the sweep uses it and leaves it running."""
    ray = pytest.importorskip("ray")
    os.environ["OMP_NUM_THREADS"] = "1"  # the serial run's and the tasks' torch threads alike
    # the raylet must register within 30 s (fixed in ray's node.py, 120 s on the GCS side): on a busy shared machine
    # that can fail, so a few tries
    os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")
    for attempt in range(3):
        try:
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    yield ray
    ray.shutdown()


SWEEP = """
results_dir: {root}
models: [{model}]
datasets: [humaneval]
modes: [regular]
stages:
  generate: {{backend: hf, limit: 1, max_tokens: 8}}
  evaluate: {{workers: 1, n_boot: 100}}
  entropy_lens: {{source: reference, num_samples: 1, no_progress: true}}
  lens-all: {{stage: entropy_lens, select: all, num_samples: 1, no_progress: true}}
"""


def _tree(root: Path) -> dict:
    return {k: v for k, v in canonical(root).items() if not k.startswith(results.SWEEPS + "/")}


def _outputs(root: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in root.rglob("*") if p.is_file() and results.SWEEPS not in p.parts}


def test_ray_sweep_equals_serial_rerun_skips(tiny_folder, ray_local, tmp_path, capsys):
    import numpy as np

    serial, distributed = tmp_path / "serial", tmp_path / "ray"
    f_serial = _write(tmp_path, SWEEP.format(root=serial, model=tiny_folder), "s.yaml")
    f_ray = _write(tmp_path, SWEEP.format(root=distributed, model=tiny_folder), "s2.yaml")
    assert sweep.main([str(f_ray), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 jobs" in out and "$ python -m btp.evaluate" in out and not distributed.exists()  # a plan, no files

    assert sweep.main([str(f_serial)]) == 0
    assert sweep.main([str(f_ray), "--ray", "auto"]) == 0  # the running instance
    out = capsys.readouterr().out
    assert "4 done of 4 jobs" in out, out
    a, b = _tree(serial), _tree(distributed)
    assert sorted(a) == sorted(b)
    names = "\n".join(sorted(a))
    for f in ("humaneval/generations.jsonl", "evaluations.jsonl", "entropy/regular-reference.npz"):
        assert f in names
    assert "entropy/regular-all.npz" in names
    for k in a:
        if isinstance(a[k], dict) and k.endswith(".npz"):
            assert sorted(a[k]) == sorted(b[k]) and all(np.array_equal(a[k][x], b[k][x]) for x in a[k]), k
        else:
            assert a[k] == b[k], k

    before = _outputs(distributed)
    assert sweep.main([str(f_ray), "--ray", "auto"]) == 0
    out = capsys.readouterr().out
    assert "4 skipped of 4 jobs" in out, out
    assert _outputs(distributed) == before  # nothing rewritten
    job = f"lens-all/{results.model_slug(str(tiny_folder))}/humaneval/regular"
    log = results.job_log_path(distributed, "s2", job).read_text()
    # asked first, then run; on the rerun only asked
    assert log.count("--check-done\n") == 2 and log.count("btp.entropy_lens: not done") == 1

    assert check.main(["--results-dir", str(distributed)]) == 0
    assert "sweep s2: 4/4 done, 0 running, 0 failed" in capsys.readouterr().out


def test_failing_job_retried_on_ray_and_reported(tiny_folder, ray_local, tmp_path, capsys):
    root = tmp_path / "r"
    f = _write(
        tmp_path,
        f"results_dir: {root}\nmodels: [{tiny_folder}]\ndatasets: [humaneval]\nretries: 1\n"
        "stages:\n  generate: {backend: hf, limit: 1, no_such_flag: 3}\n  evaluate: {}\n",
    )
    assert sweep.main([str(f), "--ray", "auto"]) == 1
    out = capsys.readouterr().out
    slug = results.model_slug(str(tiny_folder))
    gen, ev = f"generate/{slug}/humaneval", f"evaluate/{slug}/humaneval"
    row = next(line for line in out.splitlines() if line.startswith(gen))
    assert row.split()[1:3] == ["failed", "2"], out  # first try and one retry
    assert next(line for line in out.splitlines() if line.startswith(ev)).split()[1] == "blocked"
    log = results.job_log_path(root, "t", gen).read_text()
    assert log.count("=== failed (exit 2") == 2 and "unrecognized arguments: --no-such-flag" in log
    assert check.main(["--sweep", str(f)]) == 0
    progress = capsys.readouterr().out
    assert "0/2 done, 0 running, 1 failed, 1 blocked" in progress and f"failed   {gen} (exit 2, 2 tries)" in progress
