"""One spelling per idea across the stages (issue 20, "Consistency" and "Logs"): --help shows one default per flag,
bad values are refused at parse time in one line, renamed flags say their new name, presets use the flags' own
names, `--dataset a,b` runs each dataset, the analyses count what --sample-max-tokens leaves out, vLLM and
transformers stay at warning level unless --verbose, and outputs record the dtype computed in (never "auto").

CLI tests run the real entry points as subprocesses, as a user does (helpers from test_cli_surface)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_cli_surface import ENV, ROOT, btp, error_line

STAGES = ["generate", "evaluate", "entropy_lens", "ablation", "taylor", "cmaes_search", "circuits", "pruned", "check"]
STAGES += ["plots", "merge"]
ANALYSES = ["entropy_lens", "ablation", "taylor", "cmaes_search"]
MISSING_MODEL = "/nonexistent/model-folder"  # a value error must win over it: checked before any model is touched


def _option_blocks(help_text: str) -> dict[str, str]:
    """`--flag` -> its help text (all lines of its entry) from argparse's --help output."""
    blocks: dict[str, str] = {}
    cur = None
    for line in help_text.split("options:", 1)[1].splitlines():
        m = re.match(r"^  (-\w, )?(--[\w-]+)", line)
        if m:
            cur = m.group(2)
            blocks[cur] = line
        elif cur and line.startswith("      "):
            blocks[cur] += " " + line.strip()
    return blocks


@pytest.mark.parametrize("stage", STAGES)
def test_help_shows_one_default_per_flag(stage):
    r = btp(f"btp.{stage}", "--help")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    blocks = _option_blocks(r.stdout)
    assert "--config" in blocks and "--debug" in blocks
    for flag, text in blocks.items():
        if flag == "--help":
            continue
        assert text.count("(default") == 1, (flag, text)
        assert "(default: None)" not in text, (flag, text)
    desc = r.stdout.split("options:", 1)[0].strip().splitlines()[-1]
    assert not desc.endswith(":"), desc  # no dangling text


@pytest.mark.parametrize("stage", ["generate", "evaluate", *ANALYSES, "circuits", "pruned"])
def test_shared_flags_everywhere(stage):
    blocks = _option_blocks(btp(f"btp.{stage}", "--help").stdout)
    assert {"--no-progress", "--config"} <= blocks.keys()
    if stage != "evaluate":  # loads no model
        assert "--verbose" in blocks
    if stage in ANALYSES:
        assert "--force" in blocks and "--sample-max-tokens" in blocks and "--max-tokens" not in blocks
    if stage in ("generate", "pruned"):  # generation length keeps its name there
        assert "--max-tokens" in blocks
    if stage == "evaluate":
        assert "--force" in blocks and "--fresh" not in blocks


