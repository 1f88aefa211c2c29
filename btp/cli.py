"""Command-line plumbing and the one skeleton every analysis stage stands on.

- `--config FILE` presets (JSON under configs/) whose keys are flag names; flags given on the command line
  override them.
- Flags come from config dataclasses (`add_flags`, `config_from`): a field's default and help (`opt(...)`) are
  written once, in the dataclass. Shared flags are declared once: `Common` (model, dataset, results dir, seed),
  `Runtime` (dtype, device, device map, attention kernel, force, progress, verbose) and the sample flags
  (`SampleConfig`). A flag's `check` refuses a bad value at parse time; renamed flags (`RENAMED`) say their new name.
- The analysis stage path (`prepare` -> `Run.claim` -> `Run.load`): parse, resolve the model id, build the samples,
  claim the output (fresh / resume / done, refusing another identity), and load weights only when there is work.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import benchmarks, results
from .store import MalformedFileError, UserError  # noqa: F401  (UserError: stages raise cli.UserError)

# ================================================================ the command line's face

# what a user did wrong, as opposed to a bug: one line, exit 2 (a bug keeps its traceback)
USER_ERRORS = (UserError, MalformedFileError, results.IdentityError, FileNotFoundError)
_note: Callable[[], str] | None = None


def interrupt_note(note: Callable[[], str] | None) -> None:
    """What Ctrl-C should say was saved: `note()` at the interrupt, e.g. "234/500 judged and saved; rerun to
    resume". A stage sets it once its output is claimed (the last one set wins)."""
    global _note
    _note = note


def _line(stage: str, kind: str, msg: object) -> str:
    return f"btp.{stage}: {kind}: " + " ".join(str(msg).split())  # one line, whatever the message held


def error_line(stage: str, msg: object) -> str:
    """`btp.<stage>: error: <msg>` on one line (for stages that report an error and go on to exit)."""
    return _line(stage, "error", msg)


