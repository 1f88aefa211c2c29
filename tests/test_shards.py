"""`--shard i/N` and `python -m btp.merge`: the shards of the ablation matrix, the entropy lens and pruned inference,
merged, are exactly the files one unsharded run writes (arrays bitwise; json equal but for time, host and the
shard bookkeeping); an incomplete or mismatched set is refused naming the shards; stages without shards refuse
the flag with their reason."""

from __future__ import annotations

import json

import numpy as np
import pytest

from btp import cli, merge, results
from btp.results import Shard, Stem, parse_stem
from btp.store import UserError, read_json, read_npz

pytestmark = pytest.mark.usefixtures("one_thread")

VOLATILE = ("created", "host", "seconds", "shards", "git_commit")


def test_shard_names_and_flag():
    st = parse_stem("chain_code-reference-mean-layers0_5-shard2of4")
    assert st.shard == Shard(2, 4) and st.variant == ("mean", "layers0_5")
    assert str(st.with_shard(None)) == "chain_code-reference-mean-layers0_5" and str(st) == st.__str__()
    assert str(Stem("regular").with_variant("mean").with_shard(Shard(0, 3))) == "regular-mean-shard0of3"
    with pytest.raises(ValueError, match="shard word"):
        Stem("regular", variant=("shard1of2",))  # a tag cannot pose as a shard
    assert Shard(1, 3).take(8) == [1, 4, 7] and Shard(1, 3).label == "1/3"
    assert cli.parse_shard("3/4") == Shard(3, 4) and cli.parse_shard("0/1") is None and cli.parse_shard(None) is None
    for bad in ("4/4", "-1/4", "a/b", "2", "1/0"):
        with pytest.raises(ValueError, match="--shard"):
            cli.parse_shard(bad)
    assert results.missing_shards(4, [0, 2]) == ["1/4", "3/4"]


def test_shards_are_no_outputs_and_are_grouped(tmp_path):
    for f in ("regular.npz", "regular.json", "regular-mean-shard0of2.npz", "regular-mean-shard0of2.json"):
        (tmp_path / f).write_text("{}")
    (tmp_path / "regular-mean-shard1of2.partial.npz").write_text("")
    assert results.list_outputs(tmp_path, "ablation") == ["regular"]
    assert results.shard_sets(tmp_path) == {"regular-mean": {"count": 2, "done": [0], "partial": [1], "counts": [2]}}


def _argv(folder, root, *extra):
    return ["--model", str(folder), "--source", "reference", "--num-samples", "3", "--sample-max-tokens", "120"] + [
        "--results-dir",
        str(root),
        "--no-progress",
        *extra,
    ]


def _same_json(a: dict, b: dict, where: str) -> None:
    a, b = dict(a), dict(b)
    for d in (a, b):
        for k in VOLATILE:
            d.pop(k, None)
        d["config"] = {k: v for k, v in d.get("config", {}).items() if k != "results_dir"}
    assert a == b, where


def _same_output(pa, pb, parts=("",)) -> None:
    za, zb = read_npz(pa), read_npz(pb)
    assert set(za) == set(zb)
    for k in za:
        if k != "provenance":
            np.testing.assert_array_equal(za[k], zb[k], err_msg=k)
    _same_json(za["provenance"], zb["provenance"], "npz provenance")
    assert zb["provenance"]["shards"]["count"] >= 2 and "shard" not in zb["provenance"]["config"]
    for part in parts:
        ja, jb = (read_json(p.with_name(results.file_name(p.stem, "json", part))) for p in (pa, pb))
        _same_json(ja, jb, part or "json")


def test_entropy_lens_shards_merge_to_the_unsharded_output(tiny_folder, tmp_path, monkeypatch, capsys):
    from btp import entropy_lens as E

    one = E.main(_argv(tiny_folder, tmp_path / "one", "--save-every", "0"))
    b = tmp_path / "sharded"
    orig, calls = E.lens_sample, []

    def flaky(*a, **k):  # shard 0 (samples 0 and 2) is killed in its second sample
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return orig(*a, **k)

    monkeypatch.setattr(E, "lens_sample", flaky)
    with pytest.raises(KeyboardInterrupt):
        E.main(_argv(tiny_folder, b, "--shard", "0/2", "--save-every", "0"))
    capsys.readouterr()
    first = E.main(_argv(tiny_folder, b, "--shard", "0/2", "--save-every", "0"))
    assert "1 of 2 samples done" in capsys.readouterr().out and len(calls) == 3  # resumed: one sample left
    assert first.name == "regular-reference-shard0of2.npz" and read_npz(first)["shard_samples"].tolist() == [0, 2]
    assert read_json(first.with_suffix(".json"))["identity"]["shard"] == [0, 2]
    stage_dir = first.parent
    with pytest.raises(UserError, match=r"shards 1/2 of 2"):
        merge.main([str(stage_dir)])
    E.main(_argv(tiny_folder, b, "--shard", "1/2", "--save-every", "0"))
    capsys.readouterr()
    assert E.main(_argv(tiny_folder, b, "--shard", "1/2", "--save-every", "0")).exists()  # done: skipped
    assert "skipping" in capsys.readouterr().out
    assert merge.main([str(stage_dir)]) == ["regular-reference"]
    _same_output(one, stage_dir / one.name)
    # the merged output is the unsharded one: an unsharded rerun finds it done
    capsys.readouterr()
    E.main(_argv(tiny_folder, b, "--save-every", "0"))
    assert "skipping" in capsys.readouterr().out


