"""Run untrusted programs in isolation. With `btp.sandbox_child`, the only module of btp that executes or
parses model-written code.

The sandbox is two files. `btp/sandbox_child.py` (standard library only) is everything that runs on the far
side: the parent compiles that whole file once and hands it, as bytecode on stdin, to a fresh interpreter
(`python -I -S -B`), so the whole execution surface can be read there in one sitting; it also defines the
wire protocol, which the parent imports from it. This file is the parent side: it starts that interpreter,
feeds it programs, times them, reads the reports and judges outputs with the caller's `Program.check`.

Process tree (as root, the usual case; `isolation` in every result records what was achieved):

    Sandbox ──► zygote: python -I -S -B, root, one per Sandbox; imports, then only forks
                  └─► server, one per worker slot (a fork of the zygote; fd 0 programs, fd 2 reports)
                        └─► harness: PID 1 of new pid+net+mount namespaces, root, pivoted into a minimal
                            │   read-only root (system libraries, the interpreter and stdlib, the allowed
                            │   packages, a few /dev nodes, fresh /proc); a new SysV IPC namespace and a
                            │   fresh tmpfs at /tmp (size- and inode-limited, the slot's uid) per program;
                            │   runs no program code
                            ├─► one child per test: setsid, rlimits (AS, CPU, FSIZE, NOFILE, NPROC, CORE),
                            │   the slot's own unprivileged uid, no_new_privs, a seccomp filter, fds 0-4
                            │   only, clean env, then exec() of the program (stdin mode: input on fd 0)
                            └─► judge (programs with `judge`): a fork of the harness, root in the namespaces,
                                never given the program; runs the test code against stand-ins that call
                                the program's functions in the child above, with plain values, by pipe

* Fresh interpreter: every program runs in a fork of a harness that has never run program code, so it
  gets an interpreter no other program touched, without paying ~10 ms of interpreter start; namespaces
  and mounts are made once per slot, and a slot runs one program at a time.
* Assembly: the source run is `head + code + tail`, decided in the harness when `complete` asks whether the
  code is a whole function or a body (that needs parsing). Untrusted text is parsed only there, with its
  memory bounded: a parse error, deep nesting, a huge or unencodable source is that program's `error`.
* Verdicts are never decided in the program's process (`Result.judge` says where they were):
  - "separate" (HumanEval, MBPP): the program's child runs the program, then only answers calls: the
    judge process, which holds the test code and never the program, runs the test with each name of
    `calls` bound to a stand-in that sends the arguments (plain values, `encode_plain`: no pickle) and gets
    back the plain value returned (and the arguments after the call). Objects of the program never cross,
    so an `__eq__` that always answers True, or a test's secrets found on the stack, forge nothing; a
    value that is not plain is an error. The judge's verdict goes to the harness on a pipe of its own.
  - "parent" (stdin) and "harness" (functional): outputs are compared in the parent (`check`), which
    alone holds the expected outputs, or in the harness, which gets a test's expected value only after
    that test's processes are gone; the parent tells the harness after each test whether to go on.
  - "in-process" (only where a benchmark says its tests cannot be judged apart, with the reason, e.g. tests
    that build the program's classes): the program *and its tests* prove they ran to the end by writing a
    random nonce to a private verdict pipe after `exec` returns. Exiting early, killing its parent, printing
    "passed" or flooding stdout never passes; code that inspects its own stack can find the nonce.
  The harness reports one line per test on a pipe no program process holds.
* Limits: `timeout` is CPU seconds per test (RLIMIT_CPU); the harness also kills a test child at a wall
  deadline (`wall_factor` x timeout + 1 s: sleepers, a starved host) and when its output passes a cap.
  No alarm inside the program is relied on; the parent has its own backstop deadline. Each slot (server,
  harness, judge, program) lives in a cgroup of its own where the machine allows (v2 where the controllers
  are delegated, else v1 as root): memory (memfd and tmpfs pages too, which RLIMIT_AS misses; the program
  is the OOM killer's first choice), tasks, and an equal CPU share, so spinners in one slot do not starve
  another. `Result.cgroup` says what was reached ("none (why)" otherwise).
* Seccomp: the test child installs a filter (after no_new_privs) that refuses what no test needs: new
  namespaces (user ones above all), keyrings, io_uring, bpf, userfaultfd, ptrace, mounts, perf, modules.
  Files of the host are not in the minimal root, so they cannot be locked (flock) either.
* Minimal root: a program sees no file of the host beyond `/usr`, `/lib*`, the interpreter, its stdlib and
  the packages named in `PACKAGES` (the site dirs are covered and only those bound back): not the
  repository, the benchmarks and their answers, data files, results, home dirs or the host's /tmp. Its
  writable space is its own tmpfs (`Limits.disk_mb`, `Limits.inodes`), so filling it touches no host disk.
* Cleanup: after each test the harness kills everything the program started: as PID 1 of the namespace
  `kill(-1, SIGKILL)` reaches every process in it, including daemons that double-forked and left the
  session; without a pid namespace it kills the uid's processes (root) and sweeps orphans re-parented to
  it (subreaper). Then the program's tmpfs is unmounted (without one: its dir removed iteratively, however
  deep) and its IPC namespace dropped, and only then is the program reported done. A server that falls
  out of step is killed (its namespace with it) and replaced.
* Attempts: `Result.suspicious` lists what a program tried that no test needs (`sandbox_child.SUSPICIOUS`):
  opening or listing paths outside its dir and the interpreter's, forking or starting processes (seen by
  an audit hook in its process, written at once to a file the harness reads after the test), exiting
  before the tests ended (seen by the harness or the judge), returning objects with their own `__eq__`.
  They are a record, not a verdict (a correct program may fork); a program that tampers with its own
  interpreter can hide all of them but the early exit, which the harness sees.
* Nothing a program does stops the run: a slot that fails, a cleanup that fails, a program no server can
  take are that program's `error` verdict, and the slot starts afresh.
* Degrading: without root or without namespaces the same code runs with what the machine allows, down to
  "rlimits-only" (no minimal root: `ro-root`, the host's root read-only except the slot's dir, when only
  pivoting fails; not root: `seccomp` alone, which needs no privilege); the level reached is reported with
  every result, the cgroup level beside it.
* Limit of the threat model: in-process verdicts can be forged by code that inspects its own interpreter
  (frames, memory); separate ones cannot. The harness, the judge and the parent are out of its reach
  (other uid or non-dumpable), and with a pid namespace nothing it starts survives the test. Without a
  memory cgroup, memory is bounded per process (RLIMIT_AS), not per program. The read-only system trees
  of the minimal root (/usr, /lib) are shared with the host: a program may read or flock those files.
Needs Linux >= 5.3 (pidfd); namespaces need root; mount_setattr (5.12) has a fallback.
"""

