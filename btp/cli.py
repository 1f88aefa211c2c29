"""Command-line plumbing shared by every stage: `--config FILE` presets (JSON under configs/) whose keys are
flag names; flags given on the command line override them."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

from .models import DEFAULT_MODEL


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m btp.{prog}", description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", type=Path, default=None,
                   help="JSON preset (see configs/); its keys are flag names, command-line flags override them")
    return p


def add_common(p: argparse.ArgumentParser, *, dataset: bool = True) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="HF id, local folder, or an embedded name")
    if dataset:
        p.add_argument("--dataset", default="humaneval", choices=("humaneval", "mbpp", "livecodebench"))
    p.add_argument("--results-dir", default="results", help="root of the results tree")
    p.add_argument("--seed", type=int, default=0)


def parse(p: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse with a config preset applied as defaults. Unknown preset keys are an error naming the file."""
    pre, _ = p.parse_known_args(argv)
    if pre.config is not None:
        try:
            preset = json.loads(Path(pre.config).read_text())
        except FileNotFoundError:
            p.error(f"config file {pre.config} not found")
        except json.JSONDecodeError as e:
            p.error(f"{pre.config}:{e.lineno}: not valid JSON ({e.msg})")
        if not isinstance(preset, dict):
            p.error(f"{pre.config}: expected a JSON object of flag names")
        known = {a.dest: a for a in p._actions}
        defaults = {}
        for k, v in preset.items():
            dest = k.lstrip("-").replace("-", "_")
            if dest.startswith("_"):  # comments like "_about"
                continue
            if dest not in known:
                p.error(f"{pre.config}: unknown key '{k}' for python -m {p.prog.split()[-1]}")
            defaults[dest] = v
        p.set_defaults(**defaults)
    return p.parse_args(argv)


def config_dict(args: argparse.Namespace) -> dict:
    """The effective configuration of a run, for provenance."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
