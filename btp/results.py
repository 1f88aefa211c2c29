"""Every output's place and name, and the claim a stage makes on it before it loads weights.

- Layout: `results/<model-slug>/<dataset>/` holds generations/evaluations; analysis stages write under
  `<stage-dir>/<stem>[_<part>].<ext>` (`entropy/regular.npz`, `ablation/regular-mean_knockout.json`).
- Stem grammar (`Stem`): `<mode>[-<population>][-<variant>...]`, e.g. `regular`, `chain_code-reference`,
  `regular-incorrect`, `regular-all-mean-layers0_5`, `regular-token-signed-mytag`. Formatted and parsed here only.
- Identity and claim (`claim`): an output remembers the identity it was written with (samples, model revision,
  dtype, every setting that changes numbers); a rerun is fresh, resumes, or is done, and refuses a file of
  another identity naming the field that differs.
- Runs files, staleness and the readers that check, plots and notebooks use.
- Pruned inference: `pruned/base/`, `pruned/<setting>/` and its controls `pruned/<setting>/random<i>/` (each with
  generations, evaluations, summary and `headset.json`), `pruned/comparison.json`; surgery checkpoints under
  `$BTP_CACHE/pruned/<hash>/` (else `<results>/.cache/pruned/<hash>/`).

Light on purpose (numpy and the store only): `check` imports it without torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import store
from .store import MalformedFileError, iter_jsonl, read_json, read_npz, runs_path, write_json, write_npz  # noqa: F401

# Layers everywhere (head ids L<l>H<h>, matrices' rows, the lens's columns, axes) are transformer blocks counted from
# 0, as in the model's `layers[i]`; every analysis output says so in its provenance (`layer_numbering`).
LAYER_NUMBERING = "block index, 0-based"
LAYER_AXIS = "layer (block index, 0-based)"
# the lens reads the residual stream after each block; the embeddings (before block 0) are not read, and the last
# block's column is the model's own output
LENS_AXIS = "residual after block (block index, 0-based; last: the model's output)"

MODES = ("regular", "chain_code")
SOURCES = ("generations", "reference")
# `*_paired`: only problems that have both correct and incorrect generations, so that correct vs incorrect compares
# the same problems (not easy vs hard ones)
SELECTS = ("correct", "incorrect", "all", "correct_paired", "incorrect_paired")
PAIRED = {"correct_paired": "correct", "incorrect_paired": "incorrect"}  # paired select -> its verdict
# stage name -> its folder under results/<model>/<dataset>/
STAGE_DIRS = {"entropy_lens": "entropy", "ablation": "ablation", "taylor": "taylor", "cmaes": "cmaes"}
GENERATIONS, EVALUATIONS, SUMMARY = "generations.jsonl", "evaluations.jsonl", "summary.json"  # per dataset dir
CIRCUITS = "circuits"  # cross-model outputs: `results/circuits/<base-slug>__<other-slug>.<ext>`
# `btp.evaluate --reference` (the harness self-check: the benchmark's own solutions) files under this name in the
# place of a model: `results/reference/<dataset>/`; it is no model's results, so "the only model" never means it
REFERENCE = "reference"
KNOCKOUT = "knockout"  # the part name of ablation's knockout curves: `<stem>_knockout.json`
PARTIAL = "partial"  # progress files: `<stem>.partial.npz`, `<stem>_knockout.partial.json`
JSONL_STAGES = ("taylor", "cmaes")  # stages whose output is `<stem>.jsonl` (one record per step)
_POPULATION_WORDS = ("reference", *SELECTS)


# ================================================================ layout


def model_slug(model_id: str) -> str:
    """`Qwen/Qwen2.5-1.5B` -> `Qwen--Qwen2.5-1.5B`; local folders use their last path parts."""
    s = str(model_id).rstrip("/")
    if os.path.isabs(s) or s.startswith("."):
        s = "--".join(Path(s).parts[-2:])
    return s.replace("/", "--").replace(" ", "_")


def dataset_dir(results_dir: str | os.PathLike, model_id: str, dataset: str, *, create: bool = True) -> Path:
    """`results/<model-slug>/<dataset>/`, created if missing (unless `create=False`)."""
    d = Path(results_dir) / model_slug(model_id) / dataset
    if create:
        d.mkdir(parents=True, exist_ok=True)
    return d


def stage_dir(results_dir: str | os.PathLike, model_id: str, dataset: str, stage: str) -> Path:
    """`results/<model-slug>/<dataset>/<stage-dir>/` of a stage (`entropy_lens` -> `entropy`)."""
    return dataset_dir(results_dir, model_id, dataset) / STAGE_DIRS.get(stage, stage)


def model_dir_names(results_dir: str | os.PathLike, model: str) -> list[str]:
    """Folder names `model` may be filed under, most direct first: itself (a slug), its slug (an HF id), or
    (embedded names like smollm2-135m, local folders) the slug of the id btp.models resolves it to; the
    resolution is tried only when neither exists (it imports torch). Only plain names: a model given as a folder
    path is never the results folder itself."""
    root = Path(results_dir)
    names = [n for n in dict.fromkeys((model, model_slug(model))) if n and "/" not in n and n not in (".", "..")]
    if not any((root / n).is_dir() for n in names):
        try:
            from .models import resolve_model

            names.append(model_slug(resolve_model(model).model_id))
        except Exception:  # noqa: BLE001  (an unknown name simply matches nothing)
            pass
    return names


def repo_path(path: str | os.PathLike) -> Path:
    """A relative path as the repository root sees it, when the working directory is inside the repository and the
    path does not exist from there: Jupyter starts a notebook's kernel in `notebooks/`, where `results` means the
    repository's `results/`. Absolute paths, paths that exist, and paths outside a checkout stay as given."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    for d in (Path.cwd(), *Path.cwd().parents):
        if (d / "pyproject.toml").is_file() and (d / "btp").is_dir():
            return d / p
    return p


def model_dirs(results_dir: str | os.PathLike) -> list[Path]:
    """The models' folders under a results tree, sorted: not `circuits/`, the
    reference self-check (`reference_dirs`), hidden ones (`.cache`) or one of files only (`--out results/figures`)."""
    root = Path(results_dir)
    skip = (CIRCUITS, REFERENCE)
    dirs = (p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in skip)
    return sorted(p for p in dirs if not (kids := list(p.iterdir())) or any(c.is_dir() for c in kids))


def reference_dirs(results_dir: str | os.PathLike) -> list[Path]:
    """`results/reference/<dataset>/` of every benchmark whose reference solutions were judged."""
    d = Path(results_dir) / REFERENCE
    return sorted(p for p in d.iterdir() if p.is_dir() and (p / EVALUATIONS).exists()) if d.is_dir() else []


def reference_note(results_dir: str | os.PathLike) -> str | None:
    """One line on the reference self-checks under a tree (`mbpp 500/500 pass`), or None when there are none."""
    parts = []
    for d in reference_dirs(results_dir):
        try:
            s = read_json(d / SUMMARY)
            bad = len(s["problems_never_passed"])
            parts.append(f"{d.name} {s['n_problems'] - bad}/{s['n_problems']} pass")
        except (OSError, ValueError, KeyError, TypeError):
            parts.append(f"{d.name} (no readable {SUMMARY})")
    return f"reference self-check (btp.evaluate --reference): {', '.join(parts)}" if parts else None


