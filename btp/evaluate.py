"""Stage: judge programs in the sandbox; write evaluations.jsonl and summary.json (pass@k with CIs).

`python -m btp.evaluate --model M --dataset humaneval` judges `results/<model>/<dataset>/generations.jsonl`
and writes `evaluations.jsonl` (one record per program: passed, status, error excerpt, duration, the sandbox's
isolation and cgroup levels, who judged it, and what it tried that no test needs: `suspicious`) and
`summary.json` (pass@k for k up to n with bootstrap CIs over problems, counts by status, level, judge and
suspicious flag) beside it.
`--reference` judges the benchmark's own solutions (all must pass: a self-check of the harness), filed as
`results/reference/<dataset>/` (`btp.check` shows it as the self-check; plots and notebooks skip it unless
`--model reference`);
`--input FILE` judges any JSONL of {problem_id, sample, code}. A rerun judges only what is missing.

Each benchmark (`btp.benchmarks`) turns a solution into the sandbox program that judges it and sets the
default time limit per test. Every problem of the dataset counts in pass@k: no code, or no program at
all, is a failure. Model code is only ever parsed inside the sandbox:
the Programs say how to assemble and judge it, as data.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from . import benchmarks, cli
from .benchmarks import LOAD_OPTIONS, Problem
from .cli import opt
from .results import (
    EVALUATIONS,
    GENERATIONS,
    REFERENCE,
    changed_inputs,
    check_runs,
    code_sha,
    dataset_dir,
    evaluations_path,
    generations_dir,
    input_identity,
    is_stale,
    read_runs,
    summary_path,
)
from .sandbox import FULL_ISOLATION, Limits, Program, Result, Sandbox
from .stats import SMALL_N, WILSON, ks_up_to, pass_at_k_summary
from .store import JsonlStore, MalformedFileError, UserError, iter_jsonl, provenance, read_json, write_json

RUN_KEY = ("timeout", "memory_mb", "isolation")  # settings a resumed file must not mix


@dataclass
class EvalConfig:
    dataset: str = benchmarks.DEFAULT  # these four: the shared flags (btp.cli.Common)
    model: str | None = None  # whose generations; not needed with --reference / --input
    results_dir: str = "results"
    input: str | None = opt(None, "JSONL of {problem_id, sample, code} to judge instead")
    reference: bool = opt(False, "judge the benchmark's reference solutions")
    workers: int | None = opt(None, "parallel sandboxes (default: CPU cores)", check=cli.at_least(1))
    timeout: float | None = opt(
        None,
        "CPU seconds per test; the wall limit is 3x + 1 s (default: "
        + ", ".join(f"{b.name} {b.timeout:g}" for b in benchmarks.all())
        + " per test)",
        check=cli.above(0),
    )
    memory_mb: int = opt(4096, "address-space limit of each program process", check=cli.at_least(1))
    isolation: str = opt(
        "auto", "auto: the strongest the machine allows; rlimits-only: limits alone", choices=("auto", "rlimits-only")
    )
    limit: int | None = opt(None, "first N problems (default: as generated)", check=cli.at_least(1))
    # dataset options, default: those of the generation run
    variant: str | None = opt(None, "mbpp variant", choices=benchmarks.VARIANTS)
    data_file: str | None = opt(None, "local benchmark file (LiveCodeBench JSONL)")
    release: str | None = opt(None, "LiveCodeBench release (default: as generated, else v6)")
    start_date: str | None = opt(None, "LiveCodeBench contest_date >= YYYY-MM[-DD] (default: as generated)")
    end_date: str | None = opt(None, "LiveCodeBench contest_date <= YYYY-MM[-DD] (default: as generated)")
    n_boot: int = opt(10000, "bootstrap resamples for the CIs", check=cli.at_least(1))
    seed: int = 0
    force: bool = opt(False, "judge everything again")  # new records supersede old ones
    no_progress: bool = opt(False, "no progress bar")
    skip_missing: bool = opt(False, "a dataset without generations is skipped with a note (exit 0), not an error")


def build_program(p: Problem, code: str) -> Program:
    """The sandbox program that judges `code` as a solution of `p` (the benchmark's rules)."""
    return benchmarks.get(p.dataset).program(p, code)


# ---------------------------------------------------------------- where programs come from


def _read_programs(path: Path) -> list[dict]:
    out = []
    for i, rec in enumerate(iter_jsonl(path), 1):
        missing = [k for k in ("problem_id", "sample", "code") if k not in rec]
        if missing:
            raise MalformedFileError(f"{path}: record {i} (of its non-blank lines) lacks fields {missing}")
        if not isinstance(rec["code"], str) or not isinstance(rec["sample"], int):
            raise MalformedFileError(
                f"{path}: record {i} (of its non-blank lines): code must be a string and sample an integer"
            )
        out.append({"problem_id": str(rec["problem_id"]), "sample": rec["sample"], "code": rec["code"]})
    return out


def _generation_options(gen_path: Path) -> dict:
    """Dataset options of the run(s) that wrote a generations file: which problems it covers."""
    confs = [r.get("config") or {} for r in read_runs(gen_path)]
    if not confs:
        return {}
    opts = {k: confs[-1].get(k) for k in LOAD_OPTIONS if k != "limit"}
    limits = [c.get("limit") for c in confs]
    opts["limit"] = None if any(x is None for x in limits) else max(limits)
    return opts


class NoGenerations(FileNotFoundError):
    """The model has no generations of the dataset (`--skip-missing` makes it a note)."""


@dataclass(frozen=True)
class EvalPlan:
    """What a config asks to judge: the problems, the programs ({problem_id, sample, code}), where verdicts go,
    the model name they are filed under and where the programs came from (generations | reference | input)."""

    problems: list[Problem]
    programs: list[dict]
    out: Path
    model: str
    source: str
    inputs: dict = field(default_factory=dict)  # programs file name -> identity, read before judging


def plan(cfg: EvalConfig) -> EvalPlan:
    """The evaluation plan of a config."""
    bench = benchmarks.get(cfg.dataset)
    if cfg.reference and cfg.input:
        raise UserError(
            "--reference and --input exclude each other — judge either the benchmark's references or the file"
        )
    opts = {k: getattr(cfg, k) for k in LOAD_OPTIONS}
    if cfg.reference:
        if not bench.has_references:
            works = " and ".join(b.name for b in benchmarks.all() if b.has_references)
            raise UserError(f"{cfg.dataset} has no reference solutions — --reference works for {works}")
        source, model = "reference", REFERENCE
        out = dataset_dir(cfg.results_dir, model, cfg.dataset) / EVALUATIONS
        programs, inputs = None, {}
    elif cfg.input:
        source, model = "input", cfg.model or Path(cfg.input).stem
        inp = Path(cfg.input)
        if not inp.is_file():
            raise FileNotFoundError(f"--input {inp} does not exist — give a JSONL file of {{problem_id, sample, code}}")
        out = evaluations_path(inp)
        inputs = {inp.name: input_identity(inp)}
        programs = _read_programs(inp)
    else:
        if not cfg.model:
            raise UserError("nothing to judge — give --model (whose generations to judge), --reference or --input FILE")
        d, model = generations_dir(cfg.results_dir, cfg.model, cfg.dataset)
        gen = d / GENERATIONS
        if not gen.exists():
            raise NoGenerations(
                f"{gen} does not exist — run `python -m btp.generate --model {cfg.model} "
                f"--dataset {cfg.dataset}` first, or pass --input FILE"
            )
        source, out = "generations", d / EVALUATIONS
        for k, v in _generation_options(gen).items():
            if opts.get(k) is None:
                opts[k] = v
        inputs = {gen.name: input_identity(gen)}
        programs = _read_programs(gen)
    problems = bench.load(**opts)
    if programs is None:
        programs = [{"problem_id": p.problem_id, "sample": 0, "code": p.reference} for p in problems]
    return EvalPlan(problems, programs, out, model, source, inputs)


# ---------------------------------------------------------------- the stage


def _record(prog: dict, res: Result | None) -> dict:
    base = {"problem_id": prog["problem_id"], "sample": prog["sample"], "code_sha": code_sha(prog["code"])}
    if res is None:
        return {
            **base,
            "passed": False,
            "status": "no_code",
            "error": "",
            "duration": 0.0,
            "tests_passed": 0,
            "tests_total": 0,
            "isolation": "",
            "cgroup": "",
            "judge": "",
            "suspicious": [],
        }
    return {
        **base,
        "passed": res.passed,
        "status": res.status,
        "error": res.error[-600:],
        "duration": res.duration,
        "tests_passed": res.tests_passed,
        "tests_total": res.tests_total,
        "isolation": res.isolation,
        "cgroup": res.cgroup,
        "judge": res.judge,
        "suspicious": res.suspicious,
    }


def _check_same_run(store: JsonlStore, conf: dict, current: dict[tuple, dict]) -> None:
    """Refuse to mix verdicts judged under other limits into a file (those of runs still in use)."""
    if current:
        check_runs(
            store.path,
            conf,
            RUN_KEY,
            what="results judged",
            runs={(r.get("provenance") or {}).get("run") for r in current.values()},
            hint="rerun with --force to judge everything again, or use another --results-dir",
        )


def latest(records: Iterable[dict]) -> dict[tuple, dict]:
    """The last record of each (problem_id, sample): a rejudged program supersedes its old verdict."""
    return {(r["problem_id"], r["sample"]): r for r in records}


def summarize(problems: Sequence[Problem], records: dict[tuple, dict], *, n_boot: int = 10000, seed: int = 0) -> dict:
    """pass@k over every problem of the dataset (no program = failed), with bootstrap CIs over problems."""
    n = Counter(pid for pid, _ in records)
    c = Counter(pid for (pid, _), r in records.items() if r["passed"])
    ns = [n[p.problem_id] for p in problems]
    cs = [c[p.problem_id] for p in problems]
    have = [x for x in ns if x > 0]
    ks = ks_up_to(min(have)) if have else []
    known = {p.problem_id for p in problems}
    return {
        "n_problems": len(problems),
        "denominator": "every problem of the dataset; a problem without programs, or with no code, counts as failed",
        "n_programs": sum(ns),
        "problems_without_programs": sum(1 for x in ns if x == 0),
        "samples_per_problem": {"min": min(have) if have else 0, "max": max(have) if have else 0},
        "pass_at_k": pass_at_k_summary(ns, cs, ks, n_boot=n_boot, seed=seed) if ks and problems else {},
        "bootstrap": {"over": "problems", "n_boot": n_boot, "seed": seed, "method": "percentile"},
        "wilson": {"over": "problems", "method": WILSON},
        "small_n": len(problems) < SMALL_N,  # fewer problems than stats.SMALL_N: no interval is to be trusted
        "status_counts": dict(Counter(r["status"] for k, r in records.items() if k[0] in known)),
        "isolation": dict(Counter(r["isolation"] for k, r in records.items() if k[0] in known and r["isolation"])),
        "cgroup": dict(Counter(r.get("cgroup") or "" for k, r in records.items() if k[0] in known and r.get("cgroup"))),
        "judge": dict(Counter(r.get("judge") or "" for k, r in records.items() if k[0] in known and r.get("judge"))),
        "suspicious": _suspicious(r for k, r in records.items() if k[0] in known),
        "problems_never_passed": [p.problem_id for p, x in zip(problems, cs) if x == 0],
    }


def _suspicious(records: Iterable[dict]) -> dict:
    """Programs that tried what no test needs: how many did anything, and how many did each thing."""
    flags = [r.get("suspicious") or [] for r in records]
    return {"programs": sum(1 for f in flags if f), "by_flag": dict(Counter(x for f in flags for x in f))}


def evaluate(cfg: EvalConfig, sandbox: Sandbox | None = None, check_only: bool = False) -> dict:
    """Run the stage; returns the summary (also written to summary.json next to evaluations.jsonl).
    `check_only` (`--check-done`): judge nothing; exit cli.NOT_DONE when programs or the summary are missing."""
    p = plan(cfg)
    problems, programs, out, model, source = p.problems, p.programs, p.out, p.model, p.source
    by_id = {p.problem_id: p for p in problems}
    ignored = [r for r in programs if r["problem_id"] not in by_id]
    programs = [r for r in programs if r["problem_id"] in by_id]
    if ignored:
        warnings.warn(
            f"{len(ignored)} programs are for problems outside the {len(problems)} judged "
            f"(e.g. {ignored[0]['problem_id']}); ignored",
            stacklevel=2,
        )
    timeout = cfg.timeout or benchmarks.get(cfg.dataset).timeout
    store = JsonlStore(out, ("problem_id", "sample"))
    conf = {**asdict(cfg), "timeout": timeout}
    old = {} if cfg.force else latest(store.read())
    _check_same_run(store, conf, old)
    todo = [r for r in programs if old.get((r["problem_id"], r["sample"]), {}).get("code_sha") != code_sha(r["code"])]
    print(
        f"[btp.evaluate] {model} {cfg.dataset} ({source}): {len(problems)} problems, {len(programs)} programs, "
        f"{len(programs) - len(todo)} already judged, {len(todo)} to run -> {out}",
        file=sys.stderr,
    )
    if check_only:
        sp = summary_path(out)
        if todo or not sp.exists() or _summary_stale(sp, out):
            cli.not_done("evaluate", f"{len(todo)} programs to judge, {sp.name} to write" if todo else f"{sp} to write")
        return read_json(sp)
    if todo:
        keys = {(r["problem_id"], r["sample"]) for r in programs}
        cli.interrupt_note(
            lambda: (
                f"{len(keys & latest(store.read()).keys())}/{len(programs)} judged and saved in {out}; rerun to resume"
            )
        )
        store.begin_run(
            provenance(stage="evaluate", model=model, dataset=cfg.dataset, seed=cfg.seed, config=conf, source=source)
        )
        _judge(todo, by_id, store, cfg, timeout, sandbox)
    records = latest(store.read())
    keep = {(r["problem_id"], r["sample"]) for r in programs}
    records = {k: v for k, v in records.items() if k in keep}  # a file may hold programs no longer there
    summary = {
        "dataset": cfg.dataset,
        "model": model,
        "source": source,
        "input": cfg.input,
        "evaluations": str(out),
        "timeout_s": timeout,
        "ignored_programs": len(ignored),
        # what was summarised, by content: btp.check calls the verdicts or the summary stale when these change
        "inputs": {**p.inputs, out.name: input_identity(out)},
        **summarize(problems, records, n_boot=cfg.n_boot, seed=cfg.seed),
        "provenance": provenance(
            stage="evaluate", model=model, dataset=cfg.dataset, seed=cfg.seed, config=conf, source=source
        ),
    }
    write_json(summary_path(out), summary)
    return summary


def _judge(
    todo: list[dict],
    by_id: dict[str, Problem],
    store: JsonlStore,
    cfg: EvalConfig,
    timeout: float,
    sandbox: Sandbox | None,
) -> None:
    """Run `todo` in parallel sandboxes, appending verdicts in batches as they finish."""
    sb = sandbox or Sandbox(
        Limits(timeout=timeout, memory_mb=cfg.memory_mb), isolation=cfg.isolation, workers=cfg.workers
    )
    lim = Limits(timeout=timeout, memory_mb=cfg.memory_mb)
    batch: list[dict] = []
    last = time.monotonic()

    def flush() -> None:
        nonlocal batch, last
        store.append(batch)
        batch, last = [], time.monotonic()

    runnable = [r for r in todo if r["code"].strip()]
    batch += [_record(r, None) for r in todo if not r["code"].strip()]
    bar = tqdm(
        total=len(todo),
        initial=len(batch),
        desc=f"evaluate {cfg.dataset}",
        unit="prog",
        dynamic_ncols=True,
        disable=cfg.no_progress,
    )
    counts: Counter = Counter()
    sent: list[dict] = []  # the records of the programs handed to the sandbox, in order

    def programs() -> Iterator[Program]:
        for r in runnable:
            try:
                prog = build_program(by_id[r["problem_id"]], r["code"])
            except Exception as e:  # noqa: BLE001 - a program that cannot be built is its own verdict
                batch.append(_record(r, Result(status="error", error=f"not run: {type(e).__name__}: {e}")))
                bar.update()
                continue
            sent.append(r)
            yield prog

    try:
        for i, res in sb.map(programs(), lim):
            batch.append(_record(sent[i], res))
            counts[res.status] += 1
            bar.update()
            bar.set_postfix(passed=counts["passed"], failed=sum(counts.values()) - counts["passed"], refresh=False)
            if len(batch) >= 256 or time.monotonic() - last > 2.0:
                flush()
    finally:
        flush()
        bar.close()
        if sandbox is None:
            sb.close()
    levels = sb.levels
    if levels and levels != {FULL_ISOLATION} and cfg.isolation == "auto":
        warnings.warn(
            f"sandbox isolation on this machine: {sorted(levels)} (less than full; recorded per record)", stacklevel=2
        )
    if sb.cgroup.startswith("none") and cfg.isolation == "auto":
        warnings.warn(
            f"no per-slot cgroups on this machine: {sb.cgroup} (memory is bounded per process only)", stacklevel=2
        )


def _summary_stale(sp: Path, out: Path) -> bool:
    """Whether a summary no longer describes `out`: by the verdicts' content it recorded (file times only for
    summaries that record none)."""
    try:
        rec = (read_json(sp).get("inputs") or {}).get(out.name)
    except (OSError, ValueError, AttributeError):
        return True
    return bool(changed_inputs(out.parent, {out.name: rec})) if rec else is_stale(sp, out)


# ---------------------------------------------------------------- CLI


def summary_line(s: dict) -> str:
    """The printed pass@k line: bootstrap and Wilson 95% intervals over problems, and a caveat when n is small."""
    pk = "  ".join(
        f"{k}={v['estimate']:.4f} [{v['ci_low']:.4f}, {v['ci_high']:.4f}]"
        + (f" Wilson [{v['wilson_low']:.4f}, {v['wilson_high']:.4f}]" if "wilson_low" in v else "")
        for k, v in s["pass_at_k"].items()
    )
    line = f"{s['model']} {s['dataset']}: {s['n_problems']} problems, {s['n_programs']} programs; {pk}"
    if s["n_problems"] < SMALL_N:
        line += f"\ncaveat: n = {s['n_problems']} problems < {SMALL_N}: the intervals are rough; do not rank by them"
    return line


def build_parser() -> cli.ArgumentParser:
    ap = cli.parser("evaluate", __doc__.split("\n\n")[0])
    cli.add_common(ap)
    ap.set_defaults(model=None)
    cli.add_flags(ap, EvalConfig)
    return ap


def parse_config(argv: Sequence[str] | None = None) -> EvalConfig:
    return cli.config_from(EvalConfig, cli.parse(build_parser(), argv, one_dataset=("--input",)))


@cli.each_dataset
def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    cli.add_check_done(ap)
    args = cli.parse(ap, argv, one_dataset=("--input",))
    cfg = cli.config_from(EvalConfig, args)
    try:
        s = evaluate(cfg, check_only=args.check_done)
    except NoGenerations as e:
        if not cfg.skip_missing:
            raise
        print(
            f"[btp.evaluate] note: {cfg.dataset} skipped: {str(e).split(' — ')[0]} (nothing to judge)", file=sys.stderr
        )
        return 0
    if args.check_done:
        return 0
    print(summary_line(s))
    print(f"status: {s['status_counts']}  isolation: {s['isolation']}")
    if cfg.reference:
        bad = s["problems_never_passed"]
        print(
            f"reference self-check: {s['n_problems'] - len(bad)}/{s['n_problems']} pass"
            + (f"; FAILING: {bad[:20]}" if bad else "")
        )
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    cli.entry("evaluate", main)
