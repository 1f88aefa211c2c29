"""Run untrusted programs in isolation. The only module of btp that executes model-written code.

This file has two halves. The CHILD half (between the two marker lines) is everything that runs on the
far side: the parent compiles exactly that text once and hands it, as bytecode on stdin, to a fresh
interpreter (`python -I -S -B`), so the whole execution surface can be read here in one sitting.
The PARENT half starts that interpreter, feeds it programs, times them, reads the reports and judges.

Process tree (as root, the usual case; `isolation` in every result records what was achieved):

    Sandbox ──► zygote: python -I -S -B, root, one per Sandbox; imports, then only forks
                  └─► server, one per worker slot (a fork of the zygote; fd 0 programs, fd 2 reports)
                        └─► harness: PID 1 of new pid+net+mount namespaces, root; `/` read-only except the
                            │   slot's dir, fresh /proc; a new SysV IPC namespace and an empty dir (mode
                            │   0700, the slot's uid) per program; runs no program code
                            └─► one child per test: setsid, rlimits (AS, CPU, FSIZE, NOFILE, NPROC, CORE),
                                the slot's own unprivileged uid, no_new_privs, fds 0-3 only, clean env,
                                then exec() of the program (stdin mode: the test's input on fd 0)

* Fresh interpreter: every program runs in a fork of a harness that has never run program code, so it
  gets an interpreter no other program touched, without paying ~10 ms of interpreter start; namespaces
  and mounts are made once per slot, and a slot runs one program at a time.
* Verdicts: a test child proves that the program *and its tests* ran to the end by writing a random
  nonce (made by the harness for that child only) to its private verdict pipe after `exec` returns.
  Exiting early (`os._exit(0)`, `sys.exit(0)`), killing its parent, printing "passed" or flooding stdout
  therefore never passes. Outputs of stdin/functional tests are judged in the parent, which alone holds
  the expected outputs; it tells the harness after each test whether to go on. The harness reports one
  line per test on a pipe no program process holds.
* Limits: `timeout` is CPU seconds per test (RLIMIT_CPU); the harness also kills a test child at a wall
  deadline (`wall_factor` x timeout + 1 s: sleepers, a starved host) and when its output passes a cap.
  No alarm inside the program is relied on; the parent has its own backstop deadline.
* Cleanup: after each test the harness kills everything the program started: as PID 1 of the namespace
  `kill(-1, SIGKILL)` reaches every process in it, including daemons that double-forked and left the
  session; without a pid namespace it kills the uid's processes (root) and sweeps orphans re-parented to
  it (subreaper). Then the program's dir is removed and its IPC namespace dropped, and only then is the
  program reported done. A server that falls out of step is killed (its namespace with it) and replaced.
* Degrading: without root or without namespaces the same code runs with what the machine allows, down to
  "rlimits-only"; the level reached is reported with every result.
* Limit of the threat model: code that deliberately inspects its own interpreter (frames, memory) can
  find its nonce; the harness and parent are out of its reach (other uid or non-dumpable), and with a
  pid namespace nothing it starts survives the test. Memory is bounded per process (RLIMIT_AS), not per
  program: up to `nproc` processes may each use `memory_mb`.
Needs Linux >= 5.3 (pidfd); namespaces need root; mount_setattr (5.12) has a fallback.
"""
from __future__ import annotations

# ==== CHILD HALF: runs inside the sandbox (btp-sandbox-child) ====
import marshal
import math
import os
import select
import signal
import sys
import time

_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE, _PR_SET_CHILD_SUBREAPER, _PR_SET_NO_NEW_PRIVS = 1, 4, 36, 38
_CLONE_NEWNS, _CLONE_NEWPID, _CLONE_NEWNET, _CLONE_NEWIPC = 0x00020000, 0x20000000, 0x40000000, 0x08000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REMOUNT = 1, 2, 4, 8, 32
_MS_BIND, _MS_REC, _MS_PRIVATE = 4096, 16384, 1 << 18
_SYS_MOUNT_SETATTR, _AT_RECURSIVE, _AT_FDCWD = 442, 0x8000, -100  # mount_setattr: Linux >= 5.12

# Imported once by the zygote, so a prelude that imports them (LiveCodeBench's) costs nothing per test.
_WARM_MODULES = ("string", "re", "datetime", "collections", "heapq", "bisect", "copy", "math", "random",
                 "statistics", "itertools", "functools", "operator", "io", "sys", "json", "builtins", "typing")

_STATE: dict = {}  # the harness's current test child etc., for the SIGTERM handler


