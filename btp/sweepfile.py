"""The sweep file: models x datasets x modes x stages in YAML, expanded into a plan of jobs with dependencies.

Each job is one command line of a stage's own CLI (`python -m btp.<stage> --model M --dataset D --results-dir R
[--mode m] <the stage's flags>`): the sweep never re-implements a stage. Dependencies: evaluate after generate;
analyses after evaluate (else generate) unless their samples are the references (`source: reference`); CMA-ES
also after the Taylor and ablation runs of its samples (its warm start). Jobs come in topological order; a job's
level is its depth in the graph (SLURM: one array per level).

```yaml
name: demo                      # default: the file's stem; names results/.sweeps/<name>/
results_dir: results            # relative to where the sweep runs, as the stages take it
models: [smollm2-135m]
datasets: [humaneval, mbpp]
modes: [regular, chain_code]    # analyses run once per mode
retries: 1                      # default of --retries
stages:                         # key: a stage, or any name with `stage:` (two configurations of one stage)
  generate: {backend: hf, limit: 4, max_tokens: 256, resources: {num_gpus: 1}}
  evaluate: {workers: 2}
  entropy_lens: {source: reference, num_samples: 2}
  ablation-mean: {stage: ablation, ablation: mean, source: reference}
```
Stage flags are the stage's flag names (`num_samples` or `num-samples`); `true` is a bare flag, `false`/`null`
leave it out, lists are comma-joined, mappings JSON (`device_map`). Reserved per stage: `stage`, `resources`
(Ray resources of its jobs) and `shards` (a job's `--shard i/N`, once the stages take it).
Core room: this module is light (yaml, no torch); `btp.sweep` runs plans and `btp.check` reads their progress.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import benchmarks, results
from .store import UserError

# in dependency order; `per_mode`: one job per mode (the analyses)
STAGES = ("generate", "evaluate", "entropy_lens", "ablation", "taylor", "cmaes_search")
PER_MODE = ("entropy_lens", "ablation", "taylor", "cmaes_search")
WARM_START = {"cmaes_search": ("taylor", "ablation")}  # stages whose outputs another stage reads as a prior
SET_BY_SWEEP = ("model", "dataset", "results_dir", "mode")
RESERVED = ("stage", "resources", "shards")
TOP_KEYS = ("name", "results_dir", "models", "datasets", "modes", "retries", "stages")


@dataclass(frozen=True)
class Job:
    """One stage run of the plan. `shard` (i, N) maps to the stage's `--shard i/N`."""

    id: str  # <stage key>/<model slug>/<dataset>[/<mode>]
    stage: str  # the module: btp.<stage>
    argv: tuple[str, ...]
    after: tuple[str, ...] = ()
    level: int = 0
    resources: dict = field(default_factory=dict)
    shard: tuple[int, int] | None = None

    @property
    def args(self) -> list[str]:
        return [*self.argv, *(("--shard", f"{self.shard[0]}/{self.shard[1]}") if self.shard else ())]

    def command(self, python: str = "python") -> list[str]:
        return [python, "-m", f"btp.{self.stage}", *self.args]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> Job:
        sh = d.get("shard")
        return cls(
            d["id"],
            d["stage"],
            tuple(d["argv"]),
            tuple(d.get("after", ())),
            int(d.get("level", 0)),
            dict(d.get("resources") or {}),
            tuple(sh) if sh else None,
        )


@dataclass(frozen=True)
class Sweep:
    name: str
    results_dir: str  # absolute: Ray tasks and array jobs may start elsewhere
    retries: int
    jobs: tuple[Job, ...]

    def job(self, job_id: str) -> Job:
        return next(j for j in self.jobs if j.id == job_id)


def flag_argv(flags: dict[str, Any], where: str) -> list[str]:
    """{num_samples: 2, greedy: true, layers: [0, 29]} -> --num-samples 2 --greedy --layers 0,29."""
    out: list[str] = []
    for k, v in flags.items():
        name = str(k).lstrip("-").replace("_", "-")
        if name.replace("-", "_") in SET_BY_SWEEP:
            raise UserError(f"{where}: `{k}` is set by the sweep — list it under models/datasets/modes/results_dir")
        if v is None or v is False:
            continue
        out.append(f"--{name}")
        if v is True:
            continue
        if isinstance(v, (list, tuple)):
            out.append(",".join(str(x) for x in v))
        elif isinstance(v, dict):
            out.append(json.dumps(v))
        else:
            out.append(str(v))
    return out