def find_model_dir(results_dir: str | os.PathLike, model: str | None) -> Path:
    """`results/<slug>` of `model` (a slug, an HF id, or a name btp.models resolves); with `model=None` the only
    model under `results_dir` (the reference self-check is none: `--model reference` names it).
    FileNotFoundError / ValueError say why none is found."""
    root = Path(results_dir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"results dir {root} not found — give --results-dir (run from the folder that holds "
            "results/, or point at it)"
        )
    models = model_dirs(root)
    if model is None:
        ref = reference_dirs(root)
        if not models:
            raise store.UserError(
                f"no model's results under {root}{', only the reference self-check' if ref else ''} — run "
                f"python -m btp.generate --model M first{f' (or pass --model {REFERENCE})' if ref else ''}"
            )
        if len(models) > 1:
            raise store.UserError(
                f"{root} holds {len(models)} models — pass --model, one of: {', '.join(p.name for p in models)}"
                + (f" (or {REFERENCE}: the harness self-check)" if ref else "")
            )
        return models[0]
    for name in model_dir_names(root, model):
        if (root / name).is_dir():
            return root / name
    have = [p.name for p in models] + ([REFERENCE] if reference_dirs(root) else [])
    raise FileNotFoundError(f"no results for model {model!r} under {root} — have: {', '.join(have) or 'none'}")


def circuits_paths(results_dir: str | os.PathLike, base_id: str, other_id: str) -> dict[str, Path]:
    """`results/circuits/<base-slug>__<other-slug>.{csv,json,npz}`: one comparison of two models."""
    stem = f"{model_slug(base_id)}__{model_slug(other_id)}"
    d = Path(results_dir) / CIRCUITS
    return {ext: d / f"{stem}.{ext}" for ext in ("csv", "json", "npz")}


def model_slugs(model: str) -> list[str]:
    """Slugs a model may be filed under: as given, slugged, and the slug of the id btp.models resolves it to."""
    out = [model, model_slug(model)]
    try:
        from .models import resolve_model

        out.append(model_slug(resolve_model(model).model_id))
    except Exception:  # noqa: BLE001  (names that do not resolve are taken as ids)
        pass
    return list(dict.fromkeys(out))


def circuit_names(results_dir: str | os.PathLike) -> list[str]:
    """Finished circuit comparisons (`<base-slug>__<other-slug>`: json and npz written)."""
    d = Path(results_dir) / CIRCUITS
    return sorted(p.stem for p in d.glob("*.json") if (d / f"{p.stem}.npz").exists()) if d.is_dir() else []


def read_circuits(results_dir: str | os.PathLike, name: str) -> tuple[dict, dict] | None:
    """(npz arrays without provenance, json metadata) of a circuit comparison; None when it does not exist."""
    d = Path(results_dir) / CIRCUITS
    if not (d / f"{name}.json").exists():
        return None
    data = read_npz(d / f"{name}.npz")
    data.pop("provenance", None)
    return data, read_json(d / f"{name}.json")


def generations_dir(results_dir: str | os.PathLike, model: str, dataset: str) -> tuple[Path, str]:
    """The folder holding a model's generations and the model id it is filed under: the name as given when
    its folder has them, else the id btp.models resolves it to (embedded names)."""
    d = dataset_dir(results_dir, model, dataset, create=False)
    if (d / GENERATIONS).exists():
        return d, model
    from .models import resolve_model

    try:
        model_id = resolve_model(model).model_id
    except store.UserError:  # a name no model answers to: taken as an id (its missing files are the error)
        model_id = model
    return dataset_dir(results_dir, model_id, dataset), model_id


def evaluations_path(programs: str | os.PathLike) -> Path:
    """Where the verdicts of a programs file go: `generations.jsonl` -> `evaluations.jsonl` beside it, any other
    `x.jsonl` -> `x.evaluations.jsonl`."""
    p = Path(programs)
    return p.with_name(EVALUATIONS if p.name == GENERATIONS else p.stem + ".evaluations.jsonl")


def summary_path(evaluations: str | os.PathLike) -> Path:
    """`evaluations.jsonl` -> `summary.json`; `x.evaluations.jsonl` -> `x.summary.json`."""
    p = Path(evaluations)
    return p.with_name(SUMMARY if p.name == EVALUATIONS else p.name.replace(".evaluations.jsonl", ".summary.json"))


# ================================================================ sweeps

SWEEPS = ".sweeps"  # `results/.sweeps/<sweep>/`: plan.json, jobs/<job>.json (each job's state), logs/<job>.log
SWEEP_PLAN = "plan.json"
JOB_STATES = ("running", "done", "skipped", "failed", "blocked")  # skipped: done before; blocked: a dependency failed


def sweep_dir(results_dir: str | os.PathLike, name: str) -> Path:
    """`results/.sweeps/<name>/` of a sweep (a dot folder: no model is filed there)."""
    return Path(results_dir) / SWEEPS / name


def _job_file(job_id: str) -> str:
    return job_id.replace("/", "__")


def job_state_path(results_dir: str | os.PathLike, name: str, job_id: str) -> Path:
    """One file per job (`jobs/<job>.json`), written atomically by whoever runs it: a driver, a Ray task, or a
    SLURM array task, so concurrent runners never rewrite each other's state."""
    return sweep_dir(results_dir, name) / "jobs" / f"{_job_file(job_id)}.json"


def job_log_path(results_dir: str | os.PathLike, name: str, job_id: str) -> Path:
    """The job's log (`logs/<job>.log`): every attempt's commands and output, appended."""
    return sweep_dir(results_dir, name) / "logs" / f"{_job_file(job_id)}.log"


def sweep_names(results_dir: str | os.PathLike) -> list[str]:
    """Sweeps that ran on a results tree (their plan is written)."""
    d = Path(results_dir) / SWEEPS
    return sorted(p.name for p in d.iterdir() if (p / SWEEP_PLAN).exists()) if d.is_dir() else []


def read_job_states(results_dir: str | os.PathLike, name: str, job_ids: Sequence[str]) -> dict[str, dict]:
    """{job id: its last recorded state} for the jobs that have one. A `running` job whose process is gone (same
    host, no such pid) reads as `stopped`."""
    import platform

    out = {}
    for j in job_ids:
        p = job_state_path(results_dir, name, j)
        if not p.exists():
            continue
        st = read_json(p)
        if st.get("state") == "running" and st.get("host") == platform.node() and not _alive(st.get("pid")):
            st = {**st, "state": "stopped"}
        out[j] = st
    return out


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except PermissionError:  # another user's process: alive
        return True
    except (OSError, TypeError, ValueError):
        return False
    return True


# ================================================================ pruned inference

PRUNED = "pruned"  # `results/<slug>/<ds>/pruned/`: one folder per setting, and the comparison
COMPARISON = "comparison.json"  # `pruned/comparison.json`: every arm's pass@k and paired statistics
HEADSET = "headset.json"  # per arm: the heads removed, their provenance, the held-out CE, the arm's identity
BASE_ARM = "base"  # `pruned/base/`: the unpruned model, re-run under the same settings
CONTROL = "random"  # `pruned/<setting>/random<i>/`: control i of a setting


def setting_folder(setting: str) -> str:
    """A setting's folder name: `taylor:10%` -> `taylor-10pct`, `heads:L3H1,L7H0` -> `heads-L3H1_L7H0`,
    `ablation:top32@regular-reference` -> `ablation-top32@regular-reference`."""
    name = setting.strip().replace("%", "pct").replace(":", "-").replace(",", "_").replace(" ", "")
    if not name or name.startswith(".") or "/" in name or name == BASE_ARM:
        raise ValueError(f"setting {setting!r} does not make a folder name")
    return name