class _Libc:
    """The few syscalls Python 3.11's os module lacks (prctl, unshare, mount, mount_setattr)."""

    def __init__(self) -> None:
        import ctypes

        self.c = ctypes
        self.lib = ctypes.CDLL(None, use_errno=True)
        self.lib.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_void_p]

    def _ok(self, ret: int, what: str) -> None:
        if ret != 0:
            e = self.c.get_errno()
            raise OSError(e, f"{what}: {os.strerror(e)}")

    def prctl(self, option: int, arg: int) -> None:
        u = self.c.c_ulong
        self._ok(self.lib.prctl(self.c.c_int(option), u(arg), u(0), u(0), u(0)), f"prctl({option})")

    def unshare(self, flags: int) -> None:
        self._ok(self.lib.unshare(self.c.c_int(flags)), "unshare")

    def mount(self, src: bytes | None, dst: bytes, fstype: bytes | None, flags: int, data: bytes | None = None) -> None:
        self._ok(self.lib.mount(src, dst, fstype, flags, data), f"mount {dst!r}")

    def readonly_tree(self, path: bytes) -> None:
        """Every mount at and below `path` read-only and nosuid, in one call."""
        c = self.c

        class Attr(c.Structure):
            _fields_ = [("set", c.c_uint64), ("clr", c.c_uint64), ("prop", c.c_uint64), ("userns", c.c_uint64)]

        a = Attr(1 | 2, 0, 0, 0)  # MOUNT_ATTR_RDONLY | NOSUID (not NODEV: /dev/null must keep working)
        self._ok(self.lib.syscall(c.c_long(_SYS_MOUNT_SETATTR), c.c_int(_AT_FDCWD), c.c_char_p(path),
                                  c.c_uint(_AT_RECURSIVE), c.byref(a), c.c_size_t(c.sizeof(a))), "mount_setattr")


def _frame(**kw) -> None:
    """One report line to the parent (fd 2 of the harness; no program process holds it)."""
    data = (repr(kw) + "\n").encode("utf-8", "backslashreplace")
    while data:
        data = data[os.write(2, data):]


def _blocked(path: str, uid: int | None) -> str | None:
    """The first directory on the way to `path` that `uid` (no groups) may not enter, if any."""
    if uid is None:
        return None
    cur = "/"
    for part in [""] + path.strip("/").split("/"):
        cur = os.path.join(cur, part)
        st = os.stat(cur)
        if st.st_uid != uid and not st.st_mode & 0o001:
            return cur
    return None


def _expose(libc: _Libc, paths: list[str], uid: int | None) -> None:
    """Make the interpreter's own trees reachable for the sandbox uid (e.g. a Python under a 0700
    /root): a fresh 0755 tmpfs hides the closed directory, and only the needed trees are bound back."""
    hidden: dict[str, list[str]] = {}
    for p in paths:
        if os.path.isdir(p) and (b := _blocked(p, uid)):
            hidden.setdefault(b, []).append(p)
    for top, inner in hidden.items():
        inner = [p for p in inner if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in inner)]
        fds = [os.open(p, os.O_PATH) for p in inner]  # handles that survive the cover
        libc.mount(b"tmpfs", top.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, b"mode=755,size=64k")
        for p, fd in zip(inner, fds):
            os.makedirs(p, mode=0o755, exist_ok=True)
            libc.mount(f"/proc/self/fd/{fd}".encode(), p.encode(), None, _MS_BIND | _MS_REC)
            os.close(fd)