BAD = [
    ("evaluate", ["--timeout", "-1"], "--timeout -1.0: must be > 0"),
    ("evaluate", ["--n-boot", "0"], "--n-boot 0: must be >= 1"),
    ("evaluate", ["--workers", "0"], "--workers 0: must be >= 1"),
    ("evaluate", ["--limit", "-2"], "--limit -2: must be >= 1"),
    ("generate", ["--n", "0"], "--n 0: must be >= 1"),
    ("generate", ["--top-p", "1.5"], "--top-p 1.5: must be in (0, 1]"),
    ("generate", ["--temperature", "-0.1"], "--temperature -0.1: must be >= 0"),
    ("generate", ["--max-tokens", "0"], "--max-tokens 0: must be >= 1"),
    ("generate", ["--gpu-memory-utilization", "0"], "--gpu-memory-utilization 0.0: must be in (0, 1]"),
    ("generate", ["--dtype", "fp8"], "invalid choice: 'fp8'"),
    ("entropy_lens", ["--num-samples", "0"], "--num-samples 0: must be >= 1"),
    ("entropy_lens", ["--sample-max-tokens", "-5"], "--sample-max-tokens -5: must be >= 1"),
    ("ablation", ["--n-boot", "0"], "--n-boot 0: must be >= 1"),
    ("ablation", ["--layers", "x"], "bad layer list 'x'"),
    ("ablation", ["--knockout-heldout", "1.5"], "--knockout-heldout must be a fraction in [0, 1) or a count"),
    ("ablation", ["--random-seeds", "-1"], "--random-seeds -1: must be >= 0"),
    ("taylor", ["--heldout", "1.5"], "--heldout fraction must be in (0, 1), got 1.5"),
    ("taylor", ["--num-iters", "0"], "--num-iters 0: must be >= 1"),
    ("taylor", ["--stop-factor", "0"], "--stop-factor 0.0: must be > 0"),
    ("cmaes_search", ["--budget", "-3"], "--budget count must be >= 1"),
    ("cmaes_search", ["--sigma0", "0"], "--sigma0 0.0: must be > 0"),
    ("cmaes_search", ["--popsize", "1"], "--popsize 1: must be >= 2"),
    ("cmaes_search", ["--n-boot", "0"], "--n-boot 0: must be >= 1"),
    ("pruned", ["--controls", "-1"], "--controls -1: must be >= 0"),
    ("pruned", ["--top-p", "0"], "--top-p 0.0: must be in (0, 1]"),
    ("pruned", ["--eval-timeout", "-1"], "--eval-timeout -1.0: must be > 0"),
    ("circuits", ["--n-boot", "0"], "--n-boot 0: must be >= 1"),
    ("circuits", ["--top-k", "0"], "--top-k 0: must be >= 1"),
    ("plots", ["--dpi", "0"], "--dpi 0: must be >= 1"),
]


@pytest.mark.parametrize("stage,args,msg", BAD, ids=[f"{s}{' '.join(a)}" for s, a, _ in BAD])
def test_bad_values_refused_at_parse_time(stage, args, msg, tmp_path):
    model = {"circuits": ["--base", MISSING_MODEL, "--other", MISSING_MODEL], "check": [], "plots": []}.get(
        stage, ["--model", MISSING_MODEL]
    )
    t0 = time.monotonic()
    r = btp(f"btp.{stage}", *model, *args, "--results-dir", str(tmp_path / "nope"))
    line = error_line(r, stage)
    assert msg in line, line
    assert line.endswith(f"see python -m btp.{stage} --help")
    assert time.monotonic() - t0 < 60 and not (tmp_path / "nope").exists()


def test_bad_value_in_a_preset_is_refused_too(tmp_path):
    preset = tmp_path / "p.json"
    preset.write_text(json.dumps({"num-iters": 0}))
    line = error_line(btp("btp.taylor", "--model", MISSING_MODEL, "--config", str(preset)), "taylor")
    assert "--num-iters 0: must be >= 1" in line


def test_renamed_flags_say_their_new_name(tmp_path):
    line = error_line(btp("btp.evaluate", "--dataset", "mbpp", "--reference", "--fresh"), "evaluate")
    assert line == "btp.evaluate: error: --fresh is now --force — rerun with --force"
    for stage in ANALYSES:
        line = error_line(btp(f"btp.{stage}", "--model", MISSING_MODEL, "--max-tokens", "256"), stage)
        assert "--max-tokens is now --sample-max-tokens" in line and line.endswith("rerun with --sample-max-tokens")
    preset = tmp_path / "old.json"
    preset.write_text(json.dumps({"source": "reference", "max_tokens": 256}))
    line = error_line(btp("btp.entropy_lens", "--config", str(preset)), "entropy_lens")
    assert f"{preset}: key 'max_tokens' is now 'sample-max-tokens'" in line and "rename it to" in line


def _preset_parser(stage: str):
    from btp import cli, evaluate, generate, pruned

    if stage == "generate":
        return generate._parser()
    if stage == "evaluate":
        return evaluate.build_parser()
    if stage == "pruned":
        return pruned.build_parser()
    mod = __import__(f"btp.{stage}", fromlist=["SPEC"])
    return cli.stage_parser(mod.SPEC)