def pruned_dir(results_dir: str | os.PathLike, model_id: str, dataset: str) -> Path:
    return dataset_dir(results_dir, model_id, dataset, create=False) / PRUNED


def arm_dir(pruned: Path, setting: str | None = None, control: int | None = None) -> Path:
    """`pruned/base/` (no setting), `pruned/<folder>/`, or `pruned/<folder>/random<i>/` (a control)."""
    if setting is None:
        return pruned / BASE_ARM
    d = pruned / setting_folder(setting)
    return d if control is None else d / f"{CONTROL}{int(control)}"


def arm_files(arm: Path) -> dict[str, Path]:
    """An arm's files: generations, evaluations and summary (as the generate/evaluate stages name them beside
    each other) and its head set."""
    return {
        "generations": arm / GENERATIONS,
        "evaluations": arm / EVALUATIONS,
        "summary": arm / SUMMARY,
        "headset": arm / HEADSET,
    }


def checkpoint_dir(results_dir: str | os.PathLike, key: str) -> Path:
    """Where a pruned checkpoint is cached: `$BTP_CACHE/pruned/<key>/`, else `<results>/.cache/pruned/<key>/`
    (`key`: `checkpoint_key`)."""
    root = os.environ.get("BTP_CACHE")
    return (Path(root) if root else Path(results_dir) / ".cache") / PRUNED / key


def checkpoint_key(model_id: str, revision: str | None, dtype: str, heads: Sequence[Sequence[int]]) -> str:
    """The cache key of a pruned checkpoint: a hash of the model, its revision, the dtype and the sorted heads."""
    hs = sorted([int(l), int(h)] for l, h in heads)
    return identity_key({"model": model_id, "revision": revision, "dtype": dtype, "heads": hs})


def read_comparison(results_dir: str | os.PathLike, model: str, dataset: str) -> dict | None:
    """`pruned/comparison.json` of a model x dataset (a slug, an HF id or an embedded name); None if absent."""
    try:
        d = find_model_dir(results_dir, model) / dataset / PRUNED
    except (FileNotFoundError, ValueError):
        return None
    return read_json(d / COMPARISON) if (d / COMPARISON).exists() else None


def pruned_progress(pruned: Path) -> dict[str, dict]:
    """{setting folder: {arms, generated, evaluated, summarized}} of a `pruned/` folder: how many arms (the
    setting and its controls; `base` alone) have their head set, generations, evaluations and summary."""
    out: dict[str, dict] = {}
    if not pruned.is_dir():
        return out
    for d in sorted(p for p in pruned.iterdir() if p.is_dir() and not p.name.startswith(".")):
        arms = [d] + sorted(p for p in d.iterdir() if p.is_dir() and p.name.startswith(CONTROL))
        out[d.name] = {
            k: sum((a / f).exists() for a in arms)
            for k, f in (
                ("arms", HEADSET),
                ("generated", GENERATIONS),
                ("evaluated", EVALUATIONS),
                ("summarized", SUMMARY),
            )
        }
    return out


def cmaes_removed(stage_path: str | os.PathLike, name: str | None = None) -> tuple[list[tuple[int, int]], str]:
    """(heads removed by the final CMA-ES mask, the output's name) of a finished `cmaes/<name>` (default: the first
    finished one, in plot order). FileNotFoundError says when no finished CMA-ES output exists."""
    d = Path(stage_path)
    names = [n for n in list_outputs(d, "cmaes") if read_cmaes(d, n)[1] is not None]
    if name is None and not names:
        raise FileNotFoundError(f"no finished CMA-ES output under {d}: run `python -m btp.cmaes_search` first")
    name = name or names[0]
    final = read_cmaes(d, name)[1] if (d / file_name(name, "jsonl")).exists() else None
    if final is None:
        raise FileNotFoundError(f"no finished CMA-ES output {d / name} (have: {', '.join(names) or 'none'})")
    rows = (final.get("final") or {}).get("mask")
    if rows is None:
        raise ValueError(f"{d / file_name(name, 'json')}: no final mask (expected `final.mask`)")
    keep = mask_from_rows(rows)
    return [(int(l), int(h)) for l, h in zip(*np.nonzero(keep == 0.0))], name


# ================================================================ stem grammar


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (0-based): the units of work (samples, (sample, layer) pairs, arms) whose position
    k in the unsharded run's order has k % count == index. Round-robin, so that every shard gets a like share of
    cheap and costly units (early and late layers, short and long samples). Named `shard<index>of<count>`."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not (self.count >= 1 and 0 <= self.index < self.count):
            raise ValueError(f"shard {self.index}/{self.count}: want i/N with 0 <= i < N (0-based), e.g. 0/4 .. 3/4")

    def take(self, n: int) -> list[int]:
        """The positions among n units that this shard computes."""
        return list(range(self.index, n, self.count))

    @property
    def label(self) -> str:
        return f"{self.index}/{self.count}"

    def __str__(self) -> str:
        return f"{SHARD_WORD}{self.index}of{self.count}"

    @classmethod
    def from_word(cls, word: str) -> Shard | None:
        """`shard2of4` -> Shard(2, 4); None for any other word."""
        m = _SHARD_RE.fullmatch(word)
        return cls(int(m[1]), int(m[2])) if m else None


SHARD_WORD = "shard"
_SHARD_RE = re.compile(SHARD_WORD + r"(\d+)of(\d+)")