from __future__ import annotations

import functools
import marshal
import os
import queue
import select
import signal
import site
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from . import sandbox_child
from .sandbox_child import BOOT, DONE, EXPECT, GO_ON, HELLO, STOP, TEST, decode_report, encode_msg, remove_tree

MODES = ("script", "stdin", "functional")
ISOLATION = ("auto", "rlimits-only")
STATUSES = ("passed", "failed", "error", "timeout", "output_limit", "exited", "sandbox_error")
FULL_ISOLATION = "netns+pidns+mountns+ipcns+minroot+tmpfs+unpriv-uid+seccomp"
# what programs may import from the site dirs (the minimal root shows nothing else of them): what
# LiveCodeBench solutions use beyond the standard library; HumanEval and MBPP need only the stdlib
PACKAGES = ("numpy", "numpy.libs", "sortedcontainers")
UID_BASE = 200_000_000  # sandbox uids: UID_BASE + (pid % 100000) * 256 + worker slot; no passwd entry


@dataclass(frozen=True)
class Limits:
    timeout: float = 3.0  # CPU seconds per test (script mode: the whole program), whole seconds up
    wall_factor: float = 3.0  # and wall-clock seconds per test: wall_factor x timeout + 1 (sleepers, a busy host)
    memory_mb: int = 4096  # address space of each process
    max_output: int = 1 << 20  # bytes of stdout+stderr per test before the child is killed
    fsize_mb: int = 16  # largest file a program may write
    nofile: int = 256
    nproc: int = 32  # processes + threads of the sandbox uid (each may use memory_mb)
    disk_mb: int = 64  # size of each program's own tmpfs (minimal root only)
    inodes: int = 4096  # and its files + dirs