def entry(stage: str, main: Callable[[], Any]) -> None:
    """Run a stage's `main` as a command: a user error is one line `btp.<stage>: error: ...` and exit 2, Ctrl-C
    one line saying what was saved and exit 130, a closed pipe (`| head`) a quiet end. `--debug` (or
    BTP_DEBUG=1) lets every exception through with its traceback."""
    if "--debug" in sys.argv[1:]:
        sys.argv.remove("--debug")
        os.environ["BTP_DEBUG"] = "1"
    debug = os.environ.get("BTP_DEBUG", "") not in ("", "0")
    try:
        rc = main()
    except KeyboardInterrupt:
        if debug:
            raise
        try:
            note = _note() if _note else "partial outputs are kept; rerun to resume"
        except Exception:  # noqa: BLE001 - the note must not hide the interrupt
            note = "partial outputs are kept; rerun to resume"
        print(_line(stage, "interrupted", note), file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(130)  # now: no stack from worker threads or atexit hooks of torch, tqdm, the sandbox
    except BrokenPipeError:
        # the reader went away: point stdout at nothing so the interpreter's final flush stays quiet
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    except USER_ERRORS as e:
        if debug:
            raise
        print(_line(stage, "error", e), file=sys.stderr, flush=True)
        sys.exit(2)
    except SystemExit as e:
        if isinstance(e.code, str) and not debug:  # `raise SystemExit("message")`: a refusal, said as one line
            print(_line(stage, "error", e.code), file=sys.stderr, flush=True)
            sys.exit(2)
        raise
    sys.exit(rc if isinstance(rc, int) else 0)


# `--check-done`: the stage's own completion logic answers whether its output is done, without working (btp.sweep
# asks every job so): exit 0 when done, NOT_DONE when there is work, 2 for a user error as always
NOT_DONE = 3
CHECK_DONE_HELP = "only say whether the output is done (exit 0) or has work left (exit 3); loads no weights"


def add_check_done(p: argparse.ArgumentParser) -> None:
    p.add_argument("--check-done", action="store_true", help=CHECK_DONE_HELP)


def not_done(stage: str, what: object) -> typing.NoReturn:
    """End a `--check-done` run: one line saying what is left, exit NOT_DONE."""
    print(_line(stage, "not done", what), file=sys.stderr, flush=True)
    sys.exit(NOT_DONE)


def opt(
    default: Any = None,
    help: str | None = None,
    *,
    flag: str | None = None,
    choices: Sequence | None = None,
    parse: Callable[[Any], Any] | None = None,
    invert: bool = False,
    factory: Callable[[], Any] | None = None,
    check: Callable[[Any], str | None] | None = None,
) -> Any:
    """A dataclass field that is also a command-line flag: `--<name>` (or `flag`), its help, its choices;
    `parse` turns the flag's string (or a preset's value) into the field's value; `invert` makes a boolean field
    the negation of a store-true flag (`reuse_attention` <- `--no-reuse-attention`); `check` (e.g. `at_least(1)`)
    says what is wrong with a value, checked at parse time (flags and presets alike)."""
    meta = {"help": help, "flag": flag, "choices": choices, "parse": parse, "invert": invert, "check": check}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or f.name.replace("_", "-")


def _base_type(tp: Any) -> Any:
    """`int | None` -> int; other unions and containers as they are."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return typing.get_origin(tp) or tp


def add_flags(
    p: argparse.ArgumentParser, cls: type, *, skip: Sequence[str] = (), rename: dict[str, str] | None = None
) -> None:
    """One flag per `opt` field of the dataclass `cls`, except `skip` and flags the parser already has. Plain
    fields are no flags: the skeleton sets them (seed, progress), or a stage passes a value shared between its
    configs. `rename` {field: flag} gives a field another flag where this parser means something else by its own
    (`config_from` takes the same map)."""
    hints = typing.get_type_hints(cls)
    have = {a.dest for a in p._actions}
    for f in dataclasses.fields(cls):
        name = (rename or {}).get(f.name) or _flag(f)
        dest = name.replace("-", "_")
        if not f.metadata or f.name in skip or dest in have:
            continue
        m, tp = f.metadata, _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        kw: dict[str, Any] = {"help": m.get("help")}
        if isinstance(p, ArgumentParser):  # checked at parse time (a plain argparse parser takes no checks)
            kw.update(check=m.get("check"), parse=m.get("parse"))
        if tp is bool:
            kw.update(action="store_true")
            if not m.get("invert") and default:
                raise TypeError(f"{cls.__name__}.{f.name}: a store-true flag needs the default False")
        else:
            kw.update(
                default=default,
                type=json.loads if tp is dict else (tp if tp in (int, float) and not m.get("parse") else str),
            )
            if m.get("choices"):
                kw["choices"] = tuple(m["choices"])
        p.add_argument(f"--{name}", dest=dest, **kw)


def config_from(cls: type, args: argparse.Namespace, *, rename: dict[str, str] | None = None, **override: Any) -> Any:
    """An instance of the dataclass `cls` from parsed flags (fields without a flag keep their default unless
    given in `override`; `rename` as in `add_flags`). Parsers and inversions of `opt` apply here, so preset values
    get them too."""
    kw: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in override:
            kw[f.name] = override[f.name]
            continue
        dest = ((rename or {}).get(f.name) or _flag(f)).replace("-", "_")
        if not hasattr(args, dest):
            continue
        v = getattr(args, dest)
        if f.metadata.get("invert"):
            v = not v
        elif f.metadata.get("parse") is not None:
            v = f.metadata["parse"](v)
        kw[f.name] = v
    return cls(**kw)


# ================================================================ shared flags


def _default_model() -> str:
    from .models import DEFAULT_MODEL  # at parser build time: importing this module stays light (no torch)

    return DEFAULT_MODEL


# ---------------------------------------------------------------- value checks (opt(check=...))


def at_least(lo: float) -> Callable[[Any], str | None]:
    return lambda v: None if v >= lo else f"must be >= {lo:g}"


def above(lo: float) -> Callable[[Any], str | None]:
    return lambda v: None if v > lo else f"must be > {lo:g}"


def fraction(v: Any) -> str | None:
    """(0, 1]: a share such as top-p or a memory fraction."""
    return None if 0 < v <= 1 else "must be in (0, 1]"


VERBOSE_HELP = "show vLLM's and transformers' info logs (default: warnings and errors only)"
DATASETS_HELP = f"one of {', '.join(benchmarks.NAMES)}; several comma-separated run one after another"


@dataclass
class Common:
    model: str = opt(help="HF id, local folder, or an embedded name", factory=_default_model)
    dataset: str = opt(benchmarks.DEFAULT, DATASETS_HELP)
    results_dir: str = opt("results", "root of the results tree")
    seed: int = opt(0, "random seed (sample choice, splits, bootstrap, controls)")


def _device_map(v: str | dict | None) -> str | dict | None:
    if v is None or isinstance(v, dict):
        return v
    return json.loads(v) if v.lstrip().startswith("{") else v


@dataclass
class Runtime:
    dtype: str | None = opt(None, "float32 | bfloat16 | float16 (default: fp32 on CPU, bf16 on GPU)")
    device: str | None = opt(None, "cpu | cuda | cuda:1 (default: cuda when available)")
    device_map: str | None = opt(None, 'e.g. "auto" or a JSON object {"model.layers.0": 0, ...}', parse=_device_map)
    # as models.ATTN_CHOICES (this module stays torch-free). Speed and memory only (kernels agree to float noise):
    # recorded in provenance, not part of an output's identity.
    attn_implementation: str = opt(
        "auto",
        "attention kernel; auto: flash_attention_2 when importable on CUDA, else "
        "sdpa (eager where sdpa cannot compute the model)",
        choices=("auto", "sdpa", "eager", "flash_attention_2"),
    )
    force: bool = opt(False, "recompute: discard existing outputs and progress files")
    no_progress: bool = opt(False, "no progress bars")
    verbose: bool = opt(False, VERBOSE_HELP)
    # sharding: bookkeeping of a run, not a setting (kept out of the stamped config; a shard's identity has it)
    shard: str | None = opt(
        None,
        "i/N: compute only shard i of N (0-based: 0/4 .. 3/4) and write it as <name>-shard<i>of<N>; each shard "
        "resumes alone, `python -m btp.merge` combines a full set into the output one run writes",
        parse=lambda v: parse_shard(v),
    )
    merge_shards: int | None = opt(None, "combine the N finished shards of this output (what btp.merge runs)")


SHARD_FLAGS = ("shard", "merge_shards")


def parse_shard(v: str | None) -> results.Shard | None:
    """`--shard i/N` (0-based) -> results.Shard; None, "" and "0/1" (the whole) -> None."""
    if v is None or isinstance(v, results.Shard) or not str(v).strip():
        return v or None
    i, sep, n = str(v).partition("/")
    try:
        sh = results.Shard(int(i), int(n)) if sep else None
    except ValueError as e:
        raise ValueError(f"--shard {v}: {e}") from None
    if sh is None:
        raise ValueError(f"--shard {v!r}: want i/N, 0-based (0/4 .. 3/4)")
    return sh if sh.count > 1 else None


# flags renamed for one spelling per idea: old spelling -> new flag. Refused with a one-line hint where the
# stage has the new flag and not the old (generate and pruned keep --max-tokens: generation length).
RENAMED = {"fresh": "force", "max-tokens": "sample-max-tokens"}
_RENAME_WHY = {"sample-max-tokens": " (the analysed sample's context cap; --max-tokens is generation length)"}


class HelpFormatter(argparse.HelpFormatter):
    """Every flag's default shown once: a help that states its own default keeps it; a switch is off unless
    given; `%` in help text is literal."""

    def _get_help_string(self, action: argparse.Action) -> str:
        h = re.sub(r"%(?!\()", "%%", action.help or "")
        if action.default is argparse.SUPPRESS or "(default" in h:
            return h
        if action.nargs == 0:
            return f"{h} (default: off)".strip()
        return f"{h} (default: {'none' if action.default is None else '%(default)s'})".strip()


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are the one line of `entry` (not usage + message), which knows --debug, and
    whose arguments may carry `check` and `parse` (see `opt`), applied at parse time."""

    def __init__(self, *a: Any, **kw: Any):
        kw.setdefault("formatter_class", HelpFormatter)
        super().__init__(*a, **kw)
        self.checks: dict[str, tuple[str, Callable | None, Callable | None]] = {}  # dest -> (flag, parse, check)
        self.each_dataset = False  # `--dataset a,b` runs the stage once per dataset (see `each_dataset`)
        self.add_argument("--debug", action="store_true", help="show tracebacks of errors")

    def add_argument(self, *a: Any, check: Callable | None = None, parse: Callable | None = None, **kw: Any):
        action = super().add_argument(*a, **kw)
        if check is not None or parse is not None:
            self.checks[action.dest] = (action.option_strings[0], parse, check)
        return action

    def fail(self, what: str, todo: str) -> typing.NoReturn:
        stage = self.prog.split()[-1].removeprefix("btp.")
        print(_line(stage, "error", f"{what} — {todo}"), file=sys.stderr, flush=True)
        sys.exit(2)

    def error(self, message: str) -> typing.NoReturn:
        self.fail(message, f"see {self.prog} --help")


def parser(prog: str, description: str) -> ArgumentParser:
    p = ArgumentParser(prog=f"python -m btp.{prog}", description=description)
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help="JSON preset (see configs/); its keys are flag names, command-line flags override them",
    )
    return p