PRESET_STAGE = {"entropy": "entropy_lens"}  # file name prefix -> stage, where they differ


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.json")), ids=lambda p: p.name)
def test_every_preset_key_is_a_flag_of_its_stage(path):
    from btp import cli

    stage = path.name.split("_")[0]
    stage = PRESET_STAGE.get(stage, stage)
    p = _preset_parser(stage)
    preset = json.loads(path.read_text())
    dests = {a.dest: a for a in p._actions}
    for k in preset:
        if k.startswith("_"):
            continue
        dest = k.replace("-", "_")
        assert dest in dests, f"{path.name}: '{k}' is no flag of btp.{stage}"
        assert f"--{k}" == dests[dest].option_strings[0], f"{path.name}: '{k}' is spelt --{k} nowhere"
    args = cli.parse(p, ["--config", str(path)])  # applies and checks every value (exits 2 on a bad one)
    for k, v in preset.items():
        if not k.startswith("_"):
            assert getattr(args, k.replace("-", "_")) == v


def test_dataset_list_runs_each_dataset(tmp_path):
    r = btp(
        "btp.evaluate",
        "--reference",
        "--dataset",
        "humaneval,mbpp",
        "--limit",
        "2",
        "--n-boot",
        "50",
        "--no-progress",
        "--results-dir",
        str(tmp_path),
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    for ds in ("humaneval", "mbpp"):
        s = json.loads((tmp_path / "reference" / ds / "summary.json").read_text())
        assert s["dataset"] == ds and s["n_problems"] == 2
        assert re.search(r"^reference self-check: 2/2 pass$", r.stdout, re.M)
    assert r.stdout.count("reference self-check") == 2
    assert "evaluate humaneval" not in r.stderr  # --no-progress: no bar


def test_dataset_list_refused_with_a_one_file_flag(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text("")
    line = error_line(btp("btp.evaluate", "--dataset", "humaneval,mbpp", "--input", str(inp)), "evaluate")
    assert "--input takes one --dataset" in line


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """A tiny random Llama with the embedded tokenizer, saved as a HF folder (seconds to run a stage on)."""
    from conftest import make_tiny

    from btp.models import load_tokenizer

    tok = load_tokenizer()
    out = tmp_path_factory.mktemp("tiny")
    make_tiny("llama", vocab_size=len(tok)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_analysis_counts_what_the_cap_leaves_out_and_records_its_dtype(tiny_folder, tmp_path):
    """Two datasets in one command; the summary line counts the references longer than --sample-max-tokens."""
    from btp import results

    r = btp(
        "btp.entropy_lens",
        "--model",
        str(tiny_folder),
        "--dataset",
        "humaneval,mbpp",
        "--source",
        "reference",
        "--num-samples",
        "2",
        "--sample-max-tokens",
        "60",
        "--no-progress",
        "--results-dir",
        str(tmp_path),
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [l for l in r.stdout.splitlines() if re.match(r"\[btp\.entropy_lens\] \d+ samples?, ", l)]
    assert len(lines) == 2, r.stdout
    assert any(re.search(r"; \d+ samples? left out: longer than --sample-max-tokens 60$", l) for l in lines), lines
    for ds in ("humaneval", "mbpp"):
        out = results.output(tmp_path, str(tiny_folder), ds, "entropy_lens", "regular-reference")
        j = json.loads(out.path("json").read_text())
        assert j["dtype"] == "torch.float32" and j["config"]["sample_max_tokens"] == 60


def _generate(tiny_folder: Path, root: Path, *extra: str) -> subprocess.CompletedProcess:
    return btp(
        "btp.generate",
        "--model",
        str(tiny_folder),
        "--backend",
        "hf",
        "--dataset",
        "humaneval",
        "--limit",
        "1",
        "--max-tokens",
        "4",
        "--device",
        "cpu",
        "--results-dir",
        str(root),
        *extra,
        timeout=300,
        env={k: v for k, v in ENV.items() if k not in ("TRANSFORMERS_VERBOSITY", "VLLM_LOGGING_LEVEL")},
    )


def test_logs_quiet_unless_verbose_and_the_real_dtype_recorded(tiny_folder, tmp_path):
    from btp.results import runs_path

    quiet = _generate(tiny_folder, tmp_path / "q", "--no-progress")
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    out = quiet.stdout + quiet.stderr
    assert "loading configuration file" not in out and '"model_type": "llama"' not in out  # transformers' info
    assert "Loading weights" not in out and "it/s]" not in out  # --no-progress: the library bars too
    assert [l for l in quiet.stderr.splitlines() if l.strip()][0].startswith("[btp.generate]"), quiet.stderr
    gen = next((tmp_path / "q").rglob("generations.jsonl"))
    run = json.loads(runs_path(gen).read_text())[-1]
    assert run["dtype"] == "float32" and run["config"]["dtype"] == "float32"  # never "auto"
    loud = _generate(tiny_folder, tmp_path / "v", "--verbose")
    assert loud.returncode == 0, loud.stderr[-2000:]
    assert '"model_type": "llama"' in loud.stdout + loud.stderr  # transformers at info level


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_engine_quiet_and_in_the_recorded_dtype(tmp_path):
    """The embedded model through vLLM (60-90 s to load on a CPU): no info lines, no per-weight dtype warnings,
    and the dtype it computed in is what the run records."""
    pytest.importorskip("vllm")
    from btp.results import runs_path

    env = {k: v for k, v in ENV.items() if k not in ("TRANSFORMERS_VERBOSITY", "VLLM_LOGGING_LEVEL")}
    r = btp(
        "btp.generate",
        "--backend",
        "vllm",
        "--dataset",
        "humaneval",
        "--limit",
        "1",
        "--max-tokens",
        "8",
        "--enforce-eager",
        "--no-progress",
        "--results-dir",
        str(tmp_path),
        timeout=900,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert not re.search(r"\bINFO\b", out), out[-3000:]
    assert "Attempted to load weight" not in out, out[-3000:]
    gen = next(tmp_path.rglob("generations.jsonl"))
    run = json.loads(runs_path(gen).read_text())[-1]
    assert run["dtype"] == run["config"]["dtype"] and run["dtype"] in ("float32", "bfloat16", "float16")


# ---------------------------------------------------------------- run_evaluate.sh


def _wrapper_env(tmp_path: Path) -> dict:
    return {**ENV, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1", "RESULTS_DIR": str(tmp_path / "results")}


def test_run_evaluate_skips_datasets_without_generations(tmp_path):
    from btp import benchmarks

    d = tmp_path / "results" / "org--tiny" / "humaneval"
    d.mkdir(parents=True)
    p = benchmarks.get("humaneval").load(limit=1)[0]
    (d / "generations.jsonl").write_text(json.dumps({"problem_id": p.problem_id, "sample": 0, "code": p.reference}))
    (d / "generations.runs.json").write_text(json.dumps([{"run": "x", "config": {"limit": 1, "variant": None}}]))
    env = {**_wrapper_env(tmp_path), "DATASETS": "humaneval mbpp", "EXTRA_ARGS": "--n-boot 50 --no-progress"}
    r = subprocess.run(
        [str(ROOT / "run_evaluate.sh"), "org/tiny"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(r"^\[btp\.evaluate\] note: mbpp skipped: .*generations\.jsonl does not exist", r.stderr, re.M)
    assert json.loads((d / "summary.json").read_text())["n_problems"] == 1
    assert not (tmp_path / "results" / "org--tiny" / "mbpp" / "summary.json").exists()
    # without the wrapper a missing dataset is still an error
    line = error_line(
        btp(
            "btp.evaluate",
            "--model",
            "org/tiny",
            "--dataset",
            "mbpp",
            "--results-dir",
            str(tmp_path / "results"),
            env={**ENV, "HF_HUB_OFFLINE": "1"},
        ),
        "evaluate",
    )
    assert "generations.jsonl does not exist" in line


def test_run_evaluate_refuses_the_old_fresh_knob(tmp_path):
    env = {**_wrapper_env(tmp_path), "FRESH": "1"}
    r = subprocess.run(
        [str(ROOT / "run_evaluate.sh"), "org/tiny"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2 and "FRESH=1 is now FORCE=1" in r.stderr, r.stderr


def test_readme_names_the_cap_and_its_count():
    text = (ROOT / "README.md").read_text()
    assert "--sample-max-tokens" in text and "left out: longer than --sample-max-tokens" in text
    assert "`--fresh` is refused" in text and "`--force` recomputes" in text
    assert os.access(ROOT / "run_evaluate.sh", os.X_OK)