@dataclass(frozen=True)
class Program:
    """One program to run. The source run is `head + code + tail` (see `complete`), with `prelude` executed
    first in the program's namespace. `script`: run it (program + its tests), passing = it ran to the end.
    `stdin`: per test, run it with the test's text as stdin; `check(i, stdout)` judges.
    `functional`: per test, call `fn_name` (a method of an instance of `solution_class` when the code
    contains `class <solution_class>`) with the test's argument list; the returned value (tuples as lists)
    must equal `json.loads(expected[i])`, and `check(i, repr(value))` judges too when given.
    Only `code` is untrusted; the sandbox parses it, never the caller."""

    code: str
    mode: str = "script"
    tests: tuple = (None,)
    check: Callable[[int, str], str | None] | None = field(default=None, compare=False)  # None = ok, else why not
    fn_name: str | None = None
    out_caps: tuple[int, ...] = ()  # per-test output caps (default: limits.max_output)
    head: str = ""  # trusted source placed before the code
    tail: str = ""  # trusted source placed after the code
    # a function name: when the code does not define it at top level, the code is a body completing `head`
    # (head + code, or head + indented code when only that compiles); when it does, head + "\n" + code
    complete: str | None = None
    prelude: str = ""  # trusted source executed in the program's namespace before the code
    solution_class: str | None = None  # functional: call fn_name as a method of this class when the code has it
    expected: tuple[str, ...] = ()  # functional: per test, the expected value as JSON text
    # script mode, judged apart: the trusted test source, run in a separate judge process that never holds
    # the program; each name in `calls` is bound there to a stub calling the program's function of that
    # name with plain arguments; `judge_head` (trusted, e.g. a prompt's helpers) runs before they are bound.
    # Empty `judge`: the tests run in the program's process (`tail`), recorded as "in-process".
    judge: str = ""
    judge_head: str = ""
    calls: tuple[str, ...] = ()
    fallback: str = ""  # why a script is judged in-process, when it could not be judged apart


@dataclass
class Result:
    status: str  # one of STATUSES
    error: str = ""  # short excerpt: the failing assert, exception, wrong answer, ...
    duration: float = 0.0
    tests_passed: int = 0
    tests_total: int = 0
    isolation: str = ""
    judge: str = ""  # who decided: separate (judge process) | in-process | parent (stdout) | harness
    cgroup: str = ""  # the slot's cgroup: "v2:memory+pids+cpu", "v1:...", or "none (why)"
    suspicious: list[str] = field(default_factory=list)  # what it tried that no test needs

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# ---------------------------------------------------------------- per-slot cgroups

CGROUP_FS = "/sys/fs/cgroup"
CONTROLLERS = ("memory", "pids", "cpu")
CGROUP_HEADROOM_MB = 256  # above memory_mb + disk_mb: the harness and the judge live in the slot's group too


def _own_cgroups() -> dict[str, str]:
    """This process's cgroup path per v1 controller ("" for the v2 hierarchy)."""
    out = {}
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, ctrls, path = line.rstrip("\n").split(":", 2)
                for c in ctrls.split(",") if ctrls else [""]:
                    out[c] = path
    except OSError:
        pass
    return out


def cgroup_bases(fs: str = CGROUP_FS) -> tuple[str, dict[str, str]]:
    """(version, {controller: the dir under which slot groups are made}) on this machine, or ("none (why)",
    {}): v2 (the unified hierarchy alone) in a group of this process's own, else v1 where its hierarchies
    are writable (as root)."""
    own = _own_cgroups()
    if os.path.exists(f"{fs}/cgroup.controllers"):
        return _v2_base(fs, own.get("", "/"))
    bases = {}
    for c in CONTROLLERS:
        d = os.path.normpath(f"{CGROUP_FS}/{c}{own.get(c, '/')}")
        if os.path.isfile(f"{d}/cgroup.procs") and os.access(d, os.W_OK):
            bases[c] = d
    if not bases:
        return "none (no writable cgroup hierarchy)", {}
    return "v1", bases


