"""The command line's face (issue 20): a user's mistake is one line `btp.<stage>: error: <what> — <what to do>`
and exit 2, Ctrl-C says what was saved and exits 130, result files follow the umask, `btp` lists and dispatches
the stages, and a mistake in check / plots never looks like success.

Every test runs the stages as a user does: `python -m btp.<stage>` in a subprocess, from the repository root."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
ONE_LINE = r"btp\.{stage}: error: [^\n]+ — [^\n]+"


def btp(*args: str, cwd: Path = ROOT, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env or ENV
    )


def error_line(r: subprocess.CompletedProcess, stage: str) -> str:
    """The one error line on stderr (warnings aside), after checking exit 2 and no traceback."""
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.startswith(f"btp.{stage}: ")]
    assert len(lines) == 1, r.stderr
    assert re.fullmatch(ONE_LINE.format(stage=stage), lines[0]), lines[0]
    return lines[0]


# ---------------------------------------------------------------- 1. one-line errors, exit 2


def test_bad_flag_combination():
    line = error_line(btp("btp.evaluate", "--dataset", "mbpp", "--reference", "--input", "x.jsonl"), "evaluate")
    assert "--reference and --input exclude each other" in line


def test_missing_input_file(tmp_path):
    line = error_line(btp("btp.evaluate", "--dataset", "mbpp", "--input", str(tmp_path / "nope.jsonl")), "evaluate")
    assert "nope.jsonl does not exist" in line


def test_missing_data_file(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"problem_id": "a", "sample": 0, "code": "x = 1"}) + "\n")
    line = error_line(
        btp(
            "btp.evaluate",
            "--dataset",
            "livecodebench",
            "--input",
            str(inp),
            "--data-file",
            str(tmp_path / "nope"),
            "--results-dir",
            str(tmp_path),
        ),
        "evaluate",
    )
    assert "--data-file" in line and "does not exist" in line


def test_unknown_dataset():
    line = error_line(btp("btp.evaluate", "--dataset", "mbp", "--reference"), "evaluate")
    assert "'mbp'" in line and "mbpp" in line
    line = error_line(btp("btp.generate", "--dataset", "mbpp,mbp"), "generate")
    assert "'mbp'" in line or "mbp " in line


def test_livecodebench_has_no_references():
    line = error_line(btp("btp.evaluate", "--dataset", "livecodebench", "--reference"), "evaluate")
    assert "no reference solutions" in line and "humaneval" in line


@pytest.mark.parametrize(
    "stage",
    [
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
    ],
)
def test_every_stage_says_a_bad_flag_in_one_line(stage):
    line = error_line(btp(f"btp.{stage}", "--no-such-flag"), stage)
    assert "--no-such-flag" in line and line.endswith(f"see python -m btp.{stage} --help")


def test_unknown_local_model(tmp_path):
    line = error_line(
        btp("btp.entropy_lens", "--model", str(tmp_path / "nope"), "--dataset", "mbpp", "--results-dir", str(tmp_path)),
        "entropy_lens",
    )
    assert "does not exist" in line


def test_unknown_hub_model_fails_fast(tmp_path):
    """A mistyped hub id with no network: one line at once, not after a minute of transformers' retries."""
    env = {**ENV, "HF_HOME": str(tmp_path / "hf")}  # an empty cache: the id cannot be there
    t0 = time.monotonic()
    r = btp(
        "btp.entropy_lens",
        "--model",
        "no-such-org/no-such-model-x",
        "--dataset",
        "mbpp",
        "--results-dir",
        str(tmp_path),
        env=env,
    )
    line = error_line(r, "entropy_lens")
    assert time.monotonic() - t0 < 30
    assert "no-such-org/no-such-model-x" in line
    assert (
        "not found locally and the hub is unreachable" in line or "not found on the hub" in line or "hub is off" in line
    )


def test_debug_shows_the_traceback(tmp_path):
    r = btp("btp.evaluate", "--dataset", "mbpp", "--input", str(tmp_path / "nope.jsonl"), "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr and "FileNotFoundError" in r.stderr


def _entry(body: str, *args: str) -> subprocess.CompletedProcess:
    """`cli.entry("demo", main)` with `main` raising what `body` raises."""
    code = f"import sys\nfrom btp import cli, store, results\ndef main():\n    {body}\ncli.entry('demo', main)"
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    "body",
    [
        "raise store.UserError('bad thing — do this')",
        "raise SystemExit('bad thing — do this')",
        "raise FileNotFoundError('x.jsonl does not exist — do this')",
    ],
)
def test_entry_says_user_errors_in_one_line(body):
    error_line(_entry(body), "demo")


@pytest.mark.parametrize(
    "body", ["raise KeyError('bug')", "raise ValueError('a bug, not a user error')", "raise TypeError('bug')"]
)
def test_entry_keeps_the_traceback_of_a_bug(body):
    r = _entry(body)
    assert r.returncode == 1 and "Traceback" in r.stderr and "btp.demo: error" not in r.stderr