def _lock_fs(libc: _Libc, work: str, uid: int | None) -> list[str]:
    """In the new mount namespace: fresh /proc for the new pid namespace, `/` read-only except `work`."""
    w = work.encode()
    libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE)  # nothing done here reaches the host
    libc.mount(b"proc", b"/proc", b"proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    os.umask(0o022)
    _expose(libc, [sys.base_prefix, sys.prefix] + [p for p in sys.path if p], uid)
    libc.mount(w, w, None, _MS_BIND)  # the work dir becomes a mount of its own ...
    try:
        libc.readonly_tree(b"/")
    except OSError:  # kernel < 5.12: remount each mount point read-only
        with open("/proc/self/mountinfo") as f:
            points = [ln.split()[4].encode().decode("unicode_escape").encode() for ln in f]
        for p in points:
            libc.mount(None, p, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID)
    libc.mount(None, w, None, _MS_REMOUNT | _MS_BIND | _MS_NOSUID | _MS_NODEV)  # ... that stays writable
    return ["ro-root"]


def _children() -> list[int]:
    try:
        with open(f"/proc/self/task/{os.getpid()}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:  # kernel without CONFIG_PROC_CHILDREN: scan
        me, out = os.getpid(), []
        for d in os.listdir("/proc"):
            try:
                with open(f"/proc/{d}/stat", "rb") as f:
                    if int(f.read().rsplit(b")", 1)[1].split()[1]) == me:
                        out.append(int(d))
            except (OSError, ValueError, IndexError):
                pass
        return out


def _sweep() -> None:
    """Kill everything the last test child left behind (daemons, fork bombs) and reap it."""
    if _STATE["init"]:
        try:
            os.kill(-1, signal.SIGKILL)  # PID 1 of the namespace: every other process in it
        except ProcessLookupError:
            pass
    else:
        if _STATE["uid"] is not None:  # every process of the sandbox uid, wherever it went
            k = os.fork()
            if k == 0:
                try:
                    os.setuid(_STATE["uid"])
                    os.kill(-1, signal.SIGKILL)
                finally:
                    os._exit(0)
            os.waitpid(k, 0)
        for _ in range(10000):  # orphans were re-parented to us (subreaper): kill until none is left
            kids = _children()
            if not kids:
                return
            for k in kids:
                try:
                    os.kill(k, signal.SIGKILL)
                except OSError:
                    pass
            for k in kids:
                try:
                    os.waitpid(k, 0)
                except ChildProcessError:
                    pass
        return
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def _on_term(*_: object) -> None:
    pid = _STATE.get("child")
    if pid:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    _sweep()
    os._exit(1)


def _user_tasks(uid: int) -> int:
    """Tasks the user already runs; RLIMIT_NPROC counts them, so a shared uid needs headroom."""
    n = 0
    for d in os.listdir("/proc"):
        try:
            if d.isdigit() and os.stat(f"/proc/{d}").st_uid == uid:
                with open(f"/proc/{d}/stat", "rb") as f:
                    n += int(f.read().rsplit(b")", 1)[1].split()[17])
        except (OSError, ValueError, IndexError):
            pass
    return n


def _excerpt(e: BaseException, limit: int = 1500) -> bytes:
    """The program's part of a traceback, short."""
    try:
        import linecache
        import traceback

        src = _STATE["source"]
        linecache.cache["<program>"] = (len(src), None, src.splitlines(True), "<program>")
        te = traceback.TracebackException(type(e), e, e.__traceback__)
        te.stack = traceback.StackSummary.from_list([f for f in te.stack if f.filename == "<program>"][-4:])
        text = "".join(te.format())
    except BaseException:  # noqa: BLE001 - a hostile __str__ must not take the child's verdict with it
        text = type(e).__name__
    return text[-limit:].encode("utf-8", "backslashreplace")


def _enter_child(cfg: dict, fds: list[int], libc: _Libc) -> None:
    """In the forked test child, before any program code: the process the program gets."""
    import resource

    os.setsid()
    for target, fd in enumerate(fds):  # 0 stdin, 1 stdout, 2 stderr, 3 verdict
        os.dup2(fd, target)
    os.closerange(4, 1 << 20)  # the report pipe, config, everything else: gone
    cpu = max(1, math.ceil(cfg["timeout"]))  # RLIMIT_CPU counts whole seconds
    for res, v in ((resource.RLIMIT_AS, cfg["memory_mb"] << 20), (resource.RLIMIT_CPU, cpu),
                   (resource.RLIMIT_FSIZE, cfg["fsize_mb"] << 20), (resource.RLIMIT_NOFILE, cfg["nofile"]),
                   (resource.RLIMIT_NPROC, cfg["nproc"]), (resource.RLIMIT_CORE, 0)):
        hard = resource.getrlimit(res)[1]
        if hard != resource.RLIM_INFINITY:  # may only go down
            v = min(v, hard)
        hi = v + 1 if res == resource.RLIMIT_CPU and (hard == resource.RLIM_INFINITY or v < hard) else v
        resource.setrlimit(res, (v, hi))  # CPU: SIGXCPU at the soft limit, SIGKILL a second later
    os.chdir(cfg["work"])
    os.environ.update(HOME=cfg["work"], TMPDIR=cfg["work"])
    os.umask(0o077)
    if _STATE["uid"] is not None:
        os.setgroups([])
        os.setgid(_STATE["uid"])
        os.setuid(_STATE["uid"])
    libc.prctl(_PR_SET_NO_NEW_PRIVS, 1)  # no setuid binaries to climb back with
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # set after setuid, which clears it
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sys.stdin = sys.__stdin__ = open(0, "r", encoding="utf-8", closefd=False)
    sys.stdout = sys.__stdout__ = open(1, "w", encoding="utf-8", closefd=False)
    sys.stderr = sys.__stderr__ = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False,
                                       buffering=1)
    _STATE["streams"] = (sys.stdout, sys.stderr)  # flushed at the end even if the program swaps them
    sys.argv = ["main.py"]
    sys.path.extend(cfg["site"])
    if "random" in sys.modules:  # imported by the zygote: reseed, or every program draws the same numbers
        sys.modules["random"].seed()


def _run_program(cfg: dict, code: object, prelude: object, test: object, nonce: bytes) -> None:
    """In the test child: run the program, then write the verdict. Never returns."""
    import builtins

    _exit, _write = os._exit, os.write  # the program may rebind os.*; these references stay ours
    mode = cfg["mode"]
    ns = {"__name__": cfg["module_name"], "__builtins__": builtins}
    try:
        if prelude is not None:
            exec(prelude, ns)
        if mode == "functional":
            exec(code, ns)
            cls = cfg["solution_class"]
            target = ns[cls]() if cls and f"class {cls}" in _STATE["source"] else None
            fn = getattr(target, cfg["fn_name"]) if target is not None else ns[cfg["fn_name"]]
            value = fn(*test)
            value = list(value) if isinstance(value, tuple) else value  # as LCB: tuples count as lists
            verdict = b"=" + repr(value).encode("utf-8", "backslashreplace")
        else:
            try:
                exec(code, ns)
            except SystemExit:
                if mode == "script":  # a script that exits has not run its tests to the end
                    raise
            verdict = nonce
    except BaseException as e:  # noqa: BLE001 - everything the program raises is a verdict
        verdict = (b"failed\n" if isinstance(e, AssertionError) else b"error\n") + _excerpt(e)
    for stream in (sys.stdout, sys.stderr) + _STATE["streams"]:
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001
            pass
    try:
        while verdict:
            verdict = verdict[_write(3, verdict):]
    finally:
        _exit(0)


def _collect(pid: int, fds: list[int], deadline: float, cap: int) -> tuple[list[bytearray], str | None, int]:
    """Read the child's stdout, stderr and verdict pipes until it exits, times out or floods them;
    kill it and everything it started; return (contents, why stopped early, wait status)."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    bufs = {fd: bytearray() for fd in fds}
    live, why, status = set(fds), None, None
    while status is None:
        left = deadline - time.monotonic()
        if left <= 0:
            why = "timeout"
            break
        watch = list(live) + ([pidfd] if pidfd is not None else [])
        ready = select.select(watch, [], [], left if pidfd is not None else min(left, 0.005))[0]
        for fd in ready:
            if fd == pidfd:
                status = os.waitpid(pid, 0)[1]
                continue
            data = os.read(fd, 1 << 16)
            if data:
                bufs[fd] += data
            else:
                live.discard(fd)
        if sum(len(b) for b in bufs.values()) > cap:
            why = "output_limit"
            break
        if pidfd is None:
            done, st = os.waitpid(pid, os.WNOHANG)
            status = st if done else None
    if status is None:
        os.kill(pid, signal.SIGKILL)
        status = os.waitpid(pid, 0)[1]
    _STATE["child"] = None
    _sweep()  # now every writer of the pipes is dead: what is left in them ends in EOF
    for fd in live:
        os.set_blocking(fd, False)
        try:
            while len(bufs[fd]) <= cap and (data := os.read(fd, 1 << 16)):
                bufs[fd] += data
        except BlockingIOError:
            pass
    if pidfd is not None:
        os.close(pidfd)
    return [bufs[fd] for fd in fds], why, status


def _run_test(cfg: dict, i: int, code: object, prelude: object, libc: _Libc) -> dict:
    """One test in a fresh child; returns the report for the parent."""
    test = cfg["tests"][i]
    if cfg["mode"] == "stdin":
        stdin = os.memfd_create("stdin")
        data = test.encode()
        while data:
            data = data[os.write(stdin, data):]
        os.lseek(stdin, 0, os.SEEK_SET)
    else:
        stdin = os.open(os.devnull, os.O_RDONLY)
    pipes = [os.pipe() for _ in range(3)]  # stdout, stderr, verdict
    nonce = os.urandom(16).hex().encode()
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        _exit = os._exit
        try:
            _enter_child(cfg, [stdin] + [w for _, w in pipes], libc)
            _run_program(cfg, code, prelude, test, nonce)
        except BaseException as e:  # noqa: BLE001 - setup failed: say why, never return into the harness
            os.write(2, f"sandbox child setup failed: {e!r}\n".encode())
        finally:
            _exit(70)
    _STATE["child"] = pid
    os.close(stdin)
    for _, w in pipes:
        os.close(w)
    (out, err, verdict), why, st = _collect(pid, [r for r, _ in pipes], t0 + cfg["wall"], cfg["caps"][i])
    for r, _ in pipes:
        os.close(r)
    rep = {"t": "test", "i": i, "dt": round(time.monotonic() - t0, 4)}
    code_ok = os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0
    errtail = err[-1500:].decode("utf-8", "replace")
    if why:
        rep.update(status=why, err=(f"wall-clock limit ({cfg['wall']:g} s)\n" if why == "timeout" else "") + errtail)
    elif os.WIFSIGNALED(st) and os.WTERMSIG(st) == signal.SIGXCPU:
        rep.update(status="timeout", err=f"CPU time limit ({math.ceil(cfg['timeout'])} s)")
    elif verdict[:7] == b"failed\n" or verdict[:6] == b"error\n":
        kind, _, text = bytes(verdict).partition(b"\n")
        rep.update(status=kind.decode(), err=text.decode("utf-8", "replace"))
    elif cfg["mode"] == "script" and verdict == nonce and code_ok:
        rep.update(status="ok")
    elif cfg["mode"] == "stdin" and code_ok:  # a judge accepts exit 0 even without our epilogue
        rep.update(status="ok", out=out.decode("utf-8", "replace"))
    elif cfg["mode"] == "functional" and verdict[:1] == b"=" and code_ok:
        rep.update(status="ok", out=verdict[1:].decode("utf-8", "replace"))
    else:
        how = (f"exit code {os.WEXITSTATUS(st)}" if os.WIFEXITED(st) else f"signal {os.WTERMSIG(st)}")
        rep.update(status="exited", err=f"ended ({how}) before the tests finished\n{errtail}")
    return rep


def _read_exact(fd: int, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n and (chunk := os.read(fd, n - len(buf))):
        buf += chunk
    return bytes(buf)


def _recv() -> dict | None:
    """The next length-prefixed, marshalled message from the parent on fd 0; None at EOF."""
    head = _read_exact(0, 8)
    return marshal.loads(_read_exact(0, int.from_bytes(head, "little"))) if len(head) == 8 else None


def _program(cfg: dict, libc: _Libc) -> None:
    """Run one program's tests, each in a fresh child; stop at the first test that is not ok, or when
    the parent (which alone knows the expected outputs) says a test's output was wrong."""
    import gc

    _STATE["source"] = cfg["code"]
    try:
        code = compile(cfg["code"], "<program>", "exec", dont_inherit=True)
    except BaseException as e:  # noqa: BLE001 - SyntaxError, ValueError (NUL bytes), RecursionError ...
        _frame(t="test", i=0, status="error", err=f"{type(e).__name__}: {e}"[:1500], dt=0.0)
        return
    prelude = compile(cfg["prelude"], "<prelude>", "exec") if cfg["prelude"] else None
    n = len(cfg["tests"])
    gc.freeze()  # children's collections skip our objects: fewer copy-on-write page faults after fork
    try:
        for i in range(n):
            rep = _run_test(cfg, i, code, prelude, libc)
            _frame(**rep)
            if rep["status"] != "ok" or (i < n - 1 and _read_exact(0, 1) != b"c"):
                return
    finally:
        gc.unfreeze()


def _harness(init: dict, feats: list[str], libc: _Libc, is_init: bool) -> None:
    """Serve programs one at a time: a fresh work dir (and SysV IPC namespace) for each, everything the
    program started killed after each test, the dir removed, then a "done" report. Runs no program code."""
    import shutil

    libc.prctl(_PR_SET_DUMPABLE, 0)  # same-uid children can neither ptrace us nor open our fds
    root = os.geteuid() == 0
    uid = init["uid"] if root else None
    if uid is not None and not is_init and any(_blocked(p, uid) for p in sys.path if os.path.isdir(p)):
        uid = None  # no mount namespace to expose the interpreter in: stay root, and say so
    _STATE.update(init=is_init, uid=uid, child=None)
    if uid is not None:
        feats.append("unpriv-uid")
    ipc = False
    if is_init:
        try:
            libc.unshare(_CLONE_NEWIPC)
            ipc = True
            feats.insert(3, "ipcns")
        except OSError:
            pass
    _frame(t="hello", isolation="+".join(feats) or "rlimits-only")
    count = 0
    while (cfg := _recv()) is not None:
        count += 1
        work = os.path.join(init["root"], f"p{count}")
        os.mkdir(work, 0o700)
        if uid is not None:
            os.chown(work, uid, uid)
        if not root:  # RLIMIT_NPROC counts every task of this user: leave the program its share on top
            cfg["nproc"] += _user_tasks(os.getuid())
        cfg.update(work=work, site=init["site"])
        try:
            _program(cfg, libc)
        finally:
            shutil.rmtree(work, ignore_errors=True)
            if ipc:
                libc.unshare(_CLONE_NEWIPC)  # SysV objects of this program go now, with its namespace
            _frame(t="done")


def _main() -> None:
    """A sandbox server (a fresh fork of the zygote): fd 0 brings programs, fd 2 takes reports."""
    init = _recv()
    if init is None:
        os._exit(0)
    libc = _STATE.get("libc") or _Libc()
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1)
    feats: list[str] = []
    if init["isolate"] and os.geteuid() == 0:
        try:
            libc.unshare(_CLONE_NEWNS | _CLONE_NEWPID | _CLONE_NEWNET)
            feats += ["netns", "pidns", "mountns"]
        except OSError:
            pass  # no namespaces here: degrade, and say so in the hello report
    if "pidns" not in feats:
        signal.signal(signal.SIGTERM, _on_term)
        _harness(init, feats, libc, is_init=False)
        os._exit(0)
    pid = os.fork()
    if pid == 0:  # PID 1 of the new namespaces; when it exits the kernel kills the rest
        _exit = os._exit
        try:
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
            try:
                feats += _lock_fs(libc, init["root"], init["uid"])
            except OSError:
                pass
            _harness(init, feats, libc, is_init=True)
        except BaseException:  # noqa: BLE001 - report, the parent calls it a sandbox error
            import traceback

            traceback.print_exc()
        finally:
            _exit(0)
    signal.signal(signal.SIGTERM, lambda *_: os.kill(pid, signal.SIGKILL))
    os.waitpid(pid, 0)
    os._exit(0)