@dataclass(frozen=True)
class Stem:
    """The name of an analysis output without its part and extension: the analysis samples' mode and population,
    then a stage's variant words in order (ablation `mean`, `layers0_5`; Taylor `token`, `signed`, `nonorm`, a
    tag), then the shard of a sharded run (`-shard0of4`, always last; `btp.merge` combines a full set into the
    output without it). The default population (correct generations) is not written; reference solutions are all
    correct."""

    mode: str = "regular"
    source: str = "generations"
    select: str = "correct"
    variant: tuple[str, ...] = ()
    shard: Shard | None = None

    def __post_init__(self) -> None:
        if self.source == "reference":
            object.__setattr__(self, "select", "all")
        for name, allowed in (("mode", MODES), ("source", SOURCES), ("select", SELECTS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        words = [w for v in self.variant for w in v.split("-")]
        bad = [
            v
            for v in words
            if not v or "." in v or "/" in v or v.endswith("_" + KNOCKOUT) or Shard.from_word(v) is not None
        ]
        if bad or (words and words[0] in _POPULATION_WORDS):
            raise ValueError(
                f"bad output name variant {self.variant!r}: words must be non-empty, without '.', '/', "
                f"a trailing _{KNOCKOUT}, nor be a shard word, nor start with a population name {_POPULATION_WORDS}"
            )

    @property
    def population(self) -> str:
        """`source/select`, e.g. `generations/correct`, `reference/all`."""
        return f"{self.source}/{self.select}"

    @property
    def extra(self) -> str:
        """The variant words joined, e.g. `mean-layers0_5` ('' when none)."""
        return "-".join(self.variant)

    def with_variant(self, *words: str | None) -> Stem:
        """This stem with more variant words (None and '' skipped)."""
        return Stem(self.mode, self.source, self.select, self.variant + tuple(w for w in words if w), self.shard)

    def with_shard(self, shard: Shard | None) -> Stem:
        """The name of shard `shard` of this output (None: the whole output)."""
        return Stem(self.mode, self.source, self.select, self.variant, shard)

    @property
    def base(self) -> Stem:
        """The samples' part of the name: mode and population only."""
        return Stem(self.mode, self.source, self.select)

    def __str__(self) -> str:
        pop = "-reference" if self.source == "reference" else ("" if self.select == "correct" else f"-{self.select}")
        return self.mode + pop + "".join(f"-{v}" for v in self.variant) + (f"-{self.shard}" if self.shard else "")


def parse_stem(name: str) -> Stem:
    """`Stem` of an output name; `str(parse_stem(s)) == s` for every name a stage writes. A name that starts
    with no known mode raises ValueError."""
    mode = next((m for m in MODES if name == m or name.startswith(m + "-")), None)
    if mode is None:
        raise ValueError(f"output name {name!r} does not start with a mode {MODES}")
    rest = [t for t in name[len(mode) :].split("-")]
    rest = rest[1:] if rest and rest[0] == "" else rest
    source, select = "generations", "correct"
    shard = Shard.from_word(rest[-1]) if rest else None
    rest = rest[:-1] if shard else rest
    if rest and rest[0] == "reference":
        source, select, rest = "reference", "all", rest[1:]
    elif rest and rest[0] in SELECTS:
        select, rest = rest[0], rest[1:]
    return Stem(mode, source, select, tuple(rest), shard)


def try_parse_stem(name: str) -> Stem | None:
    try:
        return parse_stem(name)
    except ValueError:
        return None


@dataclass(frozen=True)
class FileName:
    """One file of a stage folder: `<stem>[_<part>].<ext>`, e.g. `regular-all_knockout.partial.json`
    -> stem `regular-all`, part `knockout`, ext `partial.json`."""

    stem: str
    part: str
    ext: str

    @property
    def is_partial(self) -> bool:
        return self.ext.startswith(PARTIAL + ".")

    @property
    def is_runs(self) -> bool:
        return self.ext == "runs.json"

    @property
    def name(self) -> str:
        """The output name with its part: what check lists (`regular`, `regular_knockout`)."""
        return self.stem + (f"_{self.part}" if self.part else "")


def file_name(stem: Stem | str, ext: str, part: str = "") -> str:
    return f"{stem}{'_' + part if part else ''}.{ext}"


def parse_file_name(name: str) -> FileName:
    """`regular-mean_knockout.json` -> FileName('regular-mean', 'knockout', 'json')."""
    head, _, ext = name.partition(".")
    part = ""
    if head.endswith("_" + KNOCKOUT):
        head, part = head[: -len(KNOCKOUT) - 1], KNOCKOUT
    return FileName(head, part, ext)


@dataclass(frozen=True)
class Output:
    """Where one analysis output's files live: `<dir>/<stem>[_<part>].<ext>`."""

    dir: Path
    stem: Stem

    def path(self, ext: str, part: str = "") -> Path:
        return self.dir / file_name(self.stem, ext, part)

    def partial(self, ext: str, part: str = "") -> Path:
        return self.path(f"{PARTIAL}.{ext}", part)

    @property
    def name(self) -> str:
        return str(self.stem)


def output(results_dir: str | os.PathLike, model_id: str, dataset: str, stage: str, stem: Stem | str) -> Output:
    return Output(stage_dir(results_dir, model_id, dataset, stage), parse_stem(stem) if isinstance(stem, str) else stem)


def list_outputs(stage_path: str | os.PathLike, stage: str) -> list[str]:
    """Finished outputs in a stage folder, in plot order (correct generations first, regular before chain_code):
    Taylor and CMA-ES `<stem>.jsonl`; entropy/ablation `<stem>.npz` with its `<stem>.json`."""
    d = Path(stage_path)
    if not d.is_dir():
        return []
    names = []
    for p in d.iterdir():
        f = parse_file_name(p.name)
        st = try_parse_stem(f.stem)
        if f.part or st is None or st.shard is not None:  # a shard is no output of its own (btp.merge makes one)
            continue
        jsonl = stage in JSONL_STAGES
        if (jsonl and f.ext == "jsonl") or (not jsonl and f.ext == "npz" and (d / file_name(f.stem, "json")).exists()):
            names.append(f.stem)
    return sorted(names, key=stem_order)


def shard_sets(stage_path: str | os.PathLike, files: Sequence[str] = ("npz", "json")) -> dict[str, dict]:
    """The shards in a stage folder, by the name of the output they make up: {name: {"count": N, "done": [i, ...]
    (all of `files` written), "partial": [i, ...] (a progress file only), "counts": every N seen (several: a
    mixed-up folder)}}."""
    d = Path(stage_path)
    out: dict[str, dict] = {}
    if not d.is_dir():
        return out
    found: dict[tuple[str, Shard], set[str]] = {}
    for p in d.iterdir():
        f = parse_file_name(p.name)
        st = try_parse_stem(f.stem)
        if st is None or st.shard is None or f.part:
            continue
        found.setdefault((str(st.with_shard(None)), st.shard), set()).add(f.ext)
    for (name, sh), exts in sorted(found.items(), key=lambda kv: (kv[0][0], kv[0][1].count, kv[0][1].index)):
        e = out.setdefault(name, {"count": sh.count, "done": [], "partial": [], "counts": []})
        if sh.count not in e["counts"]:
            e["counts"].append(sh.count)
        if set(files) <= exts:
            e["done"].append(sh.index)
        elif any(x.startswith(PARTIAL + ".") for x in exts):
            e["partial"].append(sh.index)
    for e in out.values():
        e["count"] = max(e["counts"])
    return out


def missing_shards(count: int, done: Sequence[int]) -> list[str]:
    """Labels `i/N` of the shards of a set of `count` that are not done."""
    return [Shard(i, count).label for i in range(count) if i not in set(done)]


def pruned_shard_path(pruned: Path, shard: Shard) -> Path:
    """`pruned/shard<i>of<N>.json`: the record of a sharded pruned run (its arms, identity, provenance)."""
    return pruned / f"{shard}.json"


def pruned_shards(pruned: Path) -> dict[int, list[int]]:
    """{N: [indices of recorded shards]} of a `pruned/` folder."""
    out: dict[int, list[int]] = {}
    for p in sorted(pruned.glob(f"{SHARD_WORD}*.json")) if pruned.is_dir() else []:
        sh = Shard.from_word(p.stem)
        if sh is not None:
            out.setdefault(sh.count, []).append(sh.index)
    return {n: sorted(v) for n, v in out.items()}


def stem_order(name: str) -> tuple:
    s = parse_stem(name)
    return (s.population != "generations/correct", s.population, MODES.index(s.mode), s.extra)


# ================================================================ identity and claim


def code_sha(code: str) -> str:
    """The identity of judged code: an evaluation record carries it, so a verdict is matched to the generation whose
    code it judged (a regenerated sample's old verdict is refused)."""
    return hashlib.sha256(code.encode("utf-8", "surrogatepass")).hexdigest()[:16]  # total: lone surrogates too


class IdentityError(ValueError):
    """An output exists with another identity; the message names the first field that differs."""

    def __init__(self, path: Path, field_name: str, old: Any, new: Any):
        self.path, self.field, self.old, self.new = path, field_name, old, new
        short = lambda v: s if len(s := json.dumps(v, default=str)) <= 80 else s[:77] + "..."
        super().__init__(
            f"{path} exists for other {field_name} (written with {short(old)}, this run has "
            f"{short(new)}) — use --force to overwrite or another --results-dir"
        )


def identity_key(identity: dict) -> str:
    """A short hash of an identity (tags partial-progress files)."""
    return hashlib.sha1(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sample_identity(fields: dict[str, np.ndarray]) -> dict:
    """The identity of a sample set from its fields (`SampleSet.fields()`): which samples, and a hash of their
    exact tokens and scored positions (so a change of mode, max_tokens or the generations themselves shows)."""
    h = hashlib.sha1()
    for k in ("input_ids", "sample_offsets", "position", "token_id"):
        h.update(np.ascontiguousarray(fields[k], dtype=np.int64).tobytes())
    return {
        "samples": [[str(p), int(s)] for p, s in zip(fields["sample_problem_id"], fields["sample_number"])],
        "tokens": h.hexdigest()[:16],
    }


def identity_diff(old: dict | None, new: dict) -> tuple[str, Any, Any] | None:
    """The first field of `new` (in its order) whose value differs in `old`: (field, old value, new value)."""
    if old is None:
        return "identity", None, "(an identity)"
    norm = lambda v: json.loads(json.dumps(v, sort_keys=True, default=str))
    for k, v in new.items():
        if norm(old.get(k)) != norm(v):
            return k, old.get(k), v
    extra = [k for k in old if k not in new]
    return (extra[0], old[extra[0]], None) if extra else None


def check_record(rec: dict, expect: dict, where: str, *, hint: str) -> None:
    """A record of a resumed file (e.g. a Taylor iteration) must carry the values this run has for `expect`'s
    fields; the ValueError names the first field that differs."""
    diff = identity_diff({k: rec.get(k) for k in expect}, expect)
    if diff is not None:
        k, old, new = diff
        short = lambda v: s if len(s := json.dumps(v, default=str)) <= 80 else s[:77] + "..."
        raise ValueError(f"{where}: written with other {k} ({short(old)}, this run has {short(new)}); {hint}")


FRESH, RESUME, DONE = "fresh", "resume", "done"


@dataclass
class Claim:
    """What a stage does with one output: `fresh` (nothing usable there), `resume` (progress of this identity
    exists), or `done` (finished with this identity)."""

    state: str
    output: Output
    identity: dict
    part: str = ""

    @property
    def key(self) -> str:
        return identity_key(self.identity)

    @property
    def done(self) -> bool:
        return self.state == DONE

    @property
    def stamp(self) -> dict:
        return identity_stamp(self.identity)


def identity_stamp(identity: dict) -> dict:
    """The fields an output's provenance carries so that a later claim can compare: the identity and its key."""
    return {"run_key": identity_key(identity), "identity": identity}


def stored_identity(record: Path) -> dict | None:
    """The identity an output was written with: the `identity` of its JSON record, or of the last run of a runs
    file (a list of stamps)."""
    if not record.exists():
        return None
    doc = read_json(record)
    if isinstance(doc, list):
        doc = doc[-1] if doc else {}
    return doc.get("identity") if isinstance(doc, dict) else None


def claim(
    out: Output,
    identity: dict,
    *,
    force: bool,
    files: Sequence[str],
    record: str = "json",
    part: str = "",
    partials: Sequence[str] = (),
    complete: Callable[[], bool] | None = None,
    append: bool = False,
) -> Claim:
    """The one check every stage makes before it loads weights.

    `files`: extensions of the output's files (all present: it exists); `record`: the extension of the file
    holding its identity (`json`, or `runs.json` for a JSONL output); `partials`: extensions of progress files
    (`npz` for `<stem>.partial.npz`); `complete`: whether an existing output is finished (default: it is);
    `append`: the output grows by appending (JSONL), so `--force` must remove it.
    With `force` the progress files (and an append-only output) are removed and the claim is fresh; other files
    are replaced atomically when the new ones are written, so a failed forced run leaves the old output intact.
    An existing output of another identity raises IdentityError naming the field that differs."""
    paths = [out.path(e, part) for e in files]
    progress = [out.partial(e, part) for e in partials]
    if force:
        for p in progress + (paths if append else []):
            p.unlink(missing_ok=True)
        return Claim(FRESH, out, identity, part)
    if all(p.exists() for p in paths):
        diff = identity_diff(stored_identity(out.path(record, part)), identity)
        if diff is not None:
            raise IdentityError(paths[0], *diff)
        return Claim(DONE if complete is None or complete() else RESUME, out, identity, part)
    ok = [p for p in progress if read_partial(p, identity_key(identity), quiet=True) is not None]
    return Claim(RESUME if ok else FRESH, out, identity, part)


# ================================================================ partial progress


def read_partial(path: Path | None, key: str, *, quiet: bool = False) -> dict | None:
    """A progress file's state (npz arrays, a pickled dict (`.pkl`), or a JSON object) if it exists, is readable
    and belongs to the identity whose key is `key`; None otherwise (with a warning unless `quiet`)."""
    if path is None or not path.exists():
        return None
    try:
        st = (
            read_npz(path)
            if path.name.endswith(".npz")
            else store.read_pickle(path)
            if path.name.endswith(".pkl")
            else read_json(path)
        )
    except Exception as e:  # noqa: BLE001  (a partial file is a cache: unreadable means start afresh)
        if not quiet:
            warnings.warn(f"[btp.results] ignoring unreadable partial file {path}: {e}", stacklevel=2)
        return None
    if not isinstance(st, dict) or str(st.pop("key", "")) != key:
        if not quiet:
            warnings.warn(f"[btp.results] {path} belongs to another configuration; starting afresh", stacklevel=2)
        return None
    st.pop("provenance", None)
    return st


def write_partial(path: Path | None, key: str, state: dict) -> None:
    """Save progress tagged with its identity key (npz arrays, a pickle or a JSON object, by the file's
    extension)."""
    if path is None:
        return
    if path.name.endswith(".npz"):
        write_npz(path, key=np.array(key), **state)
    elif path.name.endswith(".pkl"):
        store.write_pickle(path, {"key": key, **state})
    else:
        write_json(path, {"key": key, **state})


# ================================================================ runs files and staleness


def read_runs(path: str | os.PathLike) -> list[dict]:
    """The stamps of the runs that appended to a JSONL output (`<stem>.runs.json`), oldest first; [] if none."""
    rp = runs_path(path)
    if not rp.exists():
        return []
    runs = read_json(rp)
    return runs if isinstance(runs, list) else []


def check_runs(
    path: str | os.PathLike, config: dict, keys: Sequence[str], *, what: str, hint: str, runs: set | None = None
) -> None:
    """Refuse to add records made with other settings to a JSONL output: every run in its runs file (or only
    those in `runs`, the runs whose records are still in use) must agree with `config` on `keys`. The
    UserError (one line at the command line) names the run and each differing setting as (old, new)."""
    for run in read_runs(path):
        if runs is not None and run.get("run") not in runs:
            continue
        old = run.get("config") or {}
        diff = {k: (old.get(k), config.get(k)) for k in keys if k in old and old.get(k) != config.get(k)}
        if diff:
            raise store.UserError(
                f"{path} holds {what} of run {run.get('run')} with other settings {diff} (old, new) — {hint}"
            )


def mtime(p: str | os.PathLike) -> float | None:
    try:
        return Path(p).stat().st_mtime
    except OSError:
        return None


def is_stale(output_path: str | os.PathLike, *inputs: str | os.PathLike) -> bool:
    """True when `output_path` exists and is older than any existing input. Only for outputs written before they
    recorded their inputs (`inputs`): file times change under `cp -r`, content does not."""
    t = mtime(output_path)
    return t is not None and any((ti := mtime(i)) is not None and ti > t for i in inputs)


_HASHED: dict[tuple, dict] = {}  # (path, size, mtime_ns) -> identity: a check hashes each input once


def input_identity(path: str | os.PathLike) -> dict | None:
    """{size, sha256} of a file's bytes, None when it does not exist: what an output records of each input it read
    (`inputs` in its provenance), so that staleness is judged by content and a copy of a clean tree stays clean."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return None
    memo = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _HASHED:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        _HASHED[memo] = {"size": st.st_size, "sha256": h.hexdigest()[:32]}
    return dict(_HASHED[memo])


def analysis_inputs(ds_dir: str | os.PathLike, source: str, select: str) -> dict[str, dict]:
    """The identities of the files an analysis population is read from, by name: `generations.jsonl` (source
    generations) and the `evaluations.jsonl` whose verdicts chose them (any select but all)."""
    if source != "generations":
        return {}
    names = (GENERATIONS,) + ((EVALUATIONS,) if select != "all" else ())
    return {n: ident for n in names if (ident := input_identity(Path(ds_dir) / n)) is not None}


def changed_inputs(ds_dir: str | os.PathLike, recorded: dict) -> list[str]:
    """The recorded inputs (name -> identity, beside each other in `ds_dir`) whose content is not what was read."""
    now = lambda n: input_identity(Path(ds_dir) / n) or {}
    return [n for n, ident in recorded.items() if {k: now(n).get(k) for k in ("size", "sha256")} != ident]


def _stamp_of(stage_path: Path, f: FileName) -> dict | None:
    """The provenance an output file was written with: its `<stem>[_<part>].json`, else the last run of its
    `<stem>.jsonl` (Taylor, CMA-ES), else the stamp inside its `<stem>.npz`; None when unreadable or absent."""
    try:
        js = stage_path / file_name(f.stem, "json", f.part)
        if js.exists():
            doc = read_json(js)
            if isinstance(doc, dict) and ("inputs" in doc or "identity" in doc):
                return doc
        runs = read_runs(stage_path / file_name(f.stem, "jsonl"))
        if runs and isinstance(runs[-1], dict):
            return runs[-1]
        npz = stage_path / file_name(f.stem, "npz")
        if not f.part and npz.exists():
            with np.load(npz, allow_pickle=False) as z:  # the stamp only, not the arrays
                return json.loads(str(z["provenance"])) if "provenance" in z.files else None
    except (MalformedFileError, OSError, UnicodeDecodeError, ValueError, EOFError, zipfile.BadZipFile):
        pass  # a broken file is reported as broken, not as stale
    return None


def staleness(ds_dir: Path, stage_path: Path, name: str) -> str | None:
    """Why an analysis file `<stage-dir>/<name>` is stale, or None: an input it recorded (the generations it was
    computed from, the evaluations that chose them) has other content now, or (a part such as the knockout curves)
    its own matrix was recomputed with another identity. Outputs that record no inputs (older versions) fall back to
    file times."""
    f = parse_file_name(name)
    if f.is_partial or f.is_runs:
        return None
    stamp = _stamp_of(stage_path, f)
    matrix = _stamp_of(stage_path, FileName(f.stem, "", "json")) if f.part else None
    if stamp is not None and "inputs" in stamp:
        changed = changed_inputs(ds_dir, stamp["inputs"])
        if changed:
            return f"{' and '.join(changed)} changed since it was computed"
        want = (stamp.get("identity") or {}).get("matrix")
        if f.part and matrix is not None and want is not None and matrix.get("run_key") != want:
            return f"computed for another {file_name(f.stem, 'npz')} (recomputed since)"
        return None
    s = try_parse_stem(f.stem)
    p = stage_path / name
    gen, ev = ds_dir / GENERATIONS, ds_dir / EVALUATIONS
    if s is not None and s.source == "generations" and is_stale(p, gen):
        return f"older than {GENERATIONS}"
    if s is not None and s.source == "generations" and s.select != "all" and is_stale(p, ev):
        return f"older than {EVALUATIONS}"
    if f.part and is_stale(p, stage_path / file_name(f.stem, "npz")):
        return f"older than {file_name(f.stem, 'npz')}"
    return None


def evaluation_staleness(ds_dir: str | os.PathLike) -> dict[str, str]:
    """{file name: why} for a dataset dir's `evaluations.jsonl` and `summary.json`: the summary records the content
    of the programs and verdicts it summarised (`inputs`), so verdicts are stale when the generations changed since,
    and the summary when the verdicts did. Summaries without `inputs` (older versions) fall back to file times."""
    d = Path(ds_dir)
    gen, ev, summ = d / GENERATIONS, d / EVALUATIONS, d / SUMMARY
    try:
        doc = read_json(summ) if summ.exists() else None
    except (MalformedFileError, OSError, UnicodeDecodeError):
        doc = None
    inputs = doc.get("inputs") if isinstance(doc, dict) else None
    out = {}
    if inputs is None:
        if is_stale(ev, gen):
            out[EVALUATIONS] = f"older than {GENERATIONS}"
        if is_stale(summ, ev):
            out[SUMMARY] = f"older than {EVALUATIONS}"
        return out
    changed = changed_inputs(d, {k: v for k, v in inputs.items() if k in (GENERATIONS, EVALUATIONS)})
    if GENERATIONS in changed and ev.exists():
        out[EVALUATIONS] = f"{GENERATIONS} changed since the last evaluation: rerun btp.evaluate"
    if EVALUATIONS in changed:
        out[SUMMARY] = f"{EVALUATIONS} changed since it was summarised: rerun btp.evaluate"
    return out


# ================================================================ readers


def read_analysis(stage_path: str | os.PathLike, name: str) -> tuple[dict, dict]:
    """(arrays, metadata) of an npz output (entropy, ablation matrix): metadata from `<name>.json`, else the
    npz's provenance stamp."""
    d = Path(stage_path)
    arrays = read_npz(d / file_name(name, "npz"))
    meta_p = d / file_name(name, "json")
    meta = read_json(meta_p) if meta_p.exists() else arrays.get("provenance", {})
    if meta.get("stage") == "entropy_lens" and not meta.get("layer_numbering") and "layer" in arrays:
        # lens outputs before `layer_numbering` counted the residual after block b as layer b + 1 (1..L)
        arrays["layer"] = np.asarray(arrays["layer"]) - 1
        if isinstance((meta.get("summary") or {}).get("layer"), list):
            meta["summary"]["layer"] = [int(x) - 1 for x in meta["summary"]["layer"]]
        meta["layer_numbering"] = LAYER_NUMBERING
    return arrays, meta


def read_knockout(stage_path: str | os.PathLike, name: str) -> dict | None:
    """Ablation's knockout curves of output `name`, None when not computed."""
    p = Path(stage_path) / file_name(name, "json", KNOCKOUT)
    return read_json(p) if p.exists() else None


ATP = "atp"  # the variant word of an attribution-patching screen (ablation `--method atp`)
SAMPLE_FIELDS = ("input_ids", "sample_offsets", "position", "token_id")


def is_estimate(name: str) -> bool:
    """Whether an ablation output holds attribution-patching estimates (`<stem>-atp[-verifyK]`)."""
    st = try_parse_stem(name)
    return st is not None and ATP in st.variant


def exact_counterpart(name: str) -> str:
    """The exact matrix's name for an atp output: the same stem without `atp` and `verify<K>`."""
    st = parse_stem(name)
    keep = tuple(w for w in st.variant if w != ATP and not (w.startswith("verify") and w[6:].isdigit()))
    return str(Stem(st.mode, st.source, st.select, keep))


def ablation_pair(stage_path: str | os.PathLike, name: str) -> tuple[dict, dict] | None:
    """(arrays of the atp output `name`, arrays of the exact matrix) when both exist for the same samples (same
    token ids and scored positions); None otherwise."""
    d = Path(stage_path)
    if not is_estimate(name):
        return None
    ex = exact_counterpart(name)
    if ex not in list_outputs(d, "ablation") or name not in list_outputs(d, "ablation"):
        return None
    a, b = read_npz(d / file_name(name, "npz")), read_npz(d / file_name(ex, "npz"))
    if any(k not in a or k not in b or not np.array_equal(a[k], b[k]) for k in SAMPLE_FIELDS):
        return None
    return a, b


# A Taylor record's fields before they named the state they measure (old name -> name): the scoring pass runs before
# the iteration prunes, the held-out pass and the alive count after it.
TAYLOR_RENAMED = {
    "scoring_loss": "scoring_loss_before",
    "scoring_losses": "scoring_losses_before",
    "heldout_loss": "heldout_loss_after",
    "heldout_losses": "heldout_losses_after",
    "n_alive": "n_alive_after",
}


def taylor_record(rec: dict) -> dict:
    """A Taylor record with today's field names (a record of an older file is renamed, a new one returned as is)."""
    if not any(k in rec for k in TAYLOR_RENAMED):
        return rec
    return {TAYLOR_RENAMED.get(k, k): v for k, v in rec.items()}


def read_taylor(stage_path: str | os.PathLike, name: str) -> tuple[list[dict], dict]:
    """Taylor pruning records (one per iteration, in order, with today's field names: `taylor_record`) and the
    provenance of the run that wrote the last of them (its runs file; else the `<name>.samples.npz` stamp)."""
    d = Path(stage_path)
    path = d / file_name(name, "jsonl")
    recs = sorted((taylor_record(r) for r in iter_jsonl(path)), key=lambda r: r["iteration"])
    runs = read_runs(path)
    meta: dict = runs[-1] if runs else {}
    npz = d / file_name(name, "samples.npz")
    if not runs and npz.exists():
        with np.load(npz, allow_pickle=False) as z:  # the stamp only, not the arrays
            meta = json.loads(str(z["provenance"])) if "provenance" in z.files else {}
    return recs, meta


def importance_matrix(rec: dict, key: str = "importance") -> np.ndarray:
    """A Taylor record's [L, Hmax] matrix back as float64 with NaN at pruned heads and padding."""
    return np.array([[np.nan if x is None else x for x in row] for row in rec[key]], dtype=np.float64)


def importance_matrices(recs: Sequence[dict], key: str = "importance") -> np.ndarray:
    """A Taylor history's matrices stacked: [iterations, L, Hmax]."""
    return np.stack([importance_matrix(r, key) for r in recs]) if recs else np.zeros((0, 0, 0))


def head_importances(results_dir: str | os.PathLike, model_id: str) -> tuple[list[dict], list[str]]:
    """Head-importance matrices [L, Hmax] of a model's finished analyses: ablation `delta_mean` (larger: ablating
    hurts more) and Taylor's first-iteration importance (all heads alive). Returns (analyses as {stage, dataset,
    name, what, importance}, notes on what was found but not read)."""
    root = Path(results_dir) / model_slug(model_id)
    found: list[dict] = []
    notes: list[str] = []
    if not root.is_dir():
        return found, [f"no results of the base model under {root}"]
    for ds in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        abl, tay = ds / STAGE_DIRS["ablation"], ds / STAGE_DIRS["taylor"]
        for name in list_outputs(abl, "ablation"):
            imp = np.asarray(read_analysis(abl, name)[0]["delta_mean"], dtype=np.float64)
            found.append(
                {
                    "stage": "ablation",
                    "dataset": ds.name,
                    "name": name,
                    "what": "delta_mean (ΔCE, atp estimate)" if is_estimate(name) else "delta_mean (ΔCE)",
                    "importance": imp,
                }
            )
        for name in list_outputs(tay, "taylor"):
            recs = read_taylor(tay, name)[0]
            if recs and "importance" in recs[0]:
                found.append(
                    {
                        "stage": "taylor",
                        "dataset": ds.name,
                        "name": name,
                        "what": "Taylor importance, first iteration",
                        "importance": importance_matrix(recs[0]),
                    }
                )
        cm = ds / STAGE_DIRS["cmaes"]
        for name in list_outputs(cm, "cmaes"):
            final = read_cmaes(cm, name)[1]
            if final is None or "mask" not in final.get("final", {}):
                notes.append(f"{cm / name}: CMA-ES search not finished; not joined")
                continue
            found.append(
                {
                    "stage": "cmaes",
                    "dataset": ds.name,
                    "name": name,
                    "what": "CMA-ES final mask (1 kept, 0 removed)",
                    "importance": mask_from_rows(final["final"]["mask"]),
                }
            )
    return found, notes


def rank_heads(delta_mean: np.ndarray) -> list[tuple[int, int]]:
    """Ablation ranking: heads with a finite mean delta, largest first (ties in (layer, head) order)."""
    m = np.asarray(delta_mean, dtype=float)
    ls, hs = np.nonzero(np.isfinite(m))
    order = np.argsort(-m[ls, hs], kind="stable")
    return [(int(ls[i]), int(hs[i])) for i in order]


def read_cmaes(stage_path: str | os.PathLike, name: str) -> tuple[list[dict], dict | None, dict]:
    """CMA-ES records (one per generation, in order), the final `<name>.json` (None until a run finished) and the
    provenance of the run that wrote the last record (its runs file)."""
    d = Path(stage_path)
    path = d / file_name(name, "jsonl")
    recs = sorted(iter_jsonl(path), key=lambda r: r["generation"]) if path.exists() else []
    final_p = d / file_name(name, "json")
    runs = read_runs(path)
    return recs, (read_json(final_p) if final_p.exists() else None), (runs[-1] if runs else {})


def mask_from_rows(rows: Sequence[str]) -> np.ndarray:
    """A keep-mask as CMA-ES files write it (one string per layer, `1` kept, `0` removed, `-` padding) back as
    [L, Hmax] float: 1 kept, 0 removed, NaN padding."""
    w = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), w), np.nan)
    for l, r in enumerate(rows):
        for h, c in enumerate(r):
            out[l, h] = 1.0 if c == "1" else 0.0 if c == "0" else np.nan
    return out


