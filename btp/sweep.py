"""Run a sweep: the jobs of a sweep file (`btp.sweepfile`), locally in dependency order or as Ray tasks.

`python -m btp.sweep configs/<sweep>.yaml [--ray none|auto|local|ADDRESS] [--retries N] [--dry-run] [--list-jobs]
[--level L] [--job I]`

Every job is its stage's own command line. Before running one, the sweep asks the stage itself whether its
output is done (`--check-done`: the stage's claim, no weights loaded) and skips it if so. On Ray each job is a
task (`@ray.remote`, its resources: one GPU per analysis job when the cluster has GPUs, one CPU otherwise,
`resources:` of the sweep file for any stage), a job waits for its dependencies as Ray task arguments, Ray
retries failed tasks (`max_retries`, `retry_exceptions`). Each job's state (`results/.sweeps/<name>/jobs/`) and
log (`logs/`) lie in the results dir; a table ends the run, exit 1 if a job failed or was blocked by one.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from . import cli, results, sweepfile
from .store import UserError, write_json
from .sweepfile import PER_MODE, Job, Sweep

GPU_STAGES = ("generate", *PER_MODE)  # jobs that take a GPU by default where the cluster has one


@dataclass(frozen=True)
class Context:
    """What every runner of a job needs: where state and logs go, which run of the sweep this is (attempts are
    counted per run), and the folder relative paths of the jobs' flags mean."""

    results_dir: str
    name: str
    run: str
    cwd: str


class JobFailed(RuntimeError):
    """A job's command (or its done check) exited non-zero: Ray retries it, the summary reports it."""


# ---------------------------------------------------------------- one job


def _state(ctx: Context, job: Job, **fields) -> dict:
    st = {"id": job.id, "run": ctx.run, "host": platform.node(), "pid": os.getpid(), **fields}
    write_json(results.job_state_path(ctx.results_dir, ctx.name, job.id), st)
    return st


def _attempt_number(ctx: Context, job: Job) -> int:
    p = results.job_state_path(ctx.results_dir, ctx.name, job.id)
    old = results.read_json(p) if p.exists() else {}
    return int(old.get("attempts", 0)) + 1 if old.get("run") == ctx.run else 1


def _env() -> dict:
    """The jobs run the btp this process runs (first on PYTHONPATH), wherever the runner started."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def attempt(job: Job, ctx: Context) -> dict:
    """One attempt at a job: ask the stage whether its output is done, run it if not. Returns the job's state
    (`skipped` or `done`; `failed` with the exit status)."""
    n = _attempt_number(ctx, job)
    t0 = time.time()
    _state(ctx, job, state="running", attempts=n, started=t0)
    log = results.job_log_path(ctx.results_dir, ctx.name, job.id)
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = job.command(sys.executable)
    with open(log, "a") as f:
        f.write(f"\n=== {job.id}: attempt {n} of run {ctx.run} on {platform.node()} at {time.ctime()}\n")
        f.write("$ " + " ".join([*cmd, "--check-done"]) + "\n")
        f.flush()
        run = lambda c: subprocess.run(c, cwd=ctx.cwd, env=_env(), stdout=f, stderr=subprocess.STDOUT).returncode
        rc = run([*cmd, "--check-done"])
        state = "skipped" if rc == 0 else "failed"
        if rc == cli.NOT_DONE:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            rc = run(cmd)
            state = "done" if rc == 0 else "failed"
        f.write(f"=== {state} (exit {rc}, {time.time() - t0:.1f} s)\n")
    return _state(ctx, job, state=state, rc=rc, attempts=n, started=t0, seconds=round(time.time() - t0, 1))


def run_with_retries(job: Job, ctx: Context, retries: int) -> dict:
    st = attempt(job, ctx)
    while st["state"] == "failed" and st["attempts"] <= retries:
        st = attempt(job, ctx)
    return st


def _ray_job(job: dict, ctx: Context, *deps: dict) -> dict:
    """A Ray task: the dependencies arrive as arguments (Ray runs it only once they succeeded)."""
    st = attempt(Job.from_json(job), ctx)
    if st["state"] == "failed":
        raise JobFailed(f"{st['id']} exited {st['rc']} (attempt {st['attempts']}); see its log")
    return st


# ---------------------------------------------------------------- runners


def _blocked(ctx: Context, job: Job, by: list[str]) -> dict:
    return _state(ctx, job, state="blocked", by=by, attempts=0)


def run_local(sw: Sweep, ctx: Context, jobs: Sequence[Job], retries: int) -> dict[str, dict]:
    """In the plan's (topological) order, one at a time; a job whose dependency failed is blocked."""
    out: dict[str, dict] = {}
    for job in jobs:
        bad = [d for d in job.after if out.get(d, {}).get("state") in ("failed", "blocked")]
        out[job.id] = _blocked(ctx, job, bad) if bad else run_with_retries(job, ctx, retries)
        print(f"[btp.sweep] {job.id}: {out[job.id]['state']}", flush=True)
    return out


def resources(job: Job, gpus: bool) -> dict:
    """A job's Ray resources: the sweep file's, else one GPU (generation, analyses) where the cluster has GPUs,
    else one CPU."""
    if job.resources:
        return dict(job.resources)
    return {"num_gpus": 1} if gpus and job.stage in GPU_STAGES else {"num_cpus": 1}