def add_common(p: ArgumentParser, *, dataset: bool = True) -> None:
    """--model, --dataset (unless a stage declares its own), --results-dir, --seed."""
    add_flags(p, Common, skip=() if dataset else ("dataset",))
    p.each_dataset = dataset


def add_runtime(p: argparse.ArgumentParser, *, device_map: bool = False, shard: bool = False) -> None:
    """--dtype, --device, [--device-map], --attn-implementation, --force, --no-progress, --verbose, [--shard,
    --merge-shards]."""
    add_flags(p, Runtime, skip=(() if device_map else ("device_map",)) + (() if shard else SHARD_FLAGS))


class EachDataset(Exception):
    """`--dataset a,b` on a stage that runs one dataset at a time: `each_dataset` runs it once per name."""

    def __init__(self, names: list[str]):
        super().__init__(f"run once per dataset: {names}")
        self.names = names


def _renamed(p: ArgumentParser, name: str) -> str | None:
    """The new flag of an old spelling this parser no longer has, else None."""
    new = RENAMED.get(name.lstrip("-").replace("_", "-"))
    have = {a.dest for a in p._actions}
    if new and new.replace("-", "_") in have and name.lstrip("-").replace("-", "_") not in have:
        return new
    return None


def parse(
    p: ArgumentParser, argv: Sequence[str] | None = None, *, one_dataset: Sequence[str] = ()
) -> argparse.Namespace:
    """Parse with a config preset applied as defaults. Unknown preset keys are an error naming the file; renamed
    flags and keys are refused with their new name; every value is checked (`opt(check=...)`) before any work.
    `--dataset a,b` raises `EachDataset` on a stage that runs one at a time, unless a flag in `one_dataset` is set."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for a in argv:
        if a.startswith("--") and (new := _renamed(p, a.split("=")[0])):
            p.fail(f"{a.split('=')[0]} is now --{new}{_RENAME_WHY.get(new, '')}", f"rerun with --{new}")
    pre, _ = p.parse_known_args(argv)
    if getattr(pre, "config", None) is not None:
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
            if new := _renamed(p, k):
                p.fail(f"{pre.config}: key '{k}' is now '{new}'{_RENAME_WHY.get(new, '')}", f"rename it to '{new}'")
            if dest not in known:
                p.error(f"{pre.config}: unknown key '{k}' for python -m {p.prog.split()[-1]}")
            defaults[dest] = v
        p.set_defaults(**defaults)
    args = p.parse_args(argv)
    _check_values(p, args)
    if p.each_dataset:
        names = [d.strip() for d in str(args.dataset).split(",") if d.strip()]
        bad = [d for d in names if d not in benchmarks.NAMES]
        if bad or not names:
            p.fail(f"unknown --dataset {', '.join(map(repr, bad)) or repr(args.dataset)}", _choose_datasets())
        if len(names) > 1:
            if given := [f for f in one_dataset if getattr(args, f.lstrip("-").replace("-", "_"), None)]:
                p.fail(f"{given[0]} takes one --dataset, got {args.dataset}", "give one dataset")
            raise EachDataset(names)
    if hasattr(args, "verbose"):
        quiet_logs(args.verbose)
    if getattr(args, "no_progress", False):
        no_library_bars()
    return args


def _choose_datasets() -> str:
    return f"choose from {', '.join(benchmarks.NAMES)} (several comma-separated)"


def _check_values(p: ArgumentParser, args: argparse.Namespace) -> None:
    """Every checked value (given, or from a preset) is valid now, before a model or a file is touched."""
    for dest, (flag, parse_, check) in getattr(p, "checks", {}).items():
        v = getattr(args, dest, None)
        if v is None:
            continue
        try:
            v = parse_(v) if parse_ is not None else v
            why = check(v) if check is not None and v is not None else None
        except ValueError as e:
            p.fail(str(e) if flag in str(e) else f"{flag} {getattr(args, dest)!r}: {e}", f"see {p.prog} --help")
        except TypeError:
            why = "has the wrong type"
        if why:
            p.fail(f"{flag} {getattr(args, dest)}: {why}", f"see {p.prog} --help")


def each_dataset(main: Callable[..., Any]) -> Callable[..., Any]:
    """`main(argv)` that runs once per dataset of `--dataset a,b` (`parse` raises `EachDataset`), in order; the
    last --dataset wins in argparse, so each run appends its own. Returns the list of results (an exit code: the
    worst)."""

    def run(argv: Sequence[str] | None = None, *a: Any, **kw: Any) -> Any:
        argv = list(sys.argv[1:] if argv is None else argv)
        try:
            return main(argv, *a, **kw)
        except EachDataset as e:
            outs = [main([*argv, "--dataset", d], *a, **kw) for d in e.names]
        if all(isinstance(o, int) for o in outs):
            return max(outs)
        return outs

    run.__doc__, run.__wrapped__ = main.__doc__, main  # type: ignore[attr-defined]
    return run


def no_library_bars() -> None:
    """`--no-progress` silences the bars of the hub and transformers (weight loading) too, not btp's alone."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "transformers" in sys.modules:
        from transformers.utils import logging as tf_logging

        tf_logging.disable_progress_bar()