def _reap(*_: object) -> None:
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                return
        except ChildProcessError:
            return


def _zygote(fd: int) -> None:
    """The one fresh interpreter a Sandbox starts: it imports what servers and programs need, then forks
    a pristine copy of itself for each sandbox server (fd 0: programs, fd 2: reports) and sends back its
    pid and a pidfd. It never runs program code, nor does a server, so every program gets an interpreter
    no other program touched, without paying ~10 ms of interpreter start."""
    import gc
    import socket

    for m in _WARM_MODULES + ("resource", "traceback", "linecache", "ctypes", "shutil"):
        __import__(m)
    _STATE["libc"] = _Libc()
    sock = socket.socket(fileno=fd)
    signal.signal(signal.SIGCHLD, _reap)
    gc.freeze()
    while True:
        msg, fds, _, _ = socket.recv_fds(sock, 64, 2)
        if not msg:  # the Sandbox closed (or its process died)
            os._exit(0)
        pid = os.fork()
        if pid == 0:
            try:
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the server waits for its own children
                sock.close()
                os.dup2(fds[0], 0)
                os.dup2(fds[1], 2)
                os.closerange(3, 1 << 20)
                os.setsid()
                _STATE["libc"].prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
                _main()
            finally:
                os._exit(1)
        pidfd = os.pidfd_open(pid)
        socket.send_fds(sock, [b"%d" % pid], [pidfd])
        for f in fds + [pidfd]:
            os.close(f)
