"""Progress of every model x dataset under a results tree: what is generated, evaluated and analysed, what is
stale, what is broken.

`python -m btp.check [--results-dir results] [--model M] [--dataset D] [--json] [--deep]` (or `run_check.sh`)
prints one row per `results/<model-slug>/<dataset>/`, then the progress of every sweep run on the tree
(`--sweep FILE`: only that sweep's jobs); `--json` prints the same as JSON. Exit status 1 when a
file is broken (an unparseable JSONL line other than a torn last line, an unreadable npz/json), else 0.

Fast on large trees: every JSONL line is validated, but only the few fields a row needs are built (msgspec,
which comes with vLLM, skips the rest of a record while checking its syntax; json.loads otherwise). npz files are
opened (zip directory) without decompressing their arrays; `--deep` also CRC-checks every npz member.
"""

from __future__ import annotations

import json
import sys
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import benchmarks, cli, results, stats
from .results import EVALUATIONS, GENERATIONS, SUMMARY

STAGE_DIRS = tuple(results.STAGE_DIRS.values())


# ---------------------------------------------------------------- results


@dataclass
class Issue:
    path: str  # relative to the results dir
    kind: str  # broken | stale | torn | incomplete | noisy
    detail: str


@dataclass
class Row:
    model: str
    dataset: str
    problems: int | None = None  # distinct problems generated
    n: int | None = None  # samples per problem asked
    total: int | None = None  # problems x n asked (None: unknown)
    generated: int = 0  # distinct (problem, sample) records
    finish: dict = field(default_factory=dict)  # finish_reason -> count
    evaluated: int | None = None  # evaluated (problem, sample) pairs that are in generations
    passed: int | None = None
    pass1: float | None = None
    pass1_ci: list | None = None
    statuses: dict = field(default_factory=dict)
    stages: dict = field(default_factory=dict)  # stage dir -> {stem: note}
    pruned: dict | None = None  # setting folder -> arms with head set / generated / judged
    issues: list = field(default_factory=list)

    @property
    def broken(self) -> bool:
        return any(i.kind == "broken" for i in self.issues)


# ---------------------------------------------------------------- fast JSONL scan


def _decoder(keys: tuple[str, ...]) -> Callable[[bytes], tuple]:
    """bytes of one line -> the values of `keys` (None when absent); raises ValueError on a line that is not a
    JSON object. msgspec (present with vLLM) validates the whole line but builds only these fields, several
    times faster than json.loads on generation records; without it, or when it refuses a line that the
    standard parser accepts (NaN), json.loads decides."""

    def std(raw: bytes) -> tuple:
        rec = json.loads(raw)
        if not isinstance(rec, dict):
            raise ValueError(f"a JSON {type(rec).__name__}, not an object")
        return tuple(rec.get(k) for k in keys)

    try:
        import msgspec
    except ImportError:
        return std
    dec = msgspec.json.Decoder(msgspec.defstruct("Rec", [(k, Any, None) for k in keys]))

    def fast(raw: bytes) -> tuple:
        try:
            r = dec.decode(raw)
        except msgspec.DecodeError:
            return std(raw)
        return tuple(getattr(r, k) for k in keys)

    return fast


@dataclass
class Scan:
    lines: int = 0  # complete records
    values: list = field(default_factory=list)  # per good line: tuple of the asked fields
    bad: list = field(default_factory=list)  # (line number, reason) of unparseable lines
    torn: bool = False  # last line cut short (a killed writer; resume drops it)


def scan_jsonl(path: Path, keys: Sequence[str]) -> Scan:
    """Every line of a JSONL file validated, and only `keys` of each record built."""
    s = Scan()
    decode = _decoder(tuple(keys))
    last_no, last_raw = 0, b""
    with open(path, "rb") as f:
        for no, raw in enumerate(f, 1):
            raw = raw.strip()
            if not raw:
                continue
            last_no, last_raw = no, raw
            try:
                s.values.append(decode(raw))
                s.lines += 1
            except ValueError as e:
                s.bad.append((no, str(e).split(":")[0][:80]))
    if s.bad and s.bad[-1][0] == last_no and not last_raw.endswith(b"}"):
        s.bad.pop()  # the store's definition of a torn tail: last line, not closed
        s.torn = True
    return s