def quiet_logs(verbose: bool) -> None:
    """vLLM and transformers at warning level unless `--verbose`, set before either loads an engine so that btp's
    own lines stay readable (a level set in the environment wins)."""
    level = "INFO" if verbose else "WARNING"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", level)  # read by vLLM when it is imported (in the engine's load)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", level.lower())
    if "transformers" in sys.modules:  # imported already: the environment is read no more
        from transformers.utils import logging as tf_logging

        tf_logging.set_verbosity(tf_logging.log_levels.get(os.environ["TRANSFORMERS_VERBOSITY"], tf_logging.WARNING))


def config_dict(args: argparse.Namespace) -> dict:
    """The effective configuration of a run, for provenance."""
    skip = ("debug", "check_done", *SHARD_FLAGS)  # not settings: a shard's stamp and identity say which shard it is
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in skip}


# ================================================================ list flags


def parse_layers(spec: str | Sequence[int] | None) -> list[int] | None:
    """`"0,5,10-12"` -> [0, 5, 10, 11, 12] (sorted, unique); None/""/"all" -> None (every layer)."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "all")):
        return None
    if not isinstance(spec, str):
        return sorted({int(x) for x in spec})
    out = []
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                a, b = part.split("-")
                out += list(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise ValueError(f"bad layer list {spec!r}: use e.g. 0,5,10-12") from None
    return sorted(set(out))


def parse_heldout(v: str | float | int) -> float | int:
    """`--heldout`: `0.25` (a fraction of the problems, written with a point) or `8` (a number of problems)."""
    try:
        x = float(v)
    except ValueError:
        raise ValueError(f"--heldout must be a fraction (0.25) or a count (8), got {v!r}") from None
    if "." in str(v) or "e" in str(v).lower():
        if not 0 < x < 1:
            raise ValueError(f"--heldout fraction must be in (0, 1), got {v}")
        return x
    return int(x)


def parse_ks(spec: str | Sequence[int] | None) -> list[int] | None:
    """`"1,2,4,8"` -> [1, 2, 4, 8]; None/""/"auto" -> None."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "auto")):
        return None
    try:
        return [int(x) for x in (spec.split(",") if isinstance(spec, str) else spec)]
    except ValueError:
        raise ValueError(f"bad --knockout-ks {spec!r}: use e.g. 1,2,4,8") from None