def _v2_base(fs: str, own: str) -> tuple[str, dict[str, str]]:
    """v2: `btp-<pid>`, a group with no process of its own (so its children may have controllers), made
    under the hierarchy's root, else under this process's group, wherever memory, pids and cpu can be
    enabled for children; ("none (why)", {}) where neither allows it (controllers not delegated)."""
    why = "no cgroup to make groups in"
    for top in dict.fromkeys([fs, os.path.normpath(fs + own)]):
        group = f"{top}/btp-{os.getpid()}"
        try:
            with open(f"{top}/cgroup.controllers") as f:
                have = f.read().split()
            missing = [c for c in CONTROLLERS if c not in have]
            if missing:
                raise OSError(0, f"{'+'.join(missing)} not available")
            for d in (top, group):
                os.makedirs(d, exist_ok=True)
                _write(f"{d}/cgroup.subtree_control", " ".join(f"+{c}" for c in CONTROLLERS), strict=True)
            return "v2", dict.fromkeys(CONTROLLERS, group)
        except OSError as e:
            why = f"{top}: {e.strerror}"
            try:
                os.rmdir(group)
            except OSError:
                pass
    return f"none (v2: {why})", {}


class _Cgroup:
    """One slot's cgroup (v2: one group; v1: one per controller): limits memory (shmem and memfd pages
    included, which RLIMIT_AS does not see), tasks, and gives the slot an equal CPU share."""

    def __init__(self, version: str, bases: dict[str, str], name: str, lim: Limits) -> None:
        self.version, self.dirs, self.mb = version, [], -1
        for base in bases.values():
            d = f"{base}/{name}"
            if d not in self.dirs:
                os.mkdir(d)
                self.dirs.append(d)
        self.ctrl = {c: f"{bases[c]}/{name}" for c in bases}
        self.set_memory(lim)
        if "pids" in self.ctrl:
            _write(f"{self.ctrl['pids']}/pids.max", str(lim.nproc + 16))
        if "cpu" in self.ctrl:
            _write(
                f"{self.ctrl['cpu']}/" + ("cpu.weight" if version == "v2" else "cpu.shares"),
                "100" if version == "v2" else "1024",
            )
        self.level = f"{version}:{'+'.join(c for c in CONTROLLERS if c in self.ctrl)}"

    @property
    def procs(self) -> list[str]:
        return [f"{d}/cgroup.procs" for d in self.dirs]

    def set_memory(self, lim: Limits) -> None:
        mb = lim.memory_mb + lim.disk_mb + CGROUP_HEADROOM_MB
        if "memory" not in self.ctrl or mb == self.mb:
            return
        d = self.ctrl["memory"]
        if self.version == "v2":
            _write(f"{d}/memory.max", str(mb << 20))
            _write(f"{d}/memory.swap.max", "0", missing_ok=True)
        else:
            for f in ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes"):  # both: no way out by swap
                _write(f"{d}/{f}", str(mb << 20), missing_ok=True)
        self.mb = mb

    def oom_kills(self) -> int:
        """How many processes the group's OOM killer has killed so far (0 where the kernel does not say)."""
        d = self.ctrl.get("memory")
        name = "memory.events" if self.version == "v2" else "memory.oom_control"
        try:
            with open(f"{d}/{name}") as f:
                return next((int(ln.split()[1]) for ln in f if ln.startswith("oom_kill ")), 0)
        except (OSError, TypeError, ValueError):
            return 0

    def remove(self) -> None:
        """rmdir each group once the slot's processes are gone (they may take a moment to leave)."""
        for d in self.dirs:
            for _ in range(100):
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)


def _write(path: str, text: str, missing_ok: bool = False, strict: bool = False) -> None:
    try:
        with open(path, "w") as f:
            f.write(text)
    except (FileNotFoundError, PermissionError):
        if not missing_ok:
            raise
    except OSError:  # e.g. EBUSY: a lower memory limit than what is in use; the old one stays
        if strict:
            raise


@functools.cache
def child_bytecode() -> bytes:
    """btp/sandbox_child.py, compiled whole (our own trusted source) and marshalled: what the zygote reads
    from its stdin and runs (see `sandbox_child.BOOT`)."""
    path = sandbox_child.__file__
    return marshal.dumps(compile(Path(path).read_text(), path, "exec", dont_inherit=True))