# ================================================================ tables for pandas / xarray users
# Analyses with named dimensions (sample, token, layer, head, iteration, generation); pandas and xarray are imported
# only here (check stays light). Every object's attrs carry the model folder, dataset, output name and
# `layer_numbering`.


def _attrs(md: Path, dataset: str, name: str, meta: dict) -> dict:
    st = try_parse_stem(name)
    return {
        "model": md.name,
        "dataset": dataset,
        "name": name,
        "population": st.population if st else "",
        "mode": st.mode if st else "",
        "layer_numbering": meta.get("layer_numbering") or LAYER_NUMBERING,
    }


STAGE_MODULES = {"entropy_lens": "entropy_lens", "ablation": "ablation", "taylor": "taylor", "cmaes": "cmaes_search"}


def _first(results_dir: str | os.PathLike, model: str | None, dataset: str, stage: str, name: str | None):
    md = find_model_dir(results_dir, model)
    d = md / dataset / STAGE_DIRS[stage]
    have = list_outputs(d, stage)
    if name is None and not have:
        raise FileNotFoundError(
            f"no finished {stage} output under {d} — run `python -m btp.{STAGE_MODULES[stage]}` first"
        )
    if name is not None and name not in have:
        raise FileNotFoundError(f"no finished {stage} output {name!r} under {d} — have: {', '.join(have) or 'none'}")
    return md, d, name or have[0]