# ==== END OF CHILD HALF ====


# ==== PARENT HALF ====
import ast  # noqa: E402
import json  # noqa: E402
import queue  # noqa: E402
import shutil  # noqa: E402
import site  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import textwrap  # noqa: E402
import threading  # noqa: E402
import weakref  # noqa: E402
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Iterable, Iterator  # noqa: E402

MODES = ("script", "stdin", "functional")
ISOLATION = ("auto", "rlimits-only")
STATUSES = ("passed", "failed", "error", "timeout", "output_limit", "exited", "sandbox_error")
FULL_ISOLATION = "netns+pidns+mountns+ipcns+ro-root+unpriv-uid"
UID_BASE = 200_000_000  # sandbox uids: UID_BASE + (pid % 100000) * 256 + worker slot; no passwd entry


@dataclass(frozen=True)
class Limits:
    timeout: float = 3.0        # CPU seconds per test (script mode: the whole program), whole seconds up
    wall_factor: float = 3.0    # and wall-clock seconds per test: wall_factor x timeout + 1 (sleepers, a busy host)
    memory_mb: int = 4096       # address space of each process
    max_output: int = 1 << 20   # bytes of stdout+stderr per test before the child is killed
    fsize_mb: int = 16          # largest file a program may write
    nofile: int = 256
    nproc: int = 32             # processes + threads of the sandbox uid (each may use memory_mb)