class _Zygote:
    """Parent end of the zygote: one fresh `python -I -S -B` per Sandbox; `spawn` gets a server process."""

    def __init__(self, python: str) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }  # nothing secret
        self.proc = subprocess.Popen(
            [python, "-I", "-S", "-B", "-c", BOOT, str(theirs.fileno())],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            env=env,
            cwd="/",
            pass_fds=(theirs.fileno(),),
            start_new_session=True,
        )
        theirs.close()
        self.proc.stdin.write(child_bytecode())
        self.proc.stdin.close()
        self.sock, self.lock = mine, threading.Lock()

    def spawn(self, cmd_fd: int, report_fd: int) -> int:
        """A new server process with the given fds as its 0 and 2; returns a pidfd of it."""
        with self.lock:
            socket.send_fds(self.sock, [b"run"], [cmd_fd, report_fd])
            msg, fds, _, _ = socket.recv_fds(self.sock, 64, 1)
        if not msg or not fds:
            raise RuntimeError("the sandbox zygote died")
        return fds[0]

    def close(self) -> None:
        self.sock.close()  # the zygote exits on EOF
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class _Server:
    """One sandbox server (a worker slot): its namespaces, read-only root and uid are made once; it runs
    one program at a time and kills everything a program started before it reports the program done."""

    def __init__(self, sb: Sandbox, slot: int) -> None:
        self.slot, self.uid = slot, sb._uid_base + slot if sb._drop else None
        self.root = tempfile.mkdtemp(prefix="btp-sbx-", dir=sb.tmp_root)  # program dirs go inside
        os.chmod(self.root, 0o711)
        self.cg, self.cgroup = None, sb._cg_level
        cmd_r, self.cmd = os.pipe()
        self.rep, rep_w = os.pipe()
        self.pidfd, self.level, self.buf, self.junk = -1, "", bytearray(), bytearray()
        try:
            if sb._cg_bases:
                try:
                    self.cg = _Cgroup(sb._cg_version, sb._cg_bases, os.path.basename(self.root), sb.limits)
                    self.cgroup = self.cg.level
                except OSError as e:
                    self.cgroup = f"none ({sb._cg_version}: {e.strerror})"
            self.pidfd = sb._spawn(cmd_r, rep_w)
        except BaseException:
            self.close()
            raise
        finally:
            os.close(cmd_r)
            os.close(rep_w)
        self.send(
            encode_msg(
                {
                    "root": self.root,
                    "uid": self.uid,
                    "isolate": sb.isolation == "auto",
                    "site": sb._site,
                    "packages": list(sb.packages),
                    "cgroup": self.cg.procs if self.cg else [],
                }
            )
        )

    def send(self, data: bytes) -> None:
        """Bytes made by `encode_msg` (or GO_ON/STOP) to the server's command pipe."""
        while data:
            data = data[os.write(self.cmd, data[: 1 << 20]) :]

    def frames(self, deadline: float) -> Iterator[dict]:
        """Report lines as they come; TimeoutError past `deadline`, EOFError if the server is gone."""
        poll = select.poll()
        poll.register(self.rep, select.POLLIN)
        while True:
            while (k := self.buf.find(b"\n")) >= 0:
                line, self.buf = bytes(self.buf[:k]), self.buf[k + 1 :]
                fr = decode_report(line)
                if fr is None:  # interpreter noise, a server traceback
                    self.junk += line[:4000] + b"\n"
                    continue
                yield fr
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            if poll.poll(left * 1000):
                chunk = os.read(self.rep, 1 << 16)
                if not chunk:
                    raise EOFError
                self.buf += chunk

    def close(self, kill: bool = False) -> None:
        """Stop the server (EOF on its command pipe; SIGTERM/SIGKILL when `kill` or if it lingers),
        wait until it is gone, remove its dir."""
        if self.cmd >= 0:
            os.close(self.cmd)
            self.cmd = -1
        if self.pidfd >= 0:
            _stop(self.pidfd, ask=kill)
            self.pidfd = -1
        if self.rep >= 0:
            os.close(self.rep)
            self.rep = -1
        if self.cg is not None:
            self.cg.remove()
            self.cg = None
        remove_tree(self.root)  # iterative: a deep tree left behind must not end the run