def run_ray(sw: Sweep, ctx: Context, jobs: Sequence[Job], retries: int, address: str) -> dict[str, dict]:
    """Every job a Ray task, dependencies passed as task arguments; results gathered with ray.wait."""
    import ray

    own = not ray.is_initialized()
    if own:
        if address == "local":
            ray.init(address="local", include_dashboard=False, log_to_driver=False)
        else:  # auto: the running cluster (RAY_ADDRESS, or the latest started here), else a new local one
            ray.init(address=None if address == "auto" else address, log_to_driver=False)
    try:
        gpus = ray.cluster_resources().get("GPU", 0) > 0
        task = ray.remote(_ray_job)
        refs: dict[str, object] = {}
        for job in jobs:
            deps = [refs[d] for d in job.after if d in refs]
            opts = dict(name=job.id, max_retries=retries, retry_exceptions=[JobFailed], **resources(job, gpus))
            refs[job.id] = task.options(**opts).remote(job.to_json(), ctx, *deps)
        waiting = {r: j for j, r in refs.items()}
        raw: dict[str, dict | None] = {}
        while waiting:
            ready, _ = ray.wait(list(waiting), num_returns=1)
            jid = waiting.pop(ready[0])
            try:
                raw[jid] = ray.get(ready[0])
            except ray.exceptions.RayError:  # the job failed (every retry), or a dependency did
                raw[jid] = None
            print(f"[btp.sweep] {jid}: {raw[jid]['state'] if raw[jid] else 'not run or failed'}", flush=True)
        out: dict[str, dict] = {}
        for job in jobs:  # topological: a job's dependencies are classified first
            st = raw[job.id]
            if st is None:
                bad = [d for d in job.after if out.get(d, {}).get("state") in ("failed", "blocked")]
                p = results.job_state_path(ctx.results_dir, ctx.name, job.id)
                last = results.read_json(p) if p.exists() else {}
                ran = last.get("run") == ctx.run and last.get("state") == "failed"
                st = _blocked(ctx, job, bad) if bad else last if ran else _state(ctx, job, state="failed", attempts=0)
            out[job.id] = st
        return out
    finally:
        if own:
            ray.shutdown()


# ---------------------------------------------------------------- the command


def plan_table(jobs: Sequence[Job], index: dict[str, int], sw: Sweep, with_cmd: bool) -> str:
    states = results.read_job_states(sw.results_dir, sw.name, [j.id for j in jobs])
    lines = []
    for j in jobs:
        last = states.get(j.id, {}).get("state", "-")
        row = f"{index[j.id]:4d}  L{j.level}  {j.id:<48} last: {last:<8} after: {', '.join(j.after) or '-'}"
        lines.append(row + ("\n      $ " + " ".join(j.command()) if with_cmd else ""))
    return "\n".join(lines)


def summary_table(states: dict[str, dict], sw: Sweep) -> str:
    w = max((len(j) for j in states), default=4)
    rows = [f"{'job':<{w}}  {'state':<8} {'tries':>5} {'s':>7}  log"]
    for jid, st in states.items():
        log = results.job_log_path(sw.results_dir, sw.name, jid).relative_to(sw.results_dir)
        secs = f"{st['seconds']:.1f}" if "seconds" in st else "-"
        rows.append(f"{jid:<{w}}  {st['state']:<8} {st.get('attempts', 0):>5} {secs:>7}  {log}")
    n = {s: sum(st["state"] == s for st in states.values()) for s in results.JOB_STATES}
    rows.append(", ".join(f"{v} {k}" for k, v in n.items() if v) + f" of {len(states)} jobs")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.ArgumentParser(prog="python -m btp.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("sweep", type=Path, help="the sweep file (YAML; see configs/sweep_demo.yaml)")
    p.add_argument("--ray", default="none", help="none (local, in order) | auto | local | a cluster ADDRESS")
    p.add_argument("--retries", type=int, default=None, help="retries per failed job (default: the file's, else 0)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (jobs, dependencies, commands) and stop")
    p.add_argument("--list-jobs", action="store_true", help="print `index level id` per job (for --job)")
    p.add_argument("--level", type=int, default=None, help="only the jobs of this level (0: no dependencies)")
    p.add_argument("--job", type=int, default=None, help="run only job I (its index in --list-jobs): array tasks")
    args = p.parse_args(argv)
    sw = sweepfile.load(args.sweep)
    jobs = [j for j in sw.jobs if args.level is None or j.level == args.level]
    index = {j.id: i for i, j in enumerate(jobs)}
    retries = sw.retries if args.retries is None else args.retries
    if args.list_jobs:
        print("\n".join(f"{index[j.id]}\t{j.level}\t{j.id}" for j in jobs))
        return 0
    if args.dry_run:
        print(f"[btp.sweep] {sw.name}: {len(jobs)} jobs -> {sw.results_dir}\n" + plan_table(jobs, index, sw, True))
        return 0
    if args.job is not None:
        if not 0 <= args.job < len(jobs):
            raise UserError(f"--job {args.job}: the plan has jobs 0..{len(jobs) - 1} — see --list-jobs")
        jobs = [jobs[args.job]]
    ctx = Context(sw.results_dir, sw.name, uuid.uuid4().hex[:12], os.getcwd())
    # the plan check reads (array tasks rewrite the same plan)
    write_json(
        results.sweep_dir(sw.results_dir, sw.name) / results.SWEEP_PLAN,
        {"name": sw.name, "sweep_file": str(args.sweep.resolve()), "jobs": [j.to_json() for j in sw.jobs]},
    )
    print(f"[btp.sweep] {sw.name}: {len(jobs)} jobs, runner {args.ray}, retries {retries} -> {sw.results_dir}")
    if args.ray == "none" or args.job is not None:
        states = run_local(sw, ctx, jobs, retries)
    else:
        states = run_ray(sw, ctx, jobs, retries, args.ray)
    print(summary_table(states, sw))
    return 1 if any(st["state"] in ("failed", "blocked") for st in states.values()) else 0


if __name__ == "__main__":
    cli.entry("sweep", main)