# ---------------------------------------------------------------- other files


def check_npz(path: Path, deep: bool = False) -> str | None:
    """None when the npz opens (zip directory and member headers); the reason otherwise. `deep` CRC-checks."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            if not names or not all(n.endswith(".npy") for n in names):
                return "not an npz archive of .npy arrays"
            if deep:
                bad = z.testzip()
                if bad is not None:
                    return f"member {bad} fails its CRC"
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return f"unreadable npz ({e})"
    return None


def load_json(path: Path) -> tuple[Any, str | None]:
    try:
        return json.loads(path.read_text()), None
    except (ValueError, OSError, UnicodeDecodeError) as e:
        return None, f"unreadable JSON ({str(e)[:80]})"


def short_stem(stem: str) -> str:
    """`regular` -> `R`, `chain_code-reference` -> `C-ref` (the table's legend explains)."""
    st = results.try_parse_stem(stem)
    if st is None:
        return stem
    pop = (
        "-ref"
        if st.source == "reference"
        else {"correct": "", "incorrect": "-inc", "all": "-all", "correct_paired": "-cp", "incorrect_paired": "-ip"}[
            st.select
        ]
    )
    return {"regular": "R", "chain_code": "C"}[st.mode] + pop + "".join(f"-{v}" for v in st.variant)


# ---------------------------------------------------------------- one dataset dir


def _rel(root: Path, p: Path) -> str:
    try:
        return str(p.relative_to(root))
    except ValueError:
        return str(p)


def _expected_total(runs: list, dataset: str, problems: int) -> tuple[int | None, int | None]:
    """(samples per problem, problems x n) the latest generation run asked for; None when unknown."""
    if not runs:
        return None, None
    last = runs[-1]
    cfg = last.get("config") or {}
    n = cfg.get("n")
    size = last.get("n_problems")
    if size is None:
        bench = benchmarks.get(dataset) if dataset in benchmarks.NAMES else None
        size = (
            bench.size(
                cfg.get("variant"),
                release=cfg.get("release"),
                data_file=cfg.get("data_file"),
                start_date=cfg.get("start_date"),
                end_date=cfg.get("end_date"),
            )
            if bench
            else None
        )
        limit = cfg.get("limit")
        if limit is not None:
            size = min(limit, size) if size is not None else limit
    if size is not None:
        size = max(size, problems)
    return n, (size * n if size is not None and n else None)


def check_dataset(root: Path, d: Path, deep: bool = False) -> Row:
    row = Row(model=d.parent.name, dataset=d.name)
    issue = lambda p, kind, detail: row.issues.append(Issue(_rel(root, p), kind, detail))

    def jsonl(p: Path, keys: Sequence[str]) -> Scan | None:
        if not p.exists():
            return None
        s = scan_jsonl(p, keys)
        for no, why in s.bad[:3]:
            issue(p, "broken", f"line {no}: not valid JSON ({why})")
        if len(s.bad) > 3:
            issue(p, "broken", f"... and {len(s.bad) - 3} more bad lines")
        if s.torn:
            issue(p, "torn", "last line cut short (a killed writer); the next run drops and redoes it")
        return s

    gen, ev = d / GENERATIONS, d / EVALUATIONS
    keys: set = set()
    g = jsonl(gen, ("problem_id", "sample", "finish_reason"))
    if g is not None:
        for pid, smp, fin in g.values:
            keys.add((pid, smp))
            row.finish[str(fin)] = row.finish.get(str(fin), 0) + 1
        row.generated = len(keys)
        row.problems = len({k[0] for k in keys})
        runs_p = results.runs_path(gen)
        runs, err = load_json(runs_p) if runs_p.exists() else ([], None)
        if err:
            issue(runs_p, "broken", err)
        row.n, row.total = _expected_total(runs if isinstance(runs, list) else [], d.name, row.problems)

    e = jsonl(ev, ("problem_id", "sample", "passed", "status"))
    if e is not None:
        seen: dict = {}
        for pid, smp, ok, status in e.values:
            if g is None or (pid, smp) in keys:
                seen[(pid, smp)] = (bool(ok), str(status))
        row.evaluated, row.passed = len(seen), sum(ok for ok, _ in seen.values())
        for _, st in seen.values():
            row.statuses[st] = row.statuses.get(st, 0) + 1
    stale = results.evaluation_staleness(d)  # by the content the summary recorded (file times only for old ones)
    if e is not None and EVALUATIONS in stale:
        issue(ev, "stale", stale[EVALUATIONS])

    summ = d / SUMMARY
    if summ.exists():
        s, err = load_json(summ)
        if err:
            issue(summ, "broken", err)
        else:
            row.pass1, row.pass1_ci = _pass1(s)
            if row.total is None and row.n and isinstance(s, dict) and s.get("n_problems"):
                row.total = int(s["n_problems"]) * row.n  # the problems evaluate judged against
            if SUMMARY in stale:
                issue(summ, "stale", stale[SUMMARY])

    for stage in STAGE_DIRS:
        sd = d / stage
        if sd.is_dir():
            row.stages[stage] = _check_stage(d, sd, stage, issue, deep)
    pr = d / results.PRUNED
    if pr.is_dir():
        row.pruned = results.pruned_progress(pr)
        if (pr / results.COMPARISON).exists() and (err := load_json(pr / results.COMPARISON)[1]):
            issue(pr / results.COMPARISON, "broken", err)
    return row


def _pass1(summary: Any) -> tuple[float | None, list | None]:
    """pass@1 and its CI from summary.json: the Wilson interval (`wilson_low`, `wilson_high`: not a point at 0% or
    100%), else (older summaries) the bootstrap's `ci_low`, `ci_high`."""
    v = (summary.get("pass_at_k") or {}).get("pass@1") if isinstance(summary, dict) else None
    if not isinstance(v, dict):
        return None, None
    lo, hi = ("wilson_low", "wilson_high") if "wilson_low" in v else ("ci_low", "ci_high")
    return v.get("estimate"), [v.get(lo), v.get(hi)]


def _check_stage(d: Path, sd: Path, stage: str, issue, deep: bool) -> dict:
    """{name: note} of the analysis outputs in one stage dir. Done means: entropy/ablation `<name>.npz` and
    `<name>.json` both readable (note '+ko' with knockout curves); taylor `<name>.jsonl` with at least one
    iteration (note '(i/N it)', N from its runs file, ', stop' when it stopped early); cmaes `<name>.jsonl` with at
    least one generation (note '(g/G gen, best f)', G from its runs file, f the best fitness so far), else any
    readable `<name>.*`. A `.partial.` file without the finished output shows as '(partial)'."""
    ok: dict[tuple[str, str], set] = {}  # (stem, part) -> readable file extensions
    broken: set[str] = set()  # names of unreadable files (reported as broken, not also as missing)
    taylor: dict[str, tuple] = {}  # stem -> (iterations, last stop_reason)
    for p in sorted(p for p in sd.iterdir() if p.is_file() and not p.name.startswith(".")):
        f = results.parse_file_name(p.name)
        if f.ext.endswith("npz"):
            why = check_npz(p, deep)
        elif f.ext == "jsonl":
            keys = ("generation", "best_so_far_fitness") if stage == "cmaes" else ("iteration", "stop_reason")
            s = scan_jsonl(p, keys)
            why = f"line {s.bad[0][0]}: not valid JSON ({s.bad[0][1]})" if s.bad else None
            if s.torn:
                issue(p, "torn", "last line cut short (a killed writer); the next run drops and redoes it")
            taylor[f.stem] = (s.lines, s.values[-1][1] if s.values else None)
        elif f.ext.endswith("json"):
            why = load_json(p)[1]
        else:
            continue
        if why:
            issue(p, "broken", why)
            broken.add(p.name)
            continue
        ok.setdefault((f.stem, f.part), set()).add(f.ext)
        if (stale := results.staleness(d, sd, p.name)) is not None:
            issue(p, "stale", stale)
    done: dict[str, str] = {}
    for (stem, part), suf in ok.items():
        if part or (results.try_parse_stem(stem) or results.Stem()).shard:  # shards: counted below
            continue
        if stage in ("entropy", "ablation"):
            if {"npz", "json"} <= suf:
                done[stem] = "+ko" if "json" in ok.get((stem, results.KNOCKOUT), ()) else ""
                if stage == "ablation":
                    _check_noise(sd / results.file_name(stem, "json"), issue)
                    if results.is_estimate(stem):
                        done[stem] += atp_note(sd, stem)
            elif suf & {"npz", "json"}:  # cut off between the two writes (a truncated file is broken, above)
                missing = results.file_name(stem, "json" if "npz" in suf else "npz")
                if missing not in broken:
                    issue(sd / missing, "incomplete", "missing: rerun the stage")
            elif suf & {"partial.npz"}:
                done[stem] = "(partial)"
        elif stage == "taylor":
            n, stop = taylor.get(stem, (0, None))
            if "jsonl" in suf and n:
                want = _taylor_iters(sd / results.file_name(stem, "jsonl"))
                done[stem] = f"({n}{'/' + str(want) if want else ''} it{', stop' if stop else ''})"
        elif stage == "cmaes" and "jsonl" in suf and taylor.get(stem, (0,))[0]:
            n, best = taylor[stem]
            want = _taylor_iters(sd / results.file_name(stem, "jsonl"), ("search", "max_generations"))
            done[stem] = (
                f"({n}{'/' + str(want) if want else ''} gen"
                + (f", best {best:.3f}" if isinstance(best, (int, float)) else "")
                + ")"
            )
        elif any(not e.startswith(("partial", "runs")) for e in suf):
            done[stem] = ""
    for name, e in results.shard_sets(sd).items():  # a sharded run not merged yet: its shards' progress
        if name not in done:
            done[name] = f"(shards {len(e['done'])}/{e['count']}" + (
                f", {len(e['partial'])} partial)" if e["partial"] else ")"
            )
    return done


def atp_note(sd: Path, stem: str, k: int = 10) -> str:
    """An atp screen's agreement with the exact matrix of the same samples: `(ρ 0.83, r@10 0.70)`, `(no exact)`
    when there is none to compare with (an estimate only)."""
    pair = results.ablation_pair(sd, stem)
    if pair is None:
        return "(no exact)"
    a, e = pair
    rep = stats.agreement(np.mean(a.get("delta_atp", a["delta"]), 0), np.mean(e["delta"], 0), (k,))
    return f"(ρ {rep['spearman']:.2f}, r@{k} {rep['topk_recall'].get(str(k), float('nan')):.2f})"


NOOP_TOLERANCE = 1e-3  # nats: a no-op row's |CE - base| above this makes deltas of that size noise


def _check_noise(path: Path, issue) -> None:
    """Flag an ablation matrix whose no-op rows moved the loss by more than NOOP_TOLERANCE (batching noise)."""
    noise = (load_json(path)[0] or {}).get("noop_max_abs_delta")
    if isinstance(noise, (int, float)) and noise > NOOP_TOLERANCE:
        issue(
            path,
            "noisy",
            f"a no-op row moved the CE by {noise:.2g} nats > {NOOP_TOLERANCE:g} (batched kernels "
            "differ by batch size): head deltas of that size are noise",
        )


def _taylor_iters(path: Path, setting: tuple[str, str] = ("taylor", "num_iters")) -> int | None:
    """--num-iters of the last Taylor run on this file (its runs file holds the stamps); CMA-ES: --max-generations
    with `setting` ("search", "max_generations")."""
    try:
        runs = results.read_runs(path)
    except (ValueError, OSError):
        return None
    if not runs:
        return None
    return (runs[-1].get(setting[0]) or {}).get(setting[1]) or (runs[-1].get("config") or {}).get(setting[1])


# ---------------------------------------------------------------- the tree


def dataset_dirs(root: Path, model: str | None = None, dataset: str | None = None) -> list[Path]:
    """`<root>/<model-slug>/<dataset>/` dirs that hold any btp output."""
    out = []
    markers = (GENERATIONS, EVALUATIONS, SUMMARY, *STAGE_DIRS, "pruned")
    names = set(results.model_dir_names(root, model)) if model else set()
    dirs = (p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for m in sorted(dirs, key=lambda p: (p.name == results.REFERENCE, p.name)):  # the models, then the self-check
        if model and m.name not in names:
            continue
        for d in sorted(p for p in m.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if (dataset is None or d.name == dataset) and any((d / x).exists() for x in markers):
                out.append(d)
    return out


def check_tree(
    results_dir: str | Path, model: str | None = None, dataset: str | None = None, deep: bool = False
) -> list[Row]:
    root = Path(results_dir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"results dir {root} not found — give --results-dir (run from the folder that holds "
            "results/, or point at it)"
        )
    if model:
        results.find_model_dir(root, model)  # an unknown model is an error naming those there, not an empty table
    dirs = dataset_dirs(root, model, dataset)
    if dataset and not dirs:
        have = sorted({d.name for d in dataset_dirs(root, model)})
        raise FileNotFoundError(
            f"no results for --dataset {dataset} under {root}{' for ' + model if model else ''} "
            f"— have: {', '.join(have) or 'none'}"
        )
    return [check_dataset(root, d, deep) for d in dirs]


# ---------------------------------------------------------------- output


def _cells(r: Row) -> list[str]:
    gen = "-"
    if r.generated or r.total:
        gen = f"{r.generated}/{r.total if r.total is not None else '?'}"
        if r.n:
            gen += f" ({r.total // r.n if r.total else '?'}x{r.n})"
    fin = "/".join(str(r.finish.get(k, 0)) for k in ("stop", "length")) if r.finish else "-"
    if r.finish.get("repetition"):  # cut by the repetition guard (btp.generate --repetition-guard)
        fin += f" +{r.finish['repetition']}rep"
    extra = sum(v for k, v in r.finish.items() if k not in ("stop", "length", "repetition"))
    if extra:
        fin += f" +{extra}?"
    ev = "-" if r.evaluated is None else (f"{r.evaluated}/{r.generated}" if r.generated else str(r.evaluated))
    p1 = "-"
    if r.pass1 is not None:
        p1 = f"{100 * r.pass1:.1f}%"
        if r.pass1_ci and len(r.pass1_ci) == 2 and None not in r.pass1_ci:
            p1 += f" [{100 * r.pass1_ci[0]:.1f}, {100 * r.pass1_ci[1]:.1f}]"
    elif r.passed is not None and r.evaluated:
        p1 = f"({r.passed}/{r.evaluated} passed; no summary)"
    st = [
        " ".join(short_stem(s) + note for s, note in sorted(r.stages[k].items())) or "-" if k in r.stages else "-"
        for k in STAGE_DIRS
    ]
    pr = (
        "-"
        if r.pruned is None
        else (" ".join(f"{k}({v['summarized']}/{v['arms']})" for k, v in r.pruned.items()) or "0")
    )
    return [r.dataset, gen, fin, ev, p1, *st, pr]


HEADER = [
    "dataset",
    "generated",
    "stop/len",
    "evaluated",
    "pass@1 [95% CI]",
    "entropy",
    "ablation",
    "taylor",
    "cmaes",
    "pruned",
]


def format_table(rows: list[Row]) -> str:
    if not rows:
        return "no results found"
    out = []
    for model in dict.fromkeys(r.model for r in rows):
        cells = [HEADER] + [_cells(r) for r in rows if r.model == model]
        w = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
        # the reference solutions are no model: say what the row is (a failing one means the harness is wrong)
        out.append(f"model {model}" if model != results.REFERENCE else "reference solutions (harness self-check)")
        for i, c in enumerate(cells):
            out.append("  " + "  ".join(x.ljust(w[j]) for j, x in enumerate(c)).rstrip())
            if i == 0:
                out.append("  " + "  ".join("-" * x for x in w))
        out.append("")
    out.append(
        "pass@1 CI: Wilson over problems (summary.json has the bootstrap beside it); "
        "R = regular, C = chain_code; no suffix: correct generations, -ref: reference solutions, "
        "-inc: incorrect, -all: all generations, -cp/-ip: correct/incorrect on problems with both; "
        "+ko: knockout curves; (k it): Taylor iterations;\n(g gen, best f): CMA-ES generations and best "
        "fitness (nats); pruned <setting>(judged/arms): the setting and its random controls"
    )
    issues = [(r, i) for r in rows for i in r.issues]
    if issues:
        out.append("")
        order = {"broken": 0, "incomplete": 1, "stale": 2, "torn": 3, "noisy": 4}
        for _, i in sorted(issues, key=lambda x: (order.get(x[1].kind, 9), x[1].path)):
            out.append(f"{i.kind.upper():<10} {i.path}: {i.detail}")
    return "\n".join(out)


def to_json(rows: list[Row]) -> dict:
    return {
        "rows": [{**asdict(r), "broken": r.broken} for r in rows],
        "broken": sum(r.broken for r in rows),
        "issues": [asdict(i) | {"model": r.model, "dataset": r.dataset} for r in rows for i in r.issues],
    }


# ---------------------------------------------------------------- sweeps

DONE_STATES = ("done", "skipped")  # skipped: its output was done when the sweep asked


def sweep_progress(results_dir: str | Path, name: str, job_ids: Sequence[str]) -> dict:
    """A sweep's jobs by state (done, running, failed, blocked, stopped, pending: never started) from the state
    files its runners wrote."""
    states = results.read_job_states(results_dir, name, job_ids)
    jobs = {}
    for j in job_ids:
        st = states.get(j, {})
        state = "done" if st.get("state") in DONE_STATES else st.get("state", "pending")
        jobs[j] = {"state": state, **{k: st[k] for k in ("rc", "attempts", "host") if k in st}}
    counts = {k: sum(v["state"] == k for v in jobs.values()) for k in ("done", "running", "failed", "blocked")}
    counts |= {"stopped": sum(v["state"] == "stopped" for v in jobs.values())}
    counts |= {"pending": len(jobs) - sum(counts.values()), "total": len(jobs)}
    return {"name": name, "results_dir": str(results_dir), "counts": counts, "jobs": jobs}


def sweeps_of(results_dir: str | Path, sweep_file: str | None) -> list[dict]:
    """The progress of the sweep a file describes, or of every sweep whose plan lies in the results dir."""
    if sweep_file is not None:
        from . import sweepfile

        sw = sweepfile.load(sweep_file)
        return [sweep_progress(sw.results_dir, sw.name, [j.id for j in sw.jobs])]
    out = []
    for name in results.sweep_names(results_dir):
        plan = results.read_json(results.sweep_dir(results_dir, name) / results.SWEEP_PLAN)
        out.append(sweep_progress(results_dir, name, [j["id"] for j in plan.get("jobs", [])]))
    return out


def format_sweeps(sweeps: list[dict]) -> str:
    """A line of counts per sweep, then every job that is running, failed, blocked or stopped."""
    lines = []
    for sw in sweeps:
        c = sw["counts"]
        lines.append(
            f"sweep {sw['name']}: {c['done']}/{c['total']} done, {c['running']} running, {c['failed']} failed, "
            f"{c['blocked']} blocked, {c['stopped']} stopped, {c['pending']} pending"
        )
        for j, st in sw["jobs"].items():
            if st["state"] not in ("done", "pending"):
                more = f" (exit {st['rc']}, {st.get('attempts', 0)} tries)" if st["state"] == "failed" else ""
                lines.append(f"  {st['state']:<8} {j}{more}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.parser("check", __doc__.split("\n\n")[0])
    p.add_argument("--results-dir", default="results", help="root of the results tree")
    p.add_argument(
        "--sweep",
        default=None,
        help="a sweep file (YAML): only its jobs' progress (done/running/failed/...) (default: the models' table)",
    )
    p.add_argument("--model", default=None, help="only this model (slug or HF id) (default: every model)")
    p.add_argument("--dataset", default=None, help="only these datasets, comma-separated (default: every dataset)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--deep", action="store_true", help="also CRC-check every npz member (reads them whole)")
    args = cli.parse(p, argv)
    try:
        sweeps = sweeps_of(args.results_dir, args.sweep)
        names = [d.strip() for d in args.dataset.split(",") if d.strip()] if args.dataset else [None]
        rows = [] if args.sweep else [r for d in names for r in check_tree(args.results_dir, args.model, d, args.deep)]
    except (FileNotFoundError, cli.UserError) as e:  # no such results / model / dataset: said as one line
        print(cli.error_line("check", e), file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**({} if args.sweep else to_json(rows)), "sweeps": sweeps}, indent=1))
    else:
        print("\n".join(x for x in (None if args.sweep else format_table(rows), format_sweeps(sweeps)) if x))
    return 1 if any(r.broken for r in rows) else 0


if __name__ == "__main__":
    cli.entry("check", main)
