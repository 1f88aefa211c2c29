"""Stage: combine the shards of a sharded analysis (`--shard i/N`) into exactly the files one unsharded run writes.

`python -m btp.merge --model M --dataset humaneval --stage ablation [--name regular-reference]`
`python -m btp.merge results/<model-slug>/humaneval/entropy[/<name>]`

Finds the shard sets through `btp.results` (`<name>-shard<i>of<N>.*`, `pruned/shard<i>of<N>.json`), refuses a set
with shards missing or unfinished (one line naming them), then runs the owning stage with the shards' own flags and
`--merge-shards N`: the stage checks every shard's identity, puts the shards' raw units in place and computes its
statistics (CIs, summaries, knockout curves, the pruned comparison) with its own code; a stage is run, never
imported (stages talk through files). Knockout curves need the model: pass `--device` for the merging machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from . import cli, results
from .store import UserError, read_json

# stage (or its folder) -> the module that merges it
MODULES = {"entropy_lens": "entropy_lens", "ablation": "ablation", "pruned": "pruned"}
FOLDERS = {results.STAGE_DIRS.get(s, s): s for s in MODULES}


def build_parser():
    p = cli.parser("merge", __doc__.split("\n\n")[0])
    p.add_argument("path", nargs="?", default=None, help="a stage folder or an output under results/ (else the flags)")
    p.add_argument("--model", default=None, help="model (as the stages take it) whose shards to merge")
    p.add_argument("--dataset", default=None, help="dataset whose shards to merge")
    p.add_argument("--stage", default=None, choices=sorted(MODULES), help="the sharded stage")
    p.add_argument("--name", default=None, help="merge only this output, e.g. regular-reference-mean")
    p.add_argument("--mode", default=None, choices=results.MODES, help="merge only outputs of this mode")
    p.add_argument("--results-dir", default="results", help="root of the results tree")
    p.add_argument("--device", default=None, help="device of the merging run (knockout curves load the model)")
    return p


def locate(args) -> tuple[Path, str, str | None]:
    """(stage folder, stage, output name or None) from a results path or from --model/--dataset/--stage."""
    if args.path:
        p = Path(args.path)
        name = None
        if p.name not in FOLDERS and p.parent.name in FOLDERS:  # an output: its name, any file of it or a shard's
            st = results.try_parse_stem(results.parse_file_name(p.name).stem)
            if st is None:
                raise UserError(f"{p}: not an analysis output name — give a stage folder or an output")
            p, name = p.parent, str(st.with_shard(None))
        if p.name not in FOLDERS:
            raise UserError(f"{args.path}: not a stage folder ({', '.join(sorted(FOLDERS))}) under results/")
        return p, FOLDERS[p.name], name
    if not (args.model and args.dataset and args.stage):
        raise UserError("give a results path, or --model, --dataset and --stage")
    from .models import resolve_model

    try:  # filed as the stages file it (a local folder's id is its path); else a slug or a name check knows
        d = results.dataset_dir(args.results_dir, resolve_model(args.model).model_id, args.dataset, create=False)
    except UserError:
        d = results.find_model_dir(args.results_dir, args.model) / args.dataset
    return d / results.STAGE_DIRS.get(args.stage, args.stage), args.stage, args.name


def shard_sets(stage_dir: Path, stage: str, name: str | None, mode: str | None) -> list[tuple[str, int, dict]]:
    """[(output name, N, the config the shards ran with)] of every complete shard set to merge; a set with shards
    not finished is a one-line error naming them."""
    if stage == "pruned":  # one comparison per folder
        found = results.pruned_shards(stage_dir)
        counts = sorted(found)
        sets = {"comparison": {"count": counts[-1], "done": found[counts[-1]], "counts": counts}} if found else {}
        record = lambda nm, i, n: results.pruned_shard_path(stage_dir, results.Shard(i, n))
    else:
        sets = results.shard_sets(stage_dir)
        record = lambda nm, i, n: (
            stage_dir / results.file_name(results.parse_stem(nm).with_shard(results.Shard(i, n)), "json")
        )
    picked = {
        k: v
        for k, v in sets.items()
        if (name is None or k == name) and (mode is None or stage == "pruned" or results.parse_stem(k).mode == mode)
    }
    if not picked:
        want = f" named {name}" if name else f" of mode {mode}" if mode else ""
        raise FileNotFoundError(f"no shards{want} under {stage_dir} — run the stage with --shard i/N first")
    out = []
    for nm, e in sorted(picked.items()):
        if len(e["counts"]) > 1:
            raise UserError(f"{stage_dir / nm}: shards of several counts {e['counts']} — remove the stale ones")
        n = e["count"]
        missing = results.missing_shards(n, e["done"])
        if missing:
            raise UserError(
                f"{stage_dir / nm}: shards {', '.join(missing)} of {n} are missing or unfinished — run them "
                f"(--shard i/{n}), then merge again"
            )
        out.append((nm, n, read_json(record(nm, e["done"][0], n)).get("config") or {}))
    return out


def preset(config: dict, results_root: Path) -> dict:
    """The shards' flags as a `--config` preset for the merging run: the results dir where the shards were found
    (as they named it when it is the same folder, so the stamped config stays theirs)."""
    cfg = {k: v for k, v in config.items() if k not in ("config", *cli.SHARD_FLAGS)}
    given = cfg.get("results_dir")
    if given is None or Path(given).resolve() != results_root.resolve():
        cfg["results_dir"] = str(results_root)
    return cfg


def main(argv: Sequence[str] | None = None) -> list[str]:
    args = cli.parse(build_parser(), argv)
    stage_dir, stage, name = locate(args)
    if not stage_dir.is_dir():
        raise FileNotFoundError(f"{stage_dir} not found — run the stage with --shard i/N first")
    root = stage_dir.parents[2]  # results/<slug>/<dataset>/<stage-dir>
    merged = []
    for nm, n, config in shard_sets(stage_dir, stage, name, args.mode):
        with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="btp-merge-", delete=False) as f:
            json.dump(preset(config, root), f)
        cmd = [sys.executable, "-m", f"btp.{MODULES[stage]}", "--config", f.name, "--merge-shards", str(n)]
        cmd += ["--device", args.device] if args.device else []
        print(f"[btp.merge] {stage_dir / nm}: {n} shards -> python -m btp.{MODULES[stage]} --merge-shards {n}")
        try:
            rc = subprocess.run(cmd).returncode
        finally:
            Path(f.name).unlink(missing_ok=True)
        if rc == 2:  # the stage said why, in one line
            sys.exit(2)
        if rc:
            raise SystemExit(f"merging {stage_dir / nm} failed (python -m btp.{MODULES[stage]} exit {rc})")
        merged.append(nm)
    return merged


if __name__ == "__main__":
    cli.entry("merge", main)