def test_entry_interrupt_and_return_code():
    r = _entry("cli.interrupt_note(lambda: '3/5 done and saved; rerun to resume'); raise KeyboardInterrupt")
    assert r.returncode == 130 and r.stderr == "btp.demo: interrupted: 3/5 done and saved; rerun to resume\n"
    r = _entry("raise KeyboardInterrupt")  # before any output is claimed
    assert r.returncode == 130 and r.stderr == "btp.demo: interrupted: partial outputs are kept; rerun to resume\n"
    assert _entry("return 1").returncode == 1 and _entry("return None").returncode == 0


def _no_usable_samples(root: Path) -> None:
    from btp.results import dataset_dir

    d = dataset_dir(root, "HuggingFaceTB/SmolLM2-135M-Instruct-Q4_1-gguf", "mbpp")
    d.mkdir(parents=True, exist_ok=True)
    rec = {
        "problem_id": "mbpp/1",
        "sample": 0,
        "prompt_token_ids": [1, 2],
        "output_token_ids": [],
        "output": "",
        "code": "",
    }
    (d / "generations.jsonl").write_text(json.dumps(rec) + "\n")


@pytest.mark.slow
def test_too_few_samples(tmp_path):
    _no_usable_samples(tmp_path)
    line = error_line(
        btp("btp.entropy_lens", "--dataset", "mbpp", "--select", "all", "--results-dir", str(tmp_path)), "entropy_lens"
    )
    assert "no analysis samples" in line


@pytest.mark.slow
def test_layer_out_of_range(tmp_path):
    line = error_line(
        btp(
            "btp.ablation",
            "--dataset",
            "mbpp",
            "--source",
            "reference",
            "--select",
            "all",
            "--num-samples",
            "1",
            "--layers",
            "99",
            "--results-dir",
            str(tmp_path),
        ),
        "ablation",
    )
    assert "--layers [99] out of range" in line and "0..29" in line


# ---------------------------------------------------------------- 2. Ctrl-C: what was saved, exit 130, resume


def _judged(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip().endswith("}")]


@pytest.mark.slow
def test_ctrl_c_says_what_was_saved_and_resumes(tmp_path):
    """Programs that sleep (so that the interrupt lands mid-run); verdicts are saved every 2 s."""
    from btp import benchmarks
    from btp.results import evaluations_path

    n = 40
    inp = tmp_path / "slow.jsonl"
    ids = [p.problem_id for p in benchmarks.get("mbpp").load(limit=n)]
    inp.write_text(
        "".join(
            json.dumps({"problem_id": i, "sample": 0, "code": "import time\ntime.sleep(0.25)\n"}) + "\n" for i in ids
        )
    )
    out = evaluations_path(inp)
    cmd = [
        sys.executable,
        "-m",
        "btp.evaluate",
        "--dataset",
        "mbpp",
        "--input",
        str(inp),
        "--workers",
        "1",
        "--limit",
        str(n),
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(_judged(out)) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err, err
    m = re.search(rf"^btp\.evaluate: interrupted: (\d+)/{n} judged and saved in \S+; rerun to resume$", err, re.M)
    assert m, err[-2000:]
    saved = {(r["problem_id"], r["sample"]) for r in _judged(out)}
    assert int(m.group(1)) == len(saved) >= 3 and len(saved) < n
    # a rerun judges only the rest
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"{len(saved)} already judged, {n - len(saved)} to run" in r.stderr
    assert len(_judged(out)) == n


@pytest.mark.slow
def test_ctrl_c_in_generate_counts_the_saved_samples(tmp_path):
    out = tmp_path / "gens.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "btp.generate",
        "--model",
        "smollm2-135m",
        "--dataset",
        "mbpp",
        "--backend",
        "hf",
        "--limit",
        "40",
        "--batch-size",
        "1",
        "--max-tokens",
        "4",
        "--output",
        str(out),
        "--device",
        "cpu",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while len(_judged(out)) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    m = re.search(
        r"^btp\.generate: interrupted: (\d+)/40 mbpp samples generated and saved in \S+; rerun to resume$", err, re.M
    )
    assert m and int(m.group(1)) == len(_judged(out)) >= 2, err[-2000:]


@pytest.mark.slow
def test_ctrl_c_in_an_analysis_stage_says_its_partial_file_is_kept(tmp_path):
    err_path = tmp_path / "err.txt"
    cmd = [
        sys.executable,
        "-m",
        "btp.entropy_lens",
        "--dataset",
        "mbpp",
        "--source",
        "reference",
        "--select",
        "all",
        "--num-samples",
        "100",
        "--results-dir",
        str(tmp_path),
    ]
    with open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 120
        while "entropy lens:" not in err_path.read_text() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)  # its loop has begun: the output is claimed
        assert proc.poll() is None, err_path.read_text()[-2000:]
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    text = err_path.read_text()
    assert proc.returncode == 130 and "Traceback" not in text, text[-2000:]
    assert re.search(
        r"^btp\.entropy_lens: interrupted: the partial progress of \S+/entropy/regular-reference is "
        r"kept; rerun to resume$",
        text,
        re.M,
    ), text[-2000:]