def _names(doc: dict, key: str, path: Path, allowed: tuple[str, ...] | None = None) -> list[str]:
    v = doc.get(key)
    v = [v] if isinstance(v, str) else v
    if not v or not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        raise UserError(f"{path}: `{key}` must be a non-empty list of names — e.g. {key}: [{(allowed or ('x',))[0]}]")
    bad = [x for x in v if allowed is not None and x not in allowed]
    if bad:
        raise UserError(f"{path}: unknown {key} {', '.join(bad)} — choose from {', '.join(allowed or ())}")
    return list(dict.fromkeys(v))


def load(path: str | os.PathLike) -> Sweep:
    """Read a sweep file and expand it into its plan (UserError naming the file and what is wrong)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"sweep file {path} not found — give a YAML file such as configs/sweep_demo.yaml")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(doc, dict):
        raise UserError(f"{path}: expected a mapping with models, datasets, stages — see configs/sweep_demo.yaml")
    unknown = [k for k in doc if k not in TOP_KEYS]
    if unknown:
        raise UserError(f"{path}: unknown key {', '.join(map(str, unknown))} — known: {', '.join(TOP_KEYS)}")
    models = _names(doc, "models", path)
    datasets = _names(doc, "datasets", path, benchmarks.NAMES)
    modes = _names(doc, "modes", path, results.MODES) if "modes" in doc else ["regular"]
    stages = doc.get("stages")
    if not isinstance(stages, dict) or not stages:
        raise UserError(f"{path}: `stages` must map stage names to their flags — e.g. stages: {{generate: {{}}}}")
    entries = []
    for key, flags in stages.items():
        flags = dict(flags or {})
        stage = str(flags.pop("stage", key))
        if stage not in STAGES:
            raise UserError(f"{path}: stage {stage!r} (of `{key}`) is not sweepable — choose from {', '.join(STAGES)}")
        if "/" in str(key) or not str(key):
            raise UserError(f"{path}: stage key {key!r} must be a plain name")
        if flags.pop("shards", None) is not None:
            raise UserError(f"{path}: `{key}: shards` needs the stages' --shard and btp.merge — leave it out for now")
        res = flags.pop("resources", None) or {}
        if not isinstance(res, dict):
            raise UserError(f"{path}: `{key}: resources` must be a mapping such as {{num_gpus: 1}}")
        entries.append((str(key), stage, flags, res))
    entries.sort(key=lambda e: STAGES.index(e[1]))  # topological: a stage only waits for earlier ones
    rdir = str(Path(doc.get("results_dir") or "results").resolve())
    retries = doc.get("retries", 0)
    if not isinstance(retries, int) or retries < 0:
        raise UserError(f"{path}: `retries` must be a count >= 0")
    jobs: list[Job] = []
    for model in models:
        for ds in datasets:
            jobs += _expand(entries, model, ds, modes, rdir, path, jobs)
    return Sweep(str(doc.get("name") or path.stem), rdir, retries, tuple(jobs))


def _expand(entries: list, model: str, ds: str, modes: list[str], rdir: str, path: Path, before: list[Job]) -> list:
    """The jobs of one model x dataset, in stage order."""
    base = ["--model", model, "--dataset", ds, "--results-dir", rdir]
    slug = results.model_slug(model)
    out: list[Job] = []
    levels = {j.id: j.level for j in before}

    def ids(stage: str, mode: str | None = None) -> list[str]:
        return [j.id for j in out if j.stage == stage and (mode is None or j.id.endswith("/" + mode))]

    for key, stage, flags, res in entries:
        argv = flag_argv(flags, f"{path}: {key}")
        for mode in modes if stage in PER_MODE else [None]:
            after: list[str] = []
            if stage == "evaluate":
                after = ids("generate")
            elif stage in PER_MODE and str(flags.get("source", "generations")) != "reference":
                after = ids("evaluate") or ids("generate")
            for prior in WARM_START.get(stage, ()):
                after += ids(prior, mode)
            jid = "/".join([key, slug, ds] + ([mode] if mode else []))
            level = 1 + max((levels[a] for a in after), default=-1)
            levels[jid] = level
            mode_argv = ["--mode", mode] if mode else []
            out.append(Job(jid, stage, tuple(base + mode_argv + argv), tuple(after), level, res))
    return out