def test_ablation_shards_resume_and_merge_to_the_unsharded_outputs(tiny_folder, tmp_path, monkeypatch, capsys):
    from btp import ablation as A

    flags = ("--knockout-ks", "1,2", "--random-seeds", "2", "--n-boot", "30", "--per-token", "--save-every", "0")
    flags += ("--ablation", "mean", "--batch-rows", "8")
    one = A.main(_argv(tiny_folder, tmp_path / "one", *flags))
    b = tmp_path / "sharded"
    for i in (0, 2):
        A.main(_argv(tiny_folder, b, *flags, "--shard", f"{i}/3"))
    # shard 1 is interrupted after one unit, then resumes from its own progress file
    calls = {"n": 0}
    orig = A.HeadSetScorer.ce

    def flaky(self, sets):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return orig(self, sets)

    monkeypatch.setattr(A.HeadSetScorer, "ce", flaky)
    with pytest.raises(KeyboardInterrupt):
        A.main(_argv(tiny_folder, b, *flags, "--shard", "1/3"))
    stage_dir = next(b.rglob("ablation"))
    assert (stage_dir / "regular-reference-mean-shard1of3.partial.npz").exists()
    assert results.shard_sets(stage_dir)["regular-reference-mean"]["partial"] == [1]
    with pytest.raises(SystemExit) as e:  # btp.merge names the unfinished shard (the stage is not run)
        cli.entry(
            "merge",
            lambda: merge.main(
                ["--model", str(tiny_folder), "--dataset", "humaneval", "--stage", "ablation", "--results-dir", str(b)]
            ),
        )
    assert e.value.code == 2 and "shards 1/3 of 3" in capsys.readouterr().err
    capsys.readouterr()
    A.main(_argv(tiny_folder, b, *flags, "--shard", "1/3"))
    assert "resuming" in capsys.readouterr().out
    monkeypatch.setattr(A.HeadSetScorer, "ce", orig)
    units = [read_json(stage_dir / f"regular-reference-mean-shard{i}of3.json")["units"] for i in range(3)]
    assert sorted(map(tuple, sum(units, []))) == [(s, l) for s in range(3) for l in range(3)]  # a partition
    # a shard of other settings is refused by the stage, naming the field
    other = stage_dir / "regular-reference-mean-shard2of3.json"
    doc = read_json(other)
    doc["identity"]["n_boot"] = 7
    other.write_text(json.dumps(doc))
    with pytest.raises(results.IdentityError, match="n_boot"):
        A.main(_argv(tiny_folder, b, *flags, "--merge-shards", "3"))
    A.main(_argv(tiny_folder, b, *flags, "--shard", "2/3", "--force"))
    assert merge.main([str(stage_dir / "regular-reference-mean-shard0of3.npz")]) == ["regular-reference-mean"]
    _same_output(one, stage_dir / one.name, parts=("", results.KNOCKOUT))
    assert not list(stage_dir.glob("*.partial.*"))


def test_pruned_shards_merge_to_the_unsharded_comparison(tiny_folder, tmp_path, capfd):
    from test_pruned import FakeRunner

    from btp import benchmarks
    from btp import pruned as P

    problems = [q.problem_id for q in benchmarks.get("mbpp").load(limit=3)]
    argv = ["--model", str(tiny_folder), "--dataset", "mbpp", "--settings", "heads:L0H1,L2H3,heads:L1H0"]
    argv += ["--controls", "1", "--limit", "3", "--max-tokens", "8", "--num-samples", "4"]
    argv += ["--sample-max-tokens", "200", "--backend", "hf"]
    one = P.main(argv + ["--results-dir", str(tmp_path / "one")], runner=FakeRunner(problems))
    b = tmp_path / "sharded"
    runners = []
    for i in range(2):
        runners.append(FakeRunner(problems))
        assert P.main(argv + ["--results-dir", str(b), "--shard", f"{i}/2"], runner=runners[-1]) == {}
    assert [len(r.calls) for r in runners] == [6, 4]  # arms 0, 2, 4 and 1, 3 of five, generated and judged
    pdir = next(b.glob("*/mbpp/pruned"))  # not the checkpoint cache, results/.cache/pruned
    rec = pdir / "shard1of2.json"
    assert read_json(rec)["arms"] == ["heads:L0H1,L2H3", "heads:L1H0"]
    saved = rec.read_text()
    rec.unlink()
    with pytest.raises(UserError, match="shards 1/2 of 2"):
        merge.main([str(pdir)])
    rec.write_text(saved)
    summ = pdir / "heads-L1H0" / "summary.json"
    summ.rename(summ.with_name("away.json"))
    capfd.readouterr()
    with pytest.raises(SystemExit) as e:  # recorded, but an arm is not judged: the stage refuses, naming it
        merge.main([str(pdir)])
    assert e.value.code == 2 and "arms not judged: heads:L1H0 (shard 1/2)" in capfd.readouterr().err
    summ.with_name("away.json").rename(summ)
    assert merge.main([str(pdir)]) == ["comparison"]
    pa = next((tmp_path / "one").glob("*/mbpp/pruned"))
    ca, cb = read_json(pa / "comparison.json"), read_json(pdir / "comparison.json")
    for d in (ca, cb):
        d.pop("provenance")
    assert ca == cb and ca["run_key"] == one["run_key"]
    for arm in ("base", "heads-L0H1_L2H3", "heads-L1H0/random0"):
        assert read_json(pa / arm / "headset.json") == read_json(pdir / arm / "headset.json"), arm


@pytest.mark.parametrize("stage, why", [("taylor", "iterative"), ("cmaes_search", "sequential")])
def test_stages_without_shards_refuse_the_flag(stage, why, capsys):
    import importlib

    mod = importlib.import_module(f"btp.{stage}")
    with pytest.raises(SystemExit) as e:
        mod.main(["--source", "reference", "--num-samples", "1", "--shard", "0/2"])
    assert e.value.code == 2 and why in capsys.readouterr().err