# ================================================================ the analysis stage skeleton


@dataclass(frozen=True)
class StageSpec:
    """What an analysis stage declares: its name (module, provenance, key of its folder in results.STAGE_DIRS), a
    description, the config dataclasses its own flags come from (their `opt` fields), whether it takes a
    device map, and what a shard of it computes (`shard`, e.g. "samples"), or why it has no shards (`no_shard`:
    `--shard` is refused with that reason)."""

    name: str
    description: str
    configs: tuple[type, ...] = ()
    device_map: bool = False
    module: str = ""  # btp.<module> when it is not btp.<name> (cmaes_search): what --help and errors name
    shard: str = ""
    no_shard: str = "this stage does not split into shards"
    more_flags: Callable[[argparse.ArgumentParser], None] | None = None  # flags of another config, added by hand


def stage_parser(spec: StageSpec) -> argparse.ArgumentParser:
    """--config, the shared flags, the sample flags, the stage's own flags, then the runtime flags."""
    from .samples import add_sample_args

    p = parser(spec.module or spec.name, spec.description)
    add_common(p)
    add_sample_args(p)
    for cls in spec.configs:
        add_flags(p, cls)
    if spec.more_flags is not None:
        spec.more_flags(p)
    add_runtime(p, device_map=spec.device_map, shard=True)
    add_check_done(p)
    return p