def _sample_coords(a: dict) -> dict:
    return {
        "sample": np.arange(len(a["sample_problem_id"])),
        "problem_id": ("sample", a["sample_problem_id"].astype(str)),
        "sample_number": ("sample", a["sample_number"]),
    }


def entropy_dataset(results_dir: str | os.PathLike, model: str | None, dataset: str, name: str | None = None):
    """The entropy lens as an xarray Dataset: `entropy`, `ce`, `kl` per scored token (token x layer; each token's
    `sample`, `position`, `token_id` as coordinates) and their per-sample means (sample x layer). `layer` is the
    block index (0-based): the residual after that block. `name`: the output (default: the first finished)."""
    import xarray as xr

    md, d, name = _first(results_dir, model, dataset, "entropy_lens", name)
    a, meta = read_analysis(d, name)
    tok = {"token": np.arange(len(a["token_id"]))}
    tok |= {k: ("token", a[v]) for k, v in (("sample_of_token", "sample_index"), ("position", "position"))}
    tok |= {"token_id": ("token", a["token_id"])}
    metrics = [m for m in ("entropy", "ce", "kl") if m in a]
    data = {m: (("token", "layer"), a[m]) for m in metrics}
    data |= {f"sample_{m}_mean": (("sample", "layer"), a[f"sample_{m}_mean"]) for m in metrics}
    coords = {"layer": np.asarray(a["layer"]), **tok, **_sample_coords(a)}
    return xr.Dataset(data, coords=coords, attrs=_attrs(md, dataset, name, meta))