@dataclass(frozen=True)
class Program:
    """One program to run: `code` (untrusted) between trusted `head` and `tail` (see `assemble`), after the
    trusted `prelude`. `script`: run it (program + its tests), passing = it ran to the end.
    `stdin`: per test, run it with the test's text as stdin; `check(i, stdout)` judges.
    `functional`: per test, call `fn_name` (a method of `solution_class()` when the code defines that
    class) with the test's argument list; the value must equal `expected[i]` (JSON text; tuples count as
    lists), or `check(i, repr(value))` judges."""

    code: str
    mode: str = "script"
    tests: tuple = (None,)
    check: Callable[[int, str], str | None] | None = field(default=None, compare=False)  # None = ok, else why not
    fn_name: str | None = None
    out_caps: tuple[int, ...] = ()   # per-test output caps (default: limits.max_output)
    head: str = ""                   # trusted source before the code
    tail: str = ""                   # trusted source after the code
    complete: str | None = None      # a function `head` stubs: code that does not define it is its body
    prelude: str = ""                # trusted source run before the program, in its namespace
    solution_class: str | None = None  # functional: fn_name is a method of this class when the code defines it
    expected: tuple[str, ...] = ()   # functional: expected return values as JSON text


def _defines(code: str, name: str) -> bool:
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return False
    return any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name for n in tree.body)