@dataclass
class Run:
    """One invocation of an analysis stage: parsed flags, the resolved model (no weights yet), device and dtype,
    the analysis samples. `claim` an output, then `load` the weights only when there is work."""

    spec: StageSpec
    parser: argparse.ArgumentParser
    args: argparse.Namespace
    ref: Any  # models.ModelRef
    device: Any  # torch.device
    dtype: Any  # torch.dtype
    sample_config: Any  # samples.SampleConfig
    samples: Any  # samples.SampleSet
    tokenizer: Any
    inputs: dict = field(default_factory=dict)  # identities of the files the samples were read from (staleness)
    _loaded: Any = None
    _config: dict | None = None

    @property
    def progress(self) -> bool:
        return not self.args.no_progress

    @property
    def shard(self) -> results.Shard | None:
        """The shard this run computes (`--shard i/N`), None for a whole run."""
        return parse_shard(getattr(self.args, "shard", None))

    @property
    def merging(self) -> int | None:
        """N when this run combines N finished shards (`--merge-shards N`, what btp.merge runs)."""
        return getattr(self.args, "merge_shards", None)

    def config(self, cls: type, **override: Any) -> Any:
        """The stage's config dataclass from the flags; an invalid value is a usage error naming it."""
        names = {f.name for f in dataclasses.fields(cls)}
        shared = {"seed": self.args.seed, "progress": self.progress}
        override = {**{k: v for k, v in shared.items() if k in names}, **override}
        try:
            return config_from(cls, self.args, **override)
        except ValueError as e:
            self.parser.error(str(e))

    def output(self, stem: results.Stem | str) -> results.Output:
        """The output this run writes: the stem's, or its shard's (`<name>-shard<i>of<N>`) under `--shard`."""
        st = results.parse_stem(stem) if isinstance(stem, str) else stem
        return results.output(
            self.args.results_dir, self.ref.model_id, self.args.dataset, self.spec.name, st.with_shard(self.shard)
        )

    def identity(self, sample_set: Any = None, **settings: Any) -> dict:
        """Model, revision, samples (which and their exact tokens), dtype, then every setting that changes
        numbers: what an output must have been written with to be reused or resumed. A shard's identity ends
        with its shard."""
        ss = self.samples if sample_set is None else sample_set
        sh = self.shard
        return {
            "model": self.ref.model_id,
            "revision": self.ref.revision,
            **results.sample_identity(ss.fields()),
            "dtype": str(self.dtype),
            **settings,
            **({"shard": [sh.index, sh.count]} if sh else {}),
        }

    def shards(self, out: results.Output, identity: dict, files: Sequence[str]) -> list[tuple[dict, dict]]:
        """(npz arrays, json record) of each of the `--merge-shards N` shards of `out`, in shard order. Refuses
        (one line) a set with shards not finished, naming them, or a shard of another identity, naming the field."""
        from .store import read_npz

        n = self.merging
        outs = [results.Output(out.dir, out.stem.with_shard(results.Shard(i, n))) for i in range(n)]
        done = [i for i, o in enumerate(outs) if all(o.path(e).exists() for e in files)]
        if len(done) < n:
            raise UserError(
                f"{out.dir / out.name}: shards {', '.join(results.missing_shards(n, done))} of {n} are not finished"
                f" — run them (--shard i/{n}), then merge again"
            )
        parts = []
        for i, o in enumerate(outs):
            diff = results.identity_diff(results.stored_identity(o.path("json")), {**identity, "shard": [i, n]})
            if diff is not None:
                raise results.IdentityError(o.path("json"), *diff)
            parts.append((read_npz(o.path("npz")) if "npz" in files else {}, results.read_json(o.path("json"))))
        self._config = parts[0][1].get("config")  # the merged output's provenance keeps the flags the shards ran with
        return parts

    def claim(self, out: results.Output, identity: dict, **kw: Any) -> results.Claim:
        """`results.claim` with `--force`; another identity ends the run with a message naming the field. Under
        `--check-done` a forced run has work (and removes nothing)."""
        if getattr(self.args, "check_done", False) and self.args.force:
            not_done(self.spec.module or self.spec.name, f"{out.dir / out.name}: --force recomputes it")
        try:
            c = results.claim(out, identity, force=self.args.force, **kw)
        except results.IdentityError as e:
            raise SystemExit(str(e)) from None
        interrupt_note(lambda: f"the partial progress of {out.dir / out.name} is kept; rerun to resume")
        return c

    def load(self) -> Any:
        """The model (models.LoadedModel), loaded once, on the resolved device and dtype. A stage loads weights
        only when it has work: under `--check-done` that is the answer."""
        self.has_work()
        if self._loaded is None:
            from .models import load_model

            dm = _device_map(getattr(self.args, "device_map", None))
            self._loaded = load_model(
                self.args.model,
                dtype=self.dtype,
                device=self.device,
                device_map=dm,
                attn_implementation=getattr(self.args, "attn_implementation", "auto"),
            )
        return self._loaded

    def has_work(self) -> None:
        """Past its claims a stage has work; under `--check-done` the run ends here, before it touches a file (a
        stage that repairs progress files before loading weights calls this first)."""
        if getattr(self.args, "check_done", False):
            not_done(self.spec.module or self.spec.name, "an output of this run is missing or unfinished")

    def stamp(self, lm: Any, **extra: Any) -> dict:
        """The provenance stamp of an output of this run (`lm`: the loaded model), with the dtype the weights were
        loaded in (resolved before loading: never "auto")."""
        from .store import provenance

        extra.setdefault("dtype", str(lm.dtype))
        if self.shard:
            extra = {**extra, "shard": self.shard.label}
        return provenance(
            stage=self.spec.name,
            model=lm.model_id,
            revision=lm.revision,
            dataset=self.args.dataset,
            mode=self.sample_config.mode,
            seed=self.args.seed,
            config=self._config if self._config is not None else config_dict(self.args),
            samples=self.samples.describe(),
            attn_implementation=lm.attn_implementation,
            layer_numbering=results.LAYER_NUMBERING,
            inputs=self.inputs,
            **extra,
        )