def ablation_dataset(results_dir: str | os.PathLike, model: str | None, dataset: str, name: str | None = None):
    """A single-head ablation matrix as an xarray Dataset: `delta` (sample x layer x head, ΔCE in nats: ablated −
    base; NaN where not computed or padding), `delta_mean` with its 95% CI over problems (`delta_ci_low`,
    `delta_ci_high`) and `delta_n_problems` (layer x head), `base_ce` per sample."""
    import xarray as xr

    md, d, name = _first(results_dir, model, dataset, "ablation", name)
    a, meta = read_analysis(d, name)
    L, H = np.shape(a["delta_mean"])
    lh = ("layer", "head")
    data = {"delta": (("sample", *lh), a["delta"]), "base_ce": ("sample", a["base_ce"])}
    data |= {k: (lh, a[k]) for k in ("delta_mean", "delta_ci_low", "delta_ci_high", "delta_n_problems") if k in a}
    if "delta_atp" in a:
        data["delta_atp"] = (("sample", *lh), a["delta_atp"])
    coords = {"layer": np.arange(L), "head": np.arange(H), **_sample_coords(a)}
    return xr.Dataset(data, coords=coords, attrs={**_attrs(md, dataset, name, meta), "estimate": is_estimate(name)})


def taylor_dataset(results_dir: str | os.PathLike, model: str | None, dataset: str, name: str | None = None):
    """Iterative Taylor pruning as an xarray Dataset: `importance` (iteration x layer x head, NaN at heads pruned
    before the iteration and at padding), `pruned` (pruned by that iteration), and per iteration
    `scoring_loss_before`, `heldout_loss_after`, `n_alive_before`, `n_alive_after` (mean CE in nats)."""
    import xarray as xr

    md, d, name = _first(results_dir, model, dataset, "taylor", name)
    recs, meta = read_taylor(d, name)
    imp = importance_matrices(recs)
    pruned = np.zeros(imp.shape, dtype=bool)
    for i, r in enumerate(recs):
        for l, h in r["pruned"]:
            pruned[i, l, h] = True
    it = ("iteration",)
    data = {"importance": (("iteration", "layer", "head"), imp), "pruned": (("iteration", "layer", "head"), pruned)}
    for k in ("scoring_loss_before", "heldout_loss_after", "n_alive_before", "n_alive_after"):
        data[k] = (it, np.array([r[k] for r in recs]))
    coords = {
        "iteration": [r["iteration"] for r in recs],
        "layer": np.arange(imp.shape[1]),
        "head": np.arange(imp.shape[2]),
    }
    attrs = _attrs(md, dataset, name, meta) | {"base_heldout_loss": recs[0]["base_heldout_loss"] if recs else np.nan}
    return xr.Dataset(data, coords=coords, attrs=attrs)