def _config(prog: Program, lim: Limits) -> dict:
    """The message that hands one program to a server; ValueError for a program no server could run."""
    if prog.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {prog.mode!r}")
    if prog.mode == "functional" and not prog.fn_name:
        raise ValueError("functional programs need fn_name")
    if not prog.tests:
        raise ValueError("a program needs at least one test (script mode: tests=(None,))")
    n = len(prog.tests)
    caps = list(prog.out_caps) if prog.out_caps else [lim.max_output] * n
    if len(caps) != n:
        raise ValueError(f"out_caps has {len(caps)} entries for {n} tests")
    if prog.judge and (prog.mode != "script" or n != 1 or not prog.calls):
        raise ValueError("a judge needs script mode, one test and the names it calls")
    if prog.expected and (
        prog.mode != "functional" or len(prog.expected) != n or not all(isinstance(e, str) for e in prog.expected)
    ):
        raise ValueError(f"expected needs functional mode and one JSON text per test ({n})")
    return {
        "mode": prog.mode,
        "code": prog.code,
        "head": prog.head,
        "tail": prog.tail,
        "complete": prog.complete,
        "prelude": prog.prelude,
        "solution_class": prog.solution_class,
        "expect": bool(prog.expected),
        "tests": list(prog.tests),
        "caps": caps,
        "fn_name": prog.fn_name,
        "module_name": "__main__" if prog.mode == "stdin" else "__solution__",
        "timeout": float(lim.timeout),
        "wall": _wall(lim),
        "memory_mb": lim.memory_mb,
        "fsize_mb": lim.fsize_mb,
        "nofile": lim.nofile,
        "nproc": lim.nproc,
        "disk_mb": lim.disk_mb,
        "inodes": lim.inodes,
        "judge": prog.judge,
        "judge_head": prog.judge_head,
        "calls": list(prog.calls),
    }


def judge_kind(prog: Program) -> str:
    """Who decides the verdict of `prog`: "separate" (a judge process that never holds the program),
    "parent" (stdout, compared here), "harness" (returned values, compared there), or "in-process" (the
    tests run with the program, with the reason when it could not be judged apart)."""
    if prog.judge:
        return "separate"
    if prog.mode != "script":
        return "parent" if prog.mode == "stdin" else "harness"
    return f"in-process ({prog.fallback})" if prog.fallback else "in-process"


def _wall(lim: Limits) -> float:
    return lim.wall_factor * lim.timeout + 1.0


def _site_dirs() -> list[str]:
    """Site-packages of this interpreter, so programs can import what the evaluator could (numpy ...),
    without running .pth hooks (the interpreter starts with -S)."""
    return [d for d in site.getsitepackages() if os.path.isdir(d)]


def _rmdir_later(path: str) -> None:
    for _ in range(50):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.02)


def _close_all(servers: list, zyg: list) -> None:
    for s in servers:
        s.close()
    servers.clear()
    for z in zyg:
        z.close()
    zyg.clear()