def _compiles(src: str) -> bool:
    try:
        compile(src, "<candidate>", "exec", dont_inherit=True)
        return True
    except (SyntaxError, ValueError):
        return False


def assemble(prog: Program) -> str:
    """The source that runs: head + code + tail. With `complete`, code that does not define that function
    at top level is a body completing `head` (indented when only that compiles); code that does define it
    follows `head` on a new line (its def replaces the stub, `head`'s imports and helpers stay).
    Parses untrusted code: to move into the sandbox child."""
    if prog.complete is None:
        return prog.head + prog.code + prog.tail
    if _defines(prog.code, prog.complete):
        body = prog.head + "\n" + prog.code
    else:
        body = prog.head + prog.code
        if not _compiles(body) and _compiles(prog.head + textwrap.indent(prog.code, "    ")):
            body = prog.head + textwrap.indent(prog.code, "    ")  # an unindented body
    return body + prog.tail


def value_equal(got_repr: str, expected_json: str) -> str | None:
    """Judge of `expected`: the returned value (its repr, tuples already lists) == json.loads(expected).
    None = ok. Parses program output: to move into the judge."""
    try:
        got = ast.literal_eval(got_repr)
    except Exception:  # noqa: BLE001 - an object with no literal form cannot equal a JSON value
        return f"wrong answer: returned a non-literal value {got_repr[:100]}"
    exp = json.loads(expected_json)
    return None if got == exp else f"wrong answer: got {got_repr[:100]}, expected {expected_json[:100]}"


@dataclass
class Result:
    status: str                 # one of STATUSES
    error: str = ""             # short excerpt: the failing assert, exception, wrong answer, ...
    duration: float = 0.0
    tests_passed: int = 0
    tests_total: int = 0
    isolation: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


_CHILD_CODE: list[bytes] = []
# The zygote reads the child half, compiled here once, as marshalled bytecode from its stdin.
_BOOT = "import marshal,sys;exec(marshal.loads(sys.stdin.buffer.read()))#btp-sandbox-child"


def child_code() -> bytes:
    """The child half of this file (line numbers kept), compiled and marshalled, ending in `_zygote`."""
    if not _CHILD_CODE:
        text = Path(__file__).read_text()
        a = text.index("# ==== CHILD HALF")
        b = text.index("# ==== END OF CHILD HALF ====")
        src = "\n" * text.count("\n", 0, a) + text[a:b] + "\n_zygote(int(sys.argv[1]))\n"
        _CHILD_CODE.append(marshal.dumps(compile(src, __file__, "exec", dont_inherit=True)))
    return _CHILD_CODE[0]


class _Zygote:
    """Parent end of the zygote: one fresh `python -I -S -B` per Sandbox; `spawn` gets a server process."""

    def __init__(self, python: str) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # nothing secret
        self.proc = subprocess.Popen([python, "-I", "-S", "-B", "-c", _BOOT, str(theirs.fileno())],
                                     stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env, cwd="/",
                                     pass_fds=(theirs.fileno(),), start_new_session=True)
        theirs.close()
        self.proc.stdin.write(child_code())
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

    def __init__(self, sb: "Sandbox", slot: int) -> None:
        self.slot, self.uid = slot, sb._uid_base + slot if sb._drop else None
        self.root = tempfile.mkdtemp(prefix="btp-sbx-", dir=sb.tmp_root)  # program dirs go inside
        os.chmod(self.root, 0o711)
        cmd_r, self.cmd = os.pipe()
        self.rep, rep_w = os.pipe()
        self.pidfd, self.level, self.buf, self.junk = -1, "", bytearray(), bytearray()
        try:
            self.pidfd = sb._spawn(cmd_r, rep_w)
        except BaseException:
            self.close()
            raise
        finally:
            os.close(cmd_r)
            os.close(rep_w)
        self.send({"root": self.root, "uid": self.uid, "isolate": sb.isolation == "auto", "site": sb._site})

    def send(self, obj: dict) -> None:
        data = marshal.dumps(obj)
        data = len(data).to_bytes(8, "little") + data
        while data:
            data = data[os.write(self.cmd, data[:1 << 20]):]

    def frames(self, deadline: float) -> Iterator[dict]:
        """Report lines as they come; TimeoutError past `deadline`, EOFError if the server is gone."""
        poll = select.poll()
        poll.register(self.rep, select.POLLIN)
        while True:
            while (k := self.buf.find(b"\n")) >= 0:
                line, self.buf = bytes(self.buf[:k]), self.buf[k + 1:]
                try:
                    fr = ast.literal_eval(line.decode("utf-8", "replace"))
                    assert isinstance(fr, dict) and "t" in fr
                except Exception:  # noqa: BLE001 - interpreter noise, a server traceback
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
        shutil.rmtree(self.root, ignore_errors=True)