def cmaes_frame(results_dir: str | os.PathLike, model: str | None, dataset: str, name: str | None = None):
    """A CMA-ES search as a pandas DataFrame, one row per generation (index `generation`): fitness of the population
    (best, median, worst), best so far, sigma, evaluations, and the held-out CE of the generation's best and of the
    best so far with its 95% CI over problems (`best_heldout_mean`, `_ci_low`, `_ci_high`, ...)."""
    import pandas as pd

    md, d, name = _first(results_dir, model, dataset, "cmaes", name)
    recs, final, meta = read_cmaes(d, name)
    rows = []
    for r in recs:
        row = {k: v for k, v in r.items() if not isinstance(v, (dict, list))}
        for k in ("best_heldout", "best_so_far_heldout"):
            for s, v in (r.get(k) or {}).items():
                if not isinstance(v, (dict, list)):
                    row[f"{k}_{s}"] = v
        rows.append(row)
    df = pd.DataFrame(rows).set_index("generation") if rows else pd.DataFrame()
    df.attrs = _attrs(md, dataset, name, final or meta) | {"finished": final is not None}
    return df


def evaluations_frame(results_dir: str | os.PathLike, model: str | None, dataset: str):
    """A model's verdicts on a dataset as a pandas DataFrame, one row per (problem_id, sample) (the index; the last
    verdict of a rejudged program): `passed`, `status`, `duration`, `tests_passed`, `tests_total`, `code_sha`."""
    import pandas as pd

    md = find_model_dir(results_dir, model)
    p = md / dataset / EVALUATIONS
    if not p.exists():
        raise FileNotFoundError(f"{p} not found — run `python -m btp.evaluate` first")
    cols = ("passed", "status", "duration", "tests_passed", "tests_total", "code_sha")
    last = {(r["problem_id"], int(r["sample"])): {k: r.get(k) for k in cols} for r in iter_jsonl(p)}
    df = pd.DataFrame.from_dict(last, orient="index", columns=list(cols))
    df.index = pd.MultiIndex.from_tuples(list(last), names=["problem_id", "sample"])
    df.attrs = {"model": md.name, "dataset": dataset}
    return df.sort_index()