class Sandbox:
    """Runs programs in the isolation described at the top of this module.

    `run(program)` runs one; `map(programs)` runs many on `workers` threads, each with its own sandbox
    server, and yields `(index, Result)` as they finish, holding at most 2 x workers programs at once.
    When either returns a result, nothing that program started is running and its dir is gone.
    `isolation="rlimits-only"` forces the level a machine without root or namespaces gets. `packages`: what
    programs may import from the site dirs (the minimal root shows nothing else of them).
    Use as a context manager, or call `close()`, to stop the servers and the zygote (also done when the
    Sandbox is collected or the interpreter exits)."""

    def __init__(
        self,
        limits: Limits = Limits(),
        *,
        isolation: str = "auto",
        workers: int | None = None,
        tmp_root: str | None = None,
        packages: tuple[str, ...] = PACKAGES,
    ) -> None:
        if isolation not in ISOLATION:
            raise ValueError(f"isolation must be one of {ISOLATION}, got {isolation!r}")
        self.limits, self.isolation, self.tmp_root, self.packages = limits, isolation, tmp_root, packages
        self.python = sys.executable  # the same interpreter: the child side travels as its bytecode
        self.workers = max(1, min(workers or os.cpu_count() or 1, 256))
        self._slots: queue.Queue = queue.Queue()  # a started _Server, or the slot number of one to start
        for s in range(self.workers):
            self._slots.put(s)
        self._uid_base = UID_BASE + (os.getpid() % 100000) * 256
        self._drop = os.geteuid() == 0 and isolation == "auto"
        self._site = _site_dirs()
        self._cg_version, self._cg_bases = (
            cgroup_bases() if self._drop else (f"none ({'not root' if os.geteuid() else 'rlimits-only'})", {})
        )
        self._cg_level = self._cg_version if not self._cg_bases else ""
        if self._cg_version == "v2":  # its own group goes when the Sandbox does (after the servers' groups)
            weakref.finalize(self, _rmdir_later, next(iter(self._cg_bases.values())))
        self._levels: set[str] = set()
        self._lock = threading.Lock()
        self._servers: list[_Server] = []
        self._zyg: list[_Zygote] = []
        self._fin = weakref.finalize(self, _close_all, self._servers, self._zyg)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop every server and the zygote; call when no run is in progress."""
        with self._lock:
            _close_all(self._servers, self._zyg)
            self._slots = queue.Queue()
            for s in range(self.workers):
                self._slots.put(s)

    @property
    def cgroup(self) -> str:
        """The cgroup level slots get on this machine ("v1", "v2", or "none (why)")."""
        return self._cg_version

    @property
    def levels(self) -> set[str]:
        """Isolation levels reached so far (one, unless the machine changed under us)."""
        with self._lock:
            return set(self._levels)

    def _spawn(self, cmd_fd: int, report_fd: int) -> int:
        for attempt in range(2):  # a zygote that died (killed by someone) is replaced once
            with self._lock:
                if not self._zyg or self._zyg[0].proc.poll() is not None:
                    for z in self._zyg:
                        z.close()
                    self._zyg[:] = [_Zygote(self.python)]
                zyg = self._zyg[0]
            try:
                return zyg.spawn(cmd_fd, report_fd)
            except (OSError, RuntimeError):
                if attempt:
                    raise
                zyg.proc.wait(5)
        raise AssertionError("unreachable")

    def run(self, prog: Program, limits: Limits | None = None) -> Result:
        """Run one program; when this returns, nothing it started is running and its dir is gone."""
        return self._run(prog, limits or self.limits)

    def map(self, progs: Iterable[Program], limits: Limits | None = None) -> Iterator[tuple[int, Result]]:
        """Run many on `workers` threads; yields (index, result) as they finish."""
        with ThreadPoolExecutor(self.workers, thread_name_prefix="btp-sandbox") as ex:
            pending: dict = {}
            for i, p in enumerate(progs):
                pending[ex.submit(self._run, p, limits or self.limits)] = (i, p)
                if len(pending) >= 2 * self.workers:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for f in done:
                        yield _outcome(f, *pending.pop(f))
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    yield _outcome(f, *pending.pop(f))

    # ------------------------------------------------------------ one program

    def _run(self, prog: Program, lim: Limits) -> Result:
        cfg = _config(prog, lim)
        try:
            data = encode_msg(cfg)
        except ValueError as e:
            raise ValueError(f"test inputs must be plain data (str, numbers, lists, dicts): {e}") from None
        t0 = time.monotonic()
        slot = self._slots.get()
        try:
            for attempt in range(2):  # a server found dead before it got the program is replaced once
                if not isinstance(slot, _Server):
                    srv = _Server(self, slot)
                    with self._lock:
                        self._servers.append(srv)
                    slot = srv
                try:
                    if slot.cg is not None:
                        slot.cg.set_memory(lim)
                    slot.send(data)
                    break
                except BrokenPipeError:
                    slot = self._retire(slot, kill=True)
                    if attempt:
                        raise
            ooms = slot.cg.oom_kills() if slot.cg else 0
            res, in_step = self._talk(slot, prog, lim, t0)
            if slot.cg and not res.passed and slot.cg.oom_kills() > ooms:
                res.status, res.error = "error", f"killed at the slot's memory limit (cgroup {slot.cg.mb} MB)"
            if not in_step:
                slot = self._retire(slot, kill=True)
        except Exception as e:  # noqa: BLE001 - a slot that failed: this program's verdict, a new slot
            if isinstance(slot, _Server):
                slot = self._retire(slot, kill=True)
            res = Result(status="error", error=f"sandbox failure: {_why(e)}", tests_total=len(prog.tests))
        except BaseException:
            if isinstance(slot, _Server):
                slot = self._retire(slot, kill=True)
            raise
        finally:
            self._slots.put(slot)
        res.duration = round(time.monotonic() - t0, 4)
        return res

    def _retire(self, srv: _Server, kill: bool) -> int:
        """Stop a server that cannot be trusted to be in step; its slot starts a new one when next used."""
        try:
            srv.close(kill=kill)
        except OSError:  # already gone; what matters is that the slot starts afresh
            pass
        with self._lock:
            if srv in self._servers:
                self._servers.remove(srv)
        return srv.slot

    def _talk(self, srv: _Server, prog: Program, lim: Limits, t0: float) -> tuple[Result, bool]:
        """Read reports until the server says the program is done; judge outputs as they come and tell
        the server after each test whether to go on. Returns (result, whether the server is in step)."""
        n = len(prog.tests)
        res = Result(
            status="sandbox_error", tests_total=n, isolation=srv.level, judge=judge_kind(prog), cgroup=srv.cgroup
        )
        final = False
        deadline = t0 + 10.0 + n * (_wall(lim) + 1.0)  # backstop; the server enforces per-test limits
        try:
            for fr in srv.frames(deadline):
                if fr["t"] == HELLO:
                    srv.level = res.isolation = fr["isolation"]
                    if fr.get("cgroup"):  # the server could not join its group
                        srv.cgroup = fr["cgroup"]
                    with self._lock:
                        self._levels.add(srv.level)
                elif fr["t"] == EXPECT:  # the harness judges the returned value, now that the test is over
                    srv.send(encode_msg(prog.expected[fr["i"]]))
                elif fr["t"] == TEST and not final:
                    res.suspicious = sorted(set(res.suspicious) | {str(f)[:60] for f in fr.get("flags", [])[:16]})
                    if fr["status"] != "ok":
                        res.status, res.error, final = fr["status"], fr.get("err", ""), True
                        continue
                    why = prog.check(fr["i"], fr.get("out", "")) if prog.check else None
                    if why:
                        res.status, res.error, final = "failed", f"test {fr['i']}: {why}", True
                    else:
                        res.tests_passed += 1
                    if fr["i"] < n - 1:
                        srv.send(STOP if why else GO_ON)
                elif fr["t"] == DONE:
                    if fr.get("err"):  # the harness could not clean up after it: an error, and a new slot
                        res.status, res.error = "error", fr["err"]
                        return res, False
                    if not final:
                        ok = res.tests_passed == n
                        res.status = "passed" if ok else "sandbox_error"
                        res.error = "" if ok else f"server finished after {res.tests_passed}/{n} tests"
                    return res, res.status != "sandbox_error" and not srv.junk
        except TimeoutError:
            if not final:
                res.status, res.error = "timeout", "no verdict before the parent's wall-clock backstop"
        except (EOFError, BrokenPipeError):
            if not final:
                res.status = "sandbox_error" if srv.junk else "exited"
                res.error = (
                    srv.junk.decode("utf-8", "replace")[-1500:]
                    if srv.junk
                    else "the sandbox server ended without a verdict (killed?)"
                )
        return res, False


def _outcome(fut: Future, i: int, prog: Program) -> tuple[int, Result]:
    """(index, result) of one program of `map`: a program no server could take (a bad config) is an error
    verdict of its own, never the end of the run."""
    try:
        return i, fut.result()
    except Exception as e:  # noqa: BLE001
        return i, Result(status="error", error=f"not run: {_why(e)}", tests_total=len(prog.tests or ()))


def _why(e: BaseException) -> str:
    try:
        return f"{type(e).__name__}: {e}"[:1500]
    except Exception:  # noqa: BLE001 - a str() that fails again
        return type(e).__name__


def _stop(pidfd: int, ask: bool = True) -> None:
    """Wait until a server is gone and close its pidfd: SIGTERM first when `ask` (its outer process then
    kills the namespace, or sweeps), SIGKILL if it has not ended 2 s later."""
    try:
        if ask:
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGTERM)
            except ProcessLookupError:
                pass
        if not select.select([pidfd], [], [], 2.0)[0]:
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            select.select([pidfd], [], [], 10.0)
    finally:
        os.close(pidfd)