# ---------------------------------------------------------------- 3. result files follow the umask


def test_atomic_writes_follow_the_umask(tmp_path):
    code = (
        "import os, sys, numpy as np; from btp.store import write_json, write_npz, write_text; "
        "os.umask(int(sys.argv[1], 8)); d = sys.argv[2]; "
        "write_json(d + '/a.json', {'x': 1}); write_npz(d + '/b.npz', x=np.zeros(2)); "
        "write_text(d + '/c.csv', 'x')"
    )
    for umask, mode in (("022", 0o644), ("077", 0o600), ("002", 0o664)):
        d = tmp_path / umask
        d.mkdir()
        subprocess.run([sys.executable, "-c", code, umask, str(d)], cwd=ROOT, env=ENV, check=True, timeout=60)
        got = {p.name: oct(p.stat().st_mode & 0o777) for p in d.iterdir()}
        assert got == {n: oct(mode) for n in ("a.json", "b.npz", "c.csv")}, (umask, got)


# ---------------------------------------------------------------- 4. `python -m btp` and the `btp` command


def test_listing_names_only_what_exists():
    r = btp("btp")
    assert r.returncode == 0, r.stderr
    assert "not built yet" not in r.stdout and "btp.bench" not in r.stdout
    for mod in ("btp.generate", "btp.evaluate", "btp.ablation", "btp.check", "btp.plots"):
        assert mod in r.stdout


def test_btp_command_dispatches_a_stage():
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from btp.__main__ import main; sys.argv[0] = 'btp'; main()",
            "check",
            "--help",
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and "--results-dir" in r.stdout and "btp.check" in r.stdout, r.stderr
    r = btp("btp", "chek")
    assert r.returncode == 2 and re.fullmatch(r"btp: error: no stage 'chek' — choose from .*check.*\n", r.stderr)


def test_console_script_is_declared():
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^btp = "btp\.__main__:main"$', text, re.M)


# ---------------------------------------------------------------- 5. mistakes never look like success


@pytest.fixture
def tree(tmp_path) -> Path:
    """A results tree of one model and one dataset (check and plots only look at names here)."""
    d = tmp_path / "results" / "some-model" / "humaneval"
    d.mkdir(parents=True)
    (d / "generations.jsonl").write_text("")
    return tmp_path / "results"


@pytest.mark.parametrize("stage", ["check", "plots"])
def test_missing_results_dir(stage, tmp_path):
    line = error_line(btp(f"btp.{stage}", "--results-dir", str(tmp_path / "nope")), stage)
    assert "not found" in line


@pytest.mark.parametrize("stage", ["check", "plots"])
def test_unknown_model_lists_those_there(stage, tree, tmp_path):
    line = error_line(
        btp(
            f"btp.{stage}",
            "--results-dir",
            str(tree),
            "--model",
            "other-model",
            *(["--out", str(tmp_path / "fig")] if stage == "plots" else []),
        ),
        stage,
    )
    assert "other-model" in line and "have: some-model" in line


@pytest.mark.parametrize("stage", ["check", "plots"])
def test_misspelt_dataset_lists_those_there(stage, tree, tmp_path):
    line = error_line(
        btp(
            f"btp.{stage}",
            "--results-dir",
            str(tree),
            "--model",
            "some-model",
            "--dataset",
            "humaneva",
            *(["--out", str(tmp_path / "fig")] if stage == "plots" else []),
        ),
        stage,
    )
    assert "humaneva" in line and "have: humaneval" in line


def test_run_check_into_head_ends_quietly(tmp_path):
    """Output longer than a pipe holds, cut by `head`: no BrokenPipeError traceback."""
    root = tmp_path / "results" / "m"
    for i in range(1500):
        (root / f"ds{i:04d}").mkdir(parents=True)
        (root / f"ds{i:04d}" / "generations.jsonl").write_text("")
    bindir = tmp_path / "bin"  # run_check.sh runs `python3` when the repository has no .venv
    bindir.mkdir()
    (bindir / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')  # a venv's python, venv and all
    (bindir / "python3").chmod(0o755)
    env = {**ENV, "PATH": f"{bindir}:{os.environ['PATH']}"}
    r = subprocess.run(
        f"'{ROOT / 'run_check.sh'}' --results-dir '{tmp_path / 'results'}' | head -3",
        shell=True,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert len(r.stdout.splitlines()) == 3
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr[-2000:]