def _wall(lim: Limits) -> float:
    return lim.wall_factor * lim.timeout + 1.0


def _site_dirs() -> list[str]:
    """Site-packages of this interpreter, so programs can import what the evaluator could (numpy ...),
    without running .pth hooks (the interpreter starts with -S)."""
    return [d for d in site.getsitepackages() if os.path.isdir(d)]


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
    `isolation="rlimits-only"` forces the level a machine without root or namespaces gets.
    Use as a context manager, or call `close()`, to stop the servers and the zygote (also done when the
    Sandbox is collected or the interpreter exits)."""

    def __init__(self, limits: Limits = Limits(), *, isolation: str = "auto", workers: int | None = None,
                 tmp_root: str | None = None) -> None:
        if isolation not in ISOLATION:
            raise ValueError(f"isolation must be one of {ISOLATION}, got {isolation!r}")
        self.limits, self.isolation, self.tmp_root = limits, isolation, tmp_root
        self.python = sys.executable  # the same interpreter: the child half travels as its bytecode
        self.workers = max(1, min(workers or os.cpu_count() or 1, 256))
        self._slots: queue.Queue = queue.Queue()  # a started _Server, or the slot number of one to start
        for s in range(self.workers):
            self._slots.put(s)
        self._uid_base = UID_BASE + (os.getpid() % 100000) * 256
        self._drop = os.geteuid() == 0 and isolation == "auto"
        self._site = _site_dirs()
        self._levels: set[str] = set()
        self._lock = threading.Lock()
        self._servers: list[_Server] = []
        self._zyg: list[_Zygote] = []
        self._fin = weakref.finalize(self, _close_all, self._servers, self._zyg)

    def __enter__(self) -> "Sandbox":
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
                pending[ex.submit(self._run, p, limits or self.limits)] = i
                if len(pending) >= 2 * self.workers:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for f in done:
                        yield pending.pop(f), f.result()
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    yield pending.pop(f), f.result()

    # ------------------------------------------------------------ one program

    def _run(self, prog: Program, lim: Limits) -> Result:
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
        if prog.expected and len(prog.expected) != n:
            raise ValueError(f"expected has {len(prog.expected)} entries for {n} tests")
        cfg = {"mode": prog.mode, "code": assemble(prog), "tests": list(prog.tests), "caps": caps,
               "prelude": prog.prelude, "solution_class": prog.solution_class,
               "fn_name": prog.fn_name, "module_name": "__main__" if prog.mode == "stdin" else "__solution__",
               "timeout": float(lim.timeout), "wall": _wall(lim), "memory_mb": lim.memory_mb,
               "fsize_mb": lim.fsize_mb, "nofile": lim.nofile, "nproc": lim.nproc}
        try:
            marshal.dumps(cfg)
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
                    slot.send(cfg)
                    break
                except BrokenPipeError:
                    slot = self._retire(slot, kill=True)
                    if attempt:
                        raise
            res, in_step = self._talk(slot, prog, lim, t0)
            if not in_step:
                slot = self._retire(slot, kill=True)
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
        srv.close(kill=kill)
        with self._lock:
            if srv in self._servers:
                self._servers.remove(srv)
        return srv.slot

    def _talk(self, srv: _Server, prog: Program, lim: Limits, t0: float) -> tuple[Result, bool]:
        """Read reports until the server says the program is done; judge outputs as they come and tell
        the server after each test whether to go on. Returns (result, whether the server is in step)."""
        n = len(prog.tests)
        res = Result(status="sandbox_error", tests_total=n, isolation=srv.level)
        final = False
        deadline = t0 + 10.0 + n * (_wall(lim) + 1.0)  # backstop; the server enforces per-test limits
        try:
            for fr in srv.frames(deadline):
                if fr["t"] == "hello":
                    srv.level = res.isolation = fr["isolation"]
                    with self._lock:
                        self._levels.add(srv.level)
                elif fr["t"] == "test" and not final:
                    if fr["status"] != "ok":
                        res.status, res.error, final = fr["status"], fr.get("err", ""), True
                        continue
                    out = fr.get("out", "")
                    why = (prog.check(fr["i"], out) if prog.check
                           else value_equal(out, prog.expected[fr["i"]]) if prog.expected else None)
                    if why:
                        res.status, res.error, final = "failed", f"test {fr['i']}: {why}", True
                    else:
                        res.tests_passed += 1
                    if fr["i"] < n - 1:
                        os.write(srv.cmd, b"s" if why else b"c")
                elif fr["t"] == "done":
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
                res.error = (srv.junk.decode("utf-8", "replace")[-1500:] if srv.junk
                             else "the sandbox server ended without a verdict (killed?)")
        return res, False


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