def prepare(spec: StageSpec, argv: Sequence[str] | None = None) -> Run:
    """Parse, resolve the model id (no weights), resolve device and dtype, and build the analysis samples with
    the model's tokenizer: everything a stage needs to claim its output before it loads weights."""
    from .samples import config_from_args, load_samples

    p = stage_parser(spec)
    args = parse(p, argv)  # before torch is imported: a mistake is said at once
    import torch

    from .models import default_device, default_dtype, load_tokenizer, parse_dtype, resolve_model

    try:
        scfg = config_from_args(args)
        dev = torch.device(args.device) if args.device else default_device()
        dtype = parse_dtype(args.dtype) or default_dtype(dev)
    except (ValueError, RuntimeError) as e:
        p.error(str(e))
    try:
        parse_shard(args.shard)
    except ValueError as e:
        p.error(str(e))
    if (args.shard or args.merge_shards) and not spec.shard:
        p.error(f"--shard: {spec.no_shard}")
    if args.shard and args.merge_shards:
        p.error("--shard computes one shard, --merge-shards combines them: give one")
    if args.merge_shards is not None and args.merge_shards < 2:
        p.error(f"--merge-shards {args.merge_shards}: want the number of shards, >= 2")
    ref = resolve_model(args.model)
    tok = load_tokenizer(args.model)
    ds_dir = results.dataset_dir(args.results_dir, ref.model_id, args.dataset, create=False)
    inputs = results.analysis_inputs(ds_dir, scfg.source, scfg.select)  # before reading: a later change is stale
    ss = load_samples(args.results_dir, ref.model_id, args.dataset, scfg, tok)
    return Run(spec, p, args, ref, dev, dtype, scfg, ss, tok, inputs)


def shard_stamp(parts: Sequence[tuple[dict, dict]]) -> tuple[Any, dict]:
    """(the loaded model as the shards recorded it: model_id, revision, dtype, device, attn_implementation, for
    `Run.stamp`; the merge's bookkeeping: shard count, each shard's seconds, host and time) of finished shards'
    json records."""
    p0 = parts[0][1]
    lm = types.SimpleNamespace(
        model_id=p0["model"],
        revision=p0["revision"],
        dtype=p0.get("dtype"),
        device=p0.get("device"),
        attn_implementation=p0.get("attn_implementation"),
    )
    book = {
        "count": len(parts),
        "seconds": [m.get("seconds") for _, m in parts],
        "hosts": [m.get("host") for _, m in parts],
        "created": [m.get("created") for _, m in parts],
    }
    return lm, book
