"""btp.pruned: settings, head sets from analysis outputs, controls, the surgery checkpoint against the hooks, the
paired statistics on a hand-computed table, resume, and (slow) vLLM generating from a pruned embedded model."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import make_tiny

from btp import pruned as P
from btp import results
from btp.samples import Sample, SampleConfig, SampleSet
from btp.stats import paired_bootstrap
from btp.store import write_json, write_npz

# ---------------------------------------------------------------- settings


def test_parse_settings_and_folders():
    ss = P.parse_settings("taylor:10%,heads:L3H1,L7H0,ablation:top32,cmaes:best,ablation:greedy4@regular-reference")
    assert [s.text for s in ss] == [
        "taylor:10%",
        "heads:L3H1,L7H0",
        "ablation:top32",
        "cmaes:best",
        "ablation:greedy4@regular-reference",
    ]
    assert [s.folder for s in ss] == [
        "taylor-10pct",
        "heads-L3H1_L7H0",
        "ablation-top32",
        "cmaes-best",
        "ablation-greedy4@regular-reference",
    ]
    assert ss[-1].source == "regular-reference" and ss[0].source is None
    for bad in ("taylor:top3", "foo:1", "heads:L3", "cmaes:worst", "ablation:5", "taylor:", "heads:L1H1@x"):
        with pytest.raises(ValueError):
            P.parse_settings(bad)
    with pytest.raises(ValueError, match="repeat"):
        P.parse_settings("taylor:10%,taylor:10%")
    assert P.count_of("10%", 270) == 27 and P.count_of("top32", 270) == 32 and P.count_of("0.1%", 270) == 1
    with pytest.raises(ValueError):
        P.count_of("top300", 270)


def test_random_controls_keep_per_layer_counts():
    heads = [(0, 1), (0, 2), (2, 3)]
    a = P.random_controls(heads, [4, 4, 4], 3, seed=0)
    assert a == P.random_controls(heads, [4, 4, 4], 3, seed=0)
    assert a[:2] == P.random_controls(heads, [4, 4, 4], 2, seed=0)  # control i does not depend on how many
    for c in a:
        assert sorted(l for l, _ in c) == [0, 0, 2] and len(set(c)) == 3
    assert len({tuple(c) for c in a + P.random_controls(heads, [4, 4, 4], 3, seed=1)}) > 1


# ---------------------------------------------------------------- head sets from analysis outputs


def _ds(tmp_path: Path) -> Path:
    return results.dataset_dir(tmp_path, "org/m", "humaneval")


def test_head_sets_from_taylor_ablation_and_cmaes(tmp_path):
    ds, lh = _ds(tmp_path), [4, 4, 4]
    t = ds / "taylor" / "regular-reference.jsonl"
    t.parent.mkdir(parents=True)
    t.write_text(
        "".join(
            json.dumps({"iteration": i + 1, "pruned": p}) + "\n"
            for i, p in enumerate([[[0, 1], [1, 2]], [[2, 0], [0, 3]]])
        )
    )
    hs = P.resolve(P.parse_setting("taylor:3"), ds, lh)
    assert hs.heads == [(0, 1), (1, 2), (2, 0)] and hs.provenance["output"] == "regular-reference"
    assert P.resolve(P.parse_setting("taylor:25%"), ds, lh).heads == hs.heads
    with pytest.raises(ValueError, match="num-iters"):
        P.resolve(P.parse_setting("taylor:5"), ds, lh)
    delta = np.arange(12, dtype=float).reshape(3, 4)
    write_npz(ds / "ablation" / "regular.npz", delta_mean=delta)
    write_json(ds / "ablation" / "regular.json", {})
    assert P.resolve(P.parse_setting("ablation:top2"), ds, lh).heads == [(2, 2), (2, 3)]
    with pytest.raises(FileNotFoundError, match="btp.cmaes_search"):
        P.resolve(P.parse_setting("cmaes:best"), ds, lh)
    (ds / "cmaes").mkdir()
    (ds / "cmaes" / "regular.jsonl").write_text(json.dumps({"generation": 0}) + "\n")  # a search in progress
    with pytest.raises(FileNotFoundError, match="btp.cmaes_search"):
        P.resolve(P.parse_setting("cmaes:best"), ds, lh)
    write_json(ds / "cmaes" / "regular.json", {"final": {"mask": ["1011", "1111", "0110"]}})  # and finished
    assert P.resolve(P.parse_setting("cmaes:best"), ds, lh).heads == [(0, 1), (2, 0), (2, 3)]
    with pytest.raises(ValueError, match="do not exist"):
        P.resolve(P.parse_setting("heads:L3H0"), ds, lh)


# ---------------------------------------------------------------- the surgery checkpoint


def test_checkpoint_logits_equal_hook_ablation_and_zeroed_columns(tmp_path, tiny_ids):
    from transformers import AutoModelForCausalLM

    from btp.arch import adapter
    from btp.heads import gates_for, head_gates

    model = make_tiny("llama")
    heads = [(0, 1), (2, 3), (2, 0)]
    lm = SimpleNamespace(model=model, tokenizer=None, model_id="tiny", revision="r0")
    d = P.ensure_checkpoint(lm, heads, str(tmp_path), "float32", {"arm": "x"})
    assert d.parent == tmp_path / ".cache" / "pruned" and json.loads((d / "btp_pruning.json").read_text())[
        "pruned_heads"
    ] == [[0, 1], [2, 0], [2, 3]]
    stamp = (d / "btp_pruning.json").stat().st_mtime_ns
    assert P.ensure_checkpoint(lm, list(reversed(heads)), str(tmp_path), "float32", {}) == d  # cached by the set
    assert (d / "btp_pruning.json").stat().st_mtime_ns == stamp
    loaded = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for l, h in heads:
            zeroed.model.layers[l].self_attn.o_proj.weight[:, h * 16 : (h + 1) * 16] = 0
        got = loaded(tiny_ids).logits
        with head_gates(model, gates_for(adapter(model), heads)):
            hooked = model(tiny_ids).logits
        plain = zeroed(tiny_ids).logits
        unpruned = model(tiny_ids).logits
    assert torch.allclose(got, hooked, atol=1e-5) and torch.allclose(got, plain, atol=1e-5)
    assert not torch.allclose(got, unpruned, atol=1e-3)  # the original model is untouched


# ---------------------------------------------------------------- paired statistics


def _arm(label, heads=(), setting=None, control=None, ce=None, method="heads"):
    return P.Arm(
        label, Path("/r/pruned") / label.replace(" ", "/"), list(heads), {"method": method}, setting, control, ce
    )


def test_comparison_against_hand_computed_values():
    base = np.array([1, 1, 1, 0, 1, 0])
    tab = {
        "base": base,
        "s": np.array([0, 1, 0, 0, 1, 0]),
        "s random0": np.array([1, 1, 1, 0, 0, 0]),
        "s random1": np.array([1, 0, 1, 1, 1, 0]),
    }
    arms = [
        _arm("base", ce=1.0),
        _arm("s", [(0, 1)], "s", ce=1.5),
        _arm("s random0", [(0, 2)], "s", 0, ce=1.2),
        _arm("s random1", [(0, 3)], "s", 1, ce=1.1),
    ]
    counts = {k: (np.ones(6, int), v) for k, v in tab.items()}
    comp = P.compare(arms, counts, [f"p{i}" for i in range(6)], 1, 12, n_boot=2000, seed=0)
    s = comp["settings"][0]
    assert comp["base"]["pass_at_k"]["pass@1"] == pytest.approx(4 / 6)
    assert s["pass_at_k"]["pass@1"] == pytest.approx(2 / 6) and s["fraction"] == pytest.approx(1 / 12)
    assert s["heldout_ce_delta"] == pytest.approx(0.5)
    # McNemar by hand: s vs base discordant (0 only-s, 2 only-base): p = 2 * C(2,0) / 2^2 = 0.5
    assert s["vs_base"]["mcnemar"] == {"only_this": 0, "only_other": 2, "p_value": 0.5}
    # control 1 vs base: one each way: p = min(1, 2 * (C(2,0) + C(2,1)) / 4) = 1
    assert s["controls"][1]["vs_base"]["mcnemar"] == {"only_this": 1, "only_other": 1, "p_value": 1.0}
    v = s["vs_base"]["pass@1"]
    assert v["diff"] == pytest.approx(-2 / 6) and v["ci_low"] <= v["diff"] <= v["ci_high"] <= 0
    r = paired_bootstrap(tab["s"], base, n_boot=2000, seed=0)
    assert (v["ci_low"], v["ci_high"], v["p_value"]) == (r.low, r.high, r.p_value)
    assert s["controls_pass_at_k"]["pass@1"] == pytest.approx({"mean": 7 / 12, "min": 0.5, "max": 4 / 6})
    assert s["vs_controls"]["pass@1"]["diff"] == pytest.approx(2 / 6 - 7 / 12)
    table = P.format_comparison(comp)
    assert "random1" in table and "-0.333" in table and "controls mean" in table


def test_comparison_pass_at_k_for_n_above_one():
    arms = [_arm("base"), _arm("s", [(0, 1)], "s")]
    counts = {"base": (np.array([2, 2]), np.array([1, 2])), "s": (np.array([2, 2]), np.array([0, 1]))}
    comp = P.compare(arms, counts, ["a", "b"], 2, 4, n_boot=100)
    assert comp["ks"] == [1, 2] and comp["base"]["pass_at_k"] == {"pass@1": 0.75, "pass@2": 1.0}
    assert "mcnemar" not in comp["settings"][0]["vs_base"]
    assert comp["settings"][0]["vs_base"]["pass@2"]["diff"] == pytest.approx(0.5 - 1.0)


# ---------------------------------------------------------------- a run, its rerun, another identity


class FakeRunner:
    """Writes what generate/evaluate would (every problem solved by the base, none by a pruned arm)."""

    def __init__(self, problems):
        self.problems, self.calls = problems, []

    def generate(self, args):
        self.gen_args = args
        a = dict(zip(args[::2], args[1::2]))
        self.calls.append(("generate", a["--model"]))
        Path(a["--output"]).write_text(
            "".join(json.dumps({"problem_id": p, "sample": 0, "code": "x"}) + "\n" for p in self.problems)
        )

    def evaluate(self, args):
        a = dict(zip(args[::2], args[1::2]))
        self.calls.append(("evaluate", a["--model"]))
        gen = Path(a["--input"])
        ok = a["--model"] == "base"
        (gen.parent / "evaluations.jsonl").write_text(
            "".join(json.dumps({"problem_id": p, "sample": 0, "passed": ok}) + "\n" for p in self.problems)
        )
        write_json(gen.parent / "summary.json", {"n_programs": len(self.problems)})


def _run(tmp_path, runner, gen=None, force=False, loads=None, backend="hf"):
    model = make_tiny("llama")
    ss = SampleSet(
        [Sample("a", -1, np.arange(1, 9), 4, 8), Sample("b", -1, np.arange(3, 12), 5, 9)],
        SampleConfig(source="reference"),
        "humaneval",
        "tiny",
    )
    ds = _ds(tmp_path)
    arms = P.build_arms(P.parse_settings("heads:L0H1,L2H3"), ds, [4, 4, 4], 1, 0)
    gen = gen or P.GenFlags(limit=3, gen_max_tokens=8)
    base = {
        "model": "tiny",
        "revision": "r0",
        "dtype": "float32",
        "dataset": "humaneval",
        "seed": 0,
        "generation": {"max_tokens": gen.gen_max_tokens},
    }
    plan = P.Plan(
        arms,
        {**base, "arms": {a.label: a.heads for a in arms}},
        base,
        runner.problems,
        12,
        "float32",
        ds / "pruned" / "comparison.json",
        backend,
    )

    def loader():
        loads.append(1)
        return SimpleNamespace(model=model, tokenizer=None, model_id="tiny", revision="r0")

    return P.run_arms(
        plan,
        lm_loader=loader,
        heldout=ss,
        gen=gen,
        cfg=P.PrunedConfig(n_boot=100),
        dataset="humaneval",
        seed=0,
        results_dir=str(tmp_path),
        force=force,
        runner=runner,
    )


def test_run_writes_arms_and_a_rerun_skips_what_is_done(tmp_path):
    problems = ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    r1, loads = FakeRunner(problems), []
    comp = _run(tmp_path, r1, loads=loads)
    assert [c for c in r1.calls if c[0] == "evaluate"] == [
        ("evaluate", "base"),
        ("evaluate", "heads:L0H1,L2H3"),
        ("evaluate", "heads:L0H1,L2H3 random0"),
    ]
    assert len(loads) == 1  # one load: the CE, then the checkpoints
    pr = _ds(tmp_path) / "pruned"
    hs = json.loads((pr / "heads-L0H1_L2H3" / "headset.json").read_text())
    assert hs["heads"] == [[0, 1], [2, 3]] and hs["n_heads"] == 2 and hs["heldout_ce"] > 0
    assert json.loads((pr / "heads-L0H1_L2H3" / "random0" / "headset.json").read_text())["n_heads"] == 2
    assert comp["base"]["pass_at_k"]["pass@1"] == 1.0 and comp["settings"][0]["pass_at_k"]["pass@1"] == 0.0
    assert json.loads((pr / "comparison.json").read_text())["settings"][0]["vs_base"]["mcnemar"]["only_other"] == 3
    assert not any((tmp_path / ".cache" / "pruned").iterdir())  # checkpoints removed once their arm is judged
    assert results.pruned_progress(pr) == {
        "base": {"arms": 1, "generated": 1, "evaluated": 1, "summarized": 1},
        "heads-L0H1_L2H3": {"arms": 2, "generated": 2, "evaluated": 2, "summarized": 2},
    }
    r2, loads2 = FakeRunner(problems), []
    _run(tmp_path, r2, loads=loads2)
    assert r2.calls == [] and loads2 == []  # nothing generated, judged or loaded again
    # other generation flags: refused, naming the field; --force redoes every arm
    with pytest.raises(results.IdentityError, match="generation"):
        _run(tmp_path, FakeRunner(problems), gen=P.GenFlags(limit=3, gen_max_tokens=16), loads=[])
    r3 = FakeRunner(problems)
    _run(tmp_path, r3, gen=P.GenFlags(limit=3, gen_max_tokens=16), force=True, loads=[])
    assert len(r3.calls) == 6


# ---------------------------------------------------------------- check and plots


def test_check_and_plot_show_the_comparison(tmp_path):
    import btp.plots as bp
    from btp.check import check_tree, format_table

    r = FakeRunner(["HumanEval/0", "HumanEval/1", "HumanEval/2"])
    _run(tmp_path, r, loads=[])
    rows = check_tree(tmp_path)
    assert rows[0].pruned["heads-L0H1_L2H3"]["summarized"] == 2
    assert "heads-L0H1_L2H3(2/2)" in format_table(rows)
    comp = bp.load_pruned(tmp_path, "org/m", "humaneval")
    assert bp.pruned_points(comp) == {"heads": [(0.0, 1.0, 1.0, 1.0), (2 / 12, 0.0, 0.0, 0.0)]}
    figs = dict(bp.pruned_figures(tmp_path, "org/m"))
    assert list(figs) == ["pruned_humaneval_pass_at_1"]
    assert "(n=3 problems)\ncaveat: n = 3 problems < 10" in figs["pruned_humaneval_pass_at_1"].get_suptitle()


# ---------------------------------------------------------------- real engines (slow)


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_generates_from_a_pruned_embedded_checkpoint(tmp_path):
    pytest.importorskip("vllm")
    from btp.models import load_model

    lm = load_model("smollm2-135m", dtype="float32", device="cpu")
    ck = P.ensure_checkpoint(lm, [(0, 0), (5, 3), (29, 8)], str(tmp_path), "float32", {})
    del lm
    out = tmp_path / "gen.jsonl"
    gen = P.GenFlags(limit=1, gen_max_tokens=8, backend="vllm", gpu_memory_utilization=0.05)
    P.SubprocessRunner().generate(gen.generate_args(str(ck), "humaneval", out, 0, "float32", "vllm"))
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(recs) == 1 and recs[0]["problem_id"] == "HumanEval/0" and 0 < len(recs[0]["output_token_ids"]) <= 8


def test_sweep_script_runs_one_grid_per_dataset(tmp_path):
    import os
    import subprocess

    fake = tmp_path / "py"
    fake.write_text('#!/bin/sh\necho "$@"\n')
    fake.chmod(0o755)
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        ["bash", str(root / "scripts" / "run_pruned_sweep.sh"), "org/m"],
        capture_output=True,
        text=True,
        check=True,
        env={
            **os.environ,
            "PYTHON": str(fake),
            "DATASETS": "mbpp humaneval",
            "FRACTIONS": "5 10",
            "METHODS": "taylor cmaes",
            "LIMIT": "7",
        },
    )
    runs = [l for l in out.stdout.splitlines() if l.startswith("-m btp.pruned")]
    assert len(runs) == 2 and "--settings taylor:5%,taylor:10%,cmaes:best --controls 3" in runs[0]
    assert "--dataset humaneval" in runs[1] and "--limit 7" in runs[1]


# ---------------------------------------------------------------- the CLI


def test_flags_preset_and_defaults():
    from btp import cli

    p = P.build_parser()
    dests = [a.dest for a in p._actions]
    assert len(dests) == len(set(dests))
    d = cli.parse(p, [])
    assert cli.config_from(P.GenFlags, d) == P.GenFlags() and cli.config_from(P.PrunedConfig, d) == P.PrunedConfig()
    assert d.source == "reference" and d.sample_max_tokens is None
    a = cli.parse(
        p,
        [
            "--config",
            str(Path(__file__).resolve().parent.parent / "configs" / "pruned_smoke.json"),
            "--no-enforce-eager",
        ],
    )
    gen = cli.config_from(P.GenFlags, a)
    assert (gen.gen_max_tokens, gen.limit, gen.backend, gen.enforce_eager) == (128, 10, "hf", False)
    assert a.sample_max_tokens == 256 and cli.config_from(P.PrunedConfig, a).settings == "taylor:10%"


def test_main_end_to_end_then_done_without_weights(tiny_folder, tmp_path, monkeypatch, capsys):
    from btp import benchmarks, models

    problems = [q.problem_id for q in benchmarks.get("mbpp").load(limit=3)]
    argv = [
        "--model",
        str(tiny_folder),
        "--dataset",
        "mbpp",
        "--settings",
        "heads:L0H1,L2H3",
        "--controls",
        "1",
        "--limit",
        "3",
        "--max-tokens",
        "8",
        "--num-samples",
        "4",
        "--sample-max-tokens",
        "200",
        "--results-dir",
        str(tmp_path),
        "--backend",
        "hf",
    ]
    assert P.main(argv + ["--ce-only"], runner=FakeRunner(problems)) == {}
    r = FakeRunner(problems)
    comp = P.main(argv, runner=r)
    assert len(r.calls) == 6 and comp["n_problems"] == 3 and comp["backend"] == "hf"
    assert "--max-tokens" in r.gen_args and r.gen_args[r.gen_args.index("--max-tokens") + 1] == "8"
    monkeypatch.setattr(models, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    capsys.readouterr()
    assert P.main(argv, runner=FakeRunner(problems))["run_key"] == comp["run_key"]  # done: no weights loaded
    assert "is done" in capsys.readouterr().out


def test_auto_backend_falls_back_to_transformers_for_every_arm(tmp_path):
    import subprocess

    class VllmFails(FakeRunner):
        def generate(self, args):
            if args[args.index("--backend") + 1] == "vllm":
                self.calls.append(("generate", "vllm failed"))
                raise subprocess.CalledProcessError(1, ["python", "-m", "btp.generate"])
            super().generate(args)

    r = VllmFails(["HumanEval/0", "HumanEval/1"])
    comp = _run(tmp_path, r, gen=P.GenFlags(limit=2, backend="auto"), loads=[], backend="vllm")
    assert [c[1] for c in r.calls].count("vllm failed") == 1 and len(r.calls) == 7
    assert comp["backend"] == "hf" and "transformers" in comp["notes"][0]
    with pytest.raises(subprocess.CalledProcessError):  # an explicit engine is never swapped
        _run(
            tmp_path / "x",
            VllmFails(["HumanEval/0"]),
            gen=P.GenFlags(limit=1, backend="vllm"),
            loads=[],
            backend="vllm",
        )
