"""The child side of the sandbox: everything that runs on the far side of `btp.sandbox`. Standard library only.

The parent compiles this whole file once and hands it, as marshalled bytecode on stdin, to a fresh
`python -I -S -B` (see `BOOT`), where it runs as `CHILD_NAME` and becomes the zygote; the process tree and
its guarantees are described at the top of btp/sandbox.py. Imported as a module (the parent does, for the
wire protocol and for nothing else), it only defines names and starts nothing.

Wire protocol, defined here once:
* parent -> server (fd 0 of the server): messages, each an 8-byte little-endian length and a marshalled
  value (`encode_msg`, `read_msg`): first the server's init dict, then one program dict at a time. Between
  two tests of a program, one byte: GO_ON or STOP. In reply to an EXPECT report, a message holding the
  expected value (JSON text) of that test.
* server -> parent (fd 2 of the server, a pipe no program process holds): reports, one JSON object per line
  (`encode_report`, `decode_report`); "t" is HELLO (isolation level, cgroup trouble), TEST (one test's
  status, error excerpt, output, suspicious flags), EXPECT (test i returned a value: send its expected
  value) or DONE (the program's processes and dir are gone; "err" when cleaning up failed).
* judge <-> program's child (judged programs, both forks of the harness): messages of a 4-byte length and
  JSON (`_send`, `_recv`): the child says ["ready"] once its code ran (or ["died", excerpt]); then per call
  the judge sends [name, args, kwargs] and the child answers ["ok", value, args after], ["raise", type,
  message] or ["bad", why], each with its flags, values tagged by `encode_plain` (plain values only). The
  judge's verdict, one JSON object, goes to the harness on a pipe of its own.

Untrusted source is parsed and compiled here only, in the harness (`assemble`, `value_equal`), which runs no
program code and bounds the memory parsing may take; whatever that raises is the program's verdict. What the
program's process sends the judge is decoded as plain values only (`decode_plain`), never unpickled.
"""

from __future__ import annotations

import ast
import json
import marshal
import math
import os
import select
import signal
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager

CHILD_NAME = "__btp_sandbox_child__"  # the namespace the zygote runs in; only there does this file start one
MARK = "btp-sandbox-child"  # on the zygote's command line, so its processes can be told apart
BOOT = f"import marshal,sys;exec(marshal.loads(sys.stdin.buffer.read()),{{'__name__':{CHILD_NAME!r}}})#{MARK}"
HELLO, TEST, EXPECT, DONE = "hello", "test", "expect", "done"  # report kinds
GO_ON, STOP = b"c", b"s"  # the parent's word between two tests
# stdlib modules that the harness needs or programs commonly import: loaded once in the zygote, so that
# every fork has them without paying the import
PRELOAD = (
    "string",
    "re",
    "datetime",
    "collections",
    "heapq",
    "bisect",
    "copy",
    "math",
    "random",
    "statistics",
    "itertools",
    "functools",
    "operator",
    "io",
    "sys",
    "json",
    "builtins",
    "typing",
    "resource",
    "traceback",
    "linecache",
    "ctypes",
    "shutil",
)


def encode_msg(obj: object) -> bytes:
    """A parent -> server message; ValueError if `obj` is not plain data (str, numbers, lists, dicts ...).
    marshal keeps lone surrogates, so any str the parent holds reaches the harness unchanged."""
    data = marshal.dumps(obj)
    return len(data).to_bytes(8, "little") + data


def read_msg(fd: int) -> object | None:
    """The next message on `fd`; None at EOF."""
    head = _read_exact(fd, 8)
    return marshal.loads(_read_exact(fd, int.from_bytes(head, "little"))) if len(head) == 8 else None


def encode_report(**kw: object) -> bytes:
    """One report line (ASCII JSON: a lone surrogate in an error text travels escaped)."""
    return (json.dumps(kw) + "\n").encode()


def decode_report(line: bytes) -> dict | None:
    """A report line as sent by `encode_report`; None for anything else (interpreter noise, a traceback)."""
    try:
        rep = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return rep if isinstance(rep, dict) and rep.get("t") in (HELLO, TEST, EXPECT, DONE) else None


def _read_exact(fd: int, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n and (chunk := os.read(fd, n - len(buf))):
        buf += chunk
    return bytes(buf)


# ---------------------------------------------------------------- primitives on untrusted text (harness only)


def _defines(code: str, name: str) -> bool:
    """Whether `code` defines function `name` at top level (False when it does not parse)."""
    try:
        tree = ast.parse(code)
    except Exception:  # noqa: BLE001 - SyntaxError, and MemoryError/RecursionError of deep nesting
        return False
    return any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name for n in tree.body)


def _compiles(src: str) -> bool:
    try:
        compile(src, "<candidate>", "exec", dont_inherit=True)
        return True
    except Exception:  # noqa: BLE001 - SyntaxError, ValueError (NUL), UnicodeEncodeError, deep nesting
        return False


def assemble(code: str, head: str = "", tail: str = "", complete: str | None = None) -> str:
    """The source to run: head + code + tail. With `complete` (a function name): when `code` defines it at
    top level, head + "\\n" + code + tail; else `code` is a body completing `head`: head + code + tail, or
    head + indented code + tail when only that compiles. Parses untrusted code: only inside the sandbox."""
    if complete is None:
        return head + code + tail
    if _defines(code, complete):
        return head + "\n" + code + tail
    if not _compiles(head + code) and _compiles(head + textwrap.indent(code, "    ")):
        return head + textwrap.indent(code, "    ") + tail
    return head + code + tail


def value_equal(got_repr: str, expected_json: str) -> str | None:
    """A returned value (its repr; tuples already lists) against the expected value as JSON text: None if
    equal, else why not. Parses untrusted text: only inside the sandbox."""
    try:
        got = ast.literal_eval(got_repr)
    except Exception:  # noqa: BLE001 - an object with no literal form cannot equal a JSON value
        return f"wrong answer: returned a non-literal value {got_repr[:100]}"
    return (
        None
        if got == json.loads(expected_json)
        else f"wrong answer: got {got_repr[:100]}, expected {expected_json[:100]}"
    )


def remove_tree(path: str) -> bool:
    """Remove `path` and everything below it without recursion, long paths or one fd per level (a program
    may leave trees thousands of levels deep, or dirs it made unreadable). Never raises; True if gone."""
    try:
        top = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return True
    except OSError:
        return _unlink(path)
    names: list[str] = []  # the way down from `path`: one name per level, one fd (the deepest) open
    try:
        while True:
            sub = _clear_files(top)
            if sub is not None:
                flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                try:
                    fd = os.open(sub, flags, dir_fd=top)
                except PermissionError:  # not root: a dir the program closed; open it up once
                    os.chmod(sub, 0o700, dir_fd=top)
                    fd = os.open(sub, flags, dir_fd=top)
                os.close(top)
                top = fd
                names.append(sub)
                continue
            if not names:
                break
            up = os.open("..", os.O_RDONLY | os.O_DIRECTORY, dir_fd=top)
            os.close(top)
            top = up
            os.rmdir(names.pop(), dir_fd=top)
    except OSError:
        pass
    finally:
        os.close(top)
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return True


def _clear_files(dfd: int) -> str | None:
    """Unlink every non-directory in the dir `dfd`; return the name of one subdirectory left, if any."""
    try:
        it = os.scandir(dfd)
    except PermissionError:  # not root: make it ours again (the program's own dir, same uid)
        os.fchmod(dfd, 0o700)
        it = os.scandir(dfd)
    with it:
        for e in it:
            if e.is_dir(follow_symlinks=False):
                return e.name
            os.unlink(e.name, dir_fd=dfd)
    return None


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


# ---------------------------------------------------------------- plain values between program and judge

PLAIN_DEPTH, PLAIN_ITEMS = 100, 10_000_000  # beyond either, a value is refused (an error, never a pass)
_STDLIB = frozenset(sys.stdlib_module_names) | {"builtins"}


class NotPlain(TypeError):
    """A value that may not cross from the program to the judge."""


def encode_plain(value: object, flags: set | None = None) -> str:
    """`value` as tagged JSON, if it is made only of None, bool, int, float, complex, str, bytes, bytearray,
    list, tuple, dict, set, frozenset; NotPlain otherwise. Only exact types and, for subclasses of them,
    their base type's contents (read through the base type's own methods) cross, so no method of the
    program's (an `__eq__` that always answers True) ever reaches the judge; such a class is added to
    `flags` as "custom __eq__"."""
    budget = [PLAIN_ITEMS]
    return json.dumps(
        _enc(value, 0, budget, flags if flags is not None else set()), ensure_ascii=True, separators=(",", ":")
    )


_BASES = (bool, int, float, complex, str, bytes, bytearray, list, tuple, dict, set, frozenset)


def _enc(v: object, depth: int, budget: list, flags: set) -> object:
    budget[0] -= 1
    if depth > PLAIN_DEPTH or budget[0] < 0:
        raise NotPlain("value nested too deep or too large")
    t = type(v)
    if v is None or t is bool or t is str:
        return v
    if t not in _BASES:
        base = next((b for b in _BASES if isinstance(v, b)), None)
        if any("__eq__" in vars(k) for k in t.__mro__ if k.__module__ not in _STDLIB):
            flags.add(CUSTOM_EQ)
        if base is None:
            raise NotPlain(f"returned a value of type {t.__name__}, not a plain value")
        t = base
    if t is bool:
        return bool.__bool__(v)  # type: ignore[arg-type]
    if t is int:
        n = int.__index__(v)  # type: ignore[arg-type]
        return n if -(1 << 62) < n < (1 << 62) else {"i": hex(n)}
    if t is float:
        x = float.__float__(v)  # type: ignore[arg-type]
        return x if math.isfinite(x) else {"f": float.hex(x)}
    if t is complex:
        c = complex.__complex__(v)  # type: ignore[attr-defined]
        return {"c": [float.hex(c.real), float.hex(c.imag)]}
    if t is str:
        return str.__str__(v)  # type: ignore[arg-type]
    if t in (bytes, bytearray):
        return {"b" if t is bytes else "B": bytes(memoryview(v)).hex()}  # type: ignore[arg-type]
    if t is dict:
        return {"d": [[_enc(k, depth + 1, budget, flags), _enc(x, depth + 1, budget, flags)] for k, x in dict.items(v)]}  # type: ignore[arg-type]
    items = [_enc(x, depth + 1, budget, flags) for x in t.__iter__(v)]  # type: ignore[attr-defined]
    return items if t is list else {{tuple: "t", set: "s", frozenset: "F"}[t]: items}


def decode_plain(text: str) -> object:
    """The value `encode_plain` wrote; ValueError for anything else (the program wrote its own reply)."""
    try:
        return _dec(json.loads(text), 0)
    except (ValueError, TypeError, KeyError, IndexError, RecursionError, OverflowError) as e:
        raise ValueError(f"not a plain value ({type(e).__name__})") from None


def _dec(v: object, depth: int) -> object:
    if depth > PLAIN_DEPTH:
        raise ValueError("too deep")
    if v is None or type(v) in (bool, int, float, str):
        return v
    if type(v) is list:
        return [_dec(x, depth + 1) for x in v]
    ((tag, x),) = v.items()  # type: ignore[union-attr]
    if tag == "i":
        return int(x, 16)
    if tag == "f":
        return float.fromhex(x)
    if tag == "c":
        return complex(float.fromhex(x[0]), float.fromhex(x[1]))
    if tag in ("b", "B"):
        return (bytes if tag == "b" else bytearray).fromhex(x)
    if tag == "d":
        return {_dec(k, depth + 1): _dec(y, depth + 1) for k, y in x}
    return {"t": tuple, "s": set, "F": frozenset}[tag](_dec(y, depth + 1) for y in x)


@contextmanager
def _memory_bound(mb: int) -> Iterator[None]:
    """Parsing untrusted source may want any amount of memory: while it runs, the harness's address space
    may grow by `mb` at most (soft RLIMIT_AS, restored after), so excess ends in MemoryError, a verdict,
    and not in the OOM killer."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        cap = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE") + (mb << 20)
    for lim in (soft, hard):
        if lim != resource.RLIM_INFINITY:
            cap = min(cap, lim)  # may only go down
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# ---------------------------------------------------------------- the processes

_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE, _PR_SET_CHILD_SUBREAPER, _PR_SET_NO_NEW_PRIVS = 1, 4, 36, 38
_CLONE_NEWNS, _CLONE_NEWPID, _CLONE_NEWNET, _CLONE_NEWIPC = 0x00020000, 0x20000000, 0x40000000, 0x08000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REMOUNT = 1, 2, 4, 8, 32
_MS_BIND, _MS_REC, _MS_PRIVATE = 4096, 16384, 1 << 18
_SYS_MOUNT_SETATTR, _AT_RECURSIVE, _AT_FDCWD = 442, 0x8000, -100  # mount_setattr: Linux >= 5.12
_SYS_PIVOT_ROOT, _MNT_DETACH = {"x86_64": 155, "aarch64": 41}, 2
# The minimal root a program sees: these trees of the host (system libraries, the interpreter), read-only;
# plus the stdlib, the allowed packages of the site dirs, a few /etc files, /dev nodes, fresh /proc, and a
# fresh tmpfs at /tmp per program. Not the repository, the benchmarks, data files, results, homes or host /tmp.
ROOT_TREES = ("/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin")
ROOT_FILES = ("/etc/ld.so.cache", "/etc/localtime", "/etc/nsswitch.conf")
DEV_NODES = ("null", "zero", "full", "random", "urandom")
SITE_GLOBS = ("/usr/lib/python3*/*-packages", "/usr/local/lib/python3*/*-packages", "/usr/lib/python3/dist-packages")
WORK = "/tmp"  # where each program's own tmpfs is mounted inside the minimal root

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

    def umount(self, path: bytes) -> None:
        self._ok(self.lib.umount2(path, self.c.c_int(_MNT_DETACH)), f"umount {path!r}")

    def pivot_root(self, new: bytes, old: bytes) -> None:
        nr = _SYS_PIVOT_ROOT.get(os.uname().machine)
        if nr is None:
            raise OSError(38, "pivot_root: unknown syscall number on this architecture")
        self._ok(self.lib.syscall(self.c.c_long(nr), self.c.c_char_p(new), self.c.c_char_p(old)), "pivot_root")

    def readonly_tree(self, path: bytes) -> None:
        """Every mount at and below `path` read-only and nosuid, in one call."""
        c = self.c

        class Attr(c.Structure):
            _fields_ = [("set", c.c_uint64), ("clr", c.c_uint64), ("prop", c.c_uint64), ("userns", c.c_uint64)]

        a = Attr(1 | 2, 0, 0, 0)  # MOUNT_ATTR_RDONLY | NOSUID (not NODEV: /dev/null must keep working)
        self._ok(
            self.lib.syscall(
                c.c_long(_SYS_MOUNT_SETATTR),
                c.c_int(_AT_FDCWD),
                c.c_char_p(path),
                c.c_uint(_AT_RECURSIVE),
                c.byref(a),
                c.c_size_t(c.sizeof(a)),
            ),
            "mount_setattr",
        )


# ---------------------------------------------------------------- seccomp: what no test needs

# Denied with EPERM: new namespaces (user ones above all), keyrings, io_uring, bpf, userfaultfd, ptrace and
# its kin, mounts, module loading, perf, swap, reboot. clone is allowed unless it asks for a namespace;
# clone3 answers ENOSYS (its flags are out of the filter's reach), so libc falls back to clone.
_DENY = (
    "ptrace mount umount2 pivot_root chroot unshare setns keyctl add_key request_key io_uring_setup "
    "io_uring_enter io_uring_register bpf userfaultfd perf_event_open process_vm_readv process_vm_writev "
    "kexec_load kexec_file_load init_module finit_module delete_module open_by_handle_at name_to_handle_at "
    "open_tree move_mount fsopen fsconfig fsmount fspick mount_setattr quotactl swapon swapoff reboot acct "
    "syslog kcmp pidfd_getfd personality"
).split()
_SYSCALLS = {  # (audit arch, numbers) per machine
    "x86_64": (
        0xC000003E,
        dict(
            zip(
                _DENY + ["clone", "clone3"],
                (
                    101,
                    165,
                    166,
                    155,
                    161,
                    272,
                    308,
                    250,
                    248,
                    249,
                    425,
                    426,
                    427,
                    321,
                    323,
                    298,
                    310,
                    311,
                    246,
                    320,
                    175,
                    313,
                    176,
                    304,
                    303,
                    428,
                    429,
                    430,
                    431,
                    432,
                    433,
                    442,
                    179,
                    167,
                    168,
                    169,
                    163,
                    103,
                    312,
                    438,
                    135,
                    56,
                    435,
                ),
            )
        ),
    ),
    "aarch64": (
        0xC00000B7,
        dict(
            zip(
                _DENY + ["clone", "clone3"],
                (
                    117,
                    40,
                    39,
                    41,
                    51,
                    97,
                    268,
                    219,
                    217,
                    218,
                    425,
                    426,
                    427,
                    280,
                    282,
                    241,
                    270,
                    271,
                    104,
                    294,
                    105,
                    273,
                    106,
                    265,
                    264,
                    428,
                    429,
                    430,
                    431,
                    432,
                    433,
                    442,
                    60,
                    224,
                    225,
                    142,
                    89,
                    116,
                    272,
                    438,
                    92,
                    220,
                    435,
                ),
            )
        ),
    ),
}
_CLONE_NEW = 0x7E020000  # CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET (NEWTIME: unshare only)


def seccomp_filter(machine: str) -> bytes | None:
    """The classic-BPF program of the filter (struct sock_filter[]) for `machine`; None if unknown."""
    import struct

    if machine not in _SYSCALLS:
        return None
    arch, nr = _SYSCALLS[machine]
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, eperm, enosys = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38
    ins = [(ld, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, eperm), (ld, 0, 0, 0)]
    if machine == "x86_64":
        ins += [(jge, 0, 1, 0x40000000), (ret, 0, 0, eperm)]  # the x32 ABI's numbers
    for name in _DENY:
        ins += [(jeq, 0, 1, nr[name]), (ret, 0, 0, eperm)]
    ins += [
        (jeq, 0, 1, nr["clone3"]),
        (ret, 0, 0, enosys),
        (jeq, 1, 0, nr["clone"]),
        (ret, 0, 0, allow),
        (ld, 0, 0, 16),
        (jset, 0, 1, _CLONE_NEW),
        (ret, 0, 0, eperm),
        (ret, 0, 0, allow),
    ]
    return b"".join(struct.pack("HBBI", *i) for i in ins)


def _seccomp(libc: _Libc, prog: bytes) -> None:
    """Install the filter on this process (needs no_new_privs); its children inherit it."""
    c = libc.c

    class Fprog(c.Structure):
        _fields_ = [("len", c.c_ushort), ("filter", c.c_char_p)]

    f = Fprog(len(prog) // 8, prog)
    u = c.c_ulong
    libc._ok(libc.lib.prctl(c.c_int(22), u(2), c.cast(c.pointer(f), c.c_void_p), u(0), u(0)), "seccomp")


def _seccomp_works(libc: _Libc) -> bool:
    """Whether the filter installs here: tried once in a throwaway child."""
    prog = seccomp_filter(os.uname().machine)
    if prog is None:
        return False
    pid = os.fork()
    if pid == 0:
        try:
            libc.prctl(_PR_SET_NO_NEW_PRIVS, 1)
            _seccomp(libc, prog)
            libc.unshare(_CLONE_NEWNET)  # must be refused now
            os._exit(1)
        except OSError as e:
            os._exit(0 if e.errno == 1 else 1)
        finally:
            os._exit(1)
    return os.waitpid(pid, 0)[1] == 0


# ---------------------------------------------------------------- attempts: what no test needs

READS, LISTS, FORKS, EXITS, CUSTOM_EQ = (
    "reads outside its dir",
    "lists outside its dir",
    "forks",
    "exits early",
    "custom __eq__",
)
SUSPICIOUS = (READS, LISTS, FORKS, EXITS, CUSTOM_EQ)  # the flags a verdict may carry
_FORK_EVENTS = frozenset(
    ("os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system", "subprocess.Popen", "pty.spawn")
)
_READABLE = (
    "/dev/null",
    "/dev/zero",
    "/dev/urandom",
    "/dev/random",
    "/dev/full",
    "/dev/shm",
    "/dev/fd",
    "/dev/std",
    "/proc/self",
    "/usr/share/zoneinfo",
    "/etc/localtime",
)


def _flag(name: str) -> None:
    """Record an attempt at once on the test's flags file (a memfd the harness reads after the test), so
    a program that dies right after still has it on record; each flag once."""
    seen = _STATE.setdefault("flagged", set())
    fd = _STATE.get("flags_fd")
    if name in seen or fd is None:
        return
    seen.add(name)
    try:
        os.write(fd, name.encode() + b"\n")
    except OSError:  # the program closed it: what it does next is not on record
        pass


def _audit(event: str, args: tuple) -> None:
    """Audit hook of the test child, armed when the program's code starts: flags opening or listing paths
    outside its dir and the interpreter's, and starting processes."""
    if not _STATE.get("armed"):
        return
    if event == "open" or event in ("os.listdir", "os.scandir"):
        path = args[0] if args else None
        if isinstance(path, bytes):
            path = path.decode("utf-8", "surrogateescape")
        if isinstance(path, str) and not _inside(os.path.abspath(path)):
            _flag(READS if event == "open" else LISTS)
    elif event in _FORK_EVENTS:
        _flag(FORKS)


def _inside(path: str) -> bool:
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in _STATE["readable"])


def _note_custom_eq(value: object) -> None:
    """Flag a returned value that carries the program's own `__eq__` (judged by its repr, it forges
    nothing, but it was tried)."""
    flags: set = set()
    try:
        _enc(value, 0, [PLAIN_ITEMS], flags)
    except (NotPlain, RecursionError):
        pass
    if flags:
        _flag(CUSTOM_EQ)


def _flags_of(fd: int) -> list[str]:
    """The flags a test child wrote to its flags file (known ones only)."""
    os.lseek(fd, 0, os.SEEK_SET)
    data = os.read(fd, 4096)
    os.close(fd)
    return sorted({f for f in data.decode("ascii", "replace").split("\n") if f in SUSPICIOUS})


def _report(**kw: object) -> None:
    """One report line to the parent (fd 2 of the harness; no program process holds it)."""
    data = encode_report(**kw)
    while data:
        data = data[os.write(2, data) :]


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


def _min_root(libc: _Libc, new: str, site: list[str], packages: list[str]) -> list[str]:
    """In the new mount namespace: build the minimal root on a tmpfs at `new` and pivot into it; the host's
    tree is detached. Each program later gets its own tmpfs at WORK (`_mount_work`)."""
    import glob

    libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE)  # nothing done here reaches the host
    os.umask(0o022)
    libc.mount(b"tmpfs", new.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, b"mode=755,size=4m,nr_inodes=4096")
    at = lambda p: new + p  # noqa: E731 - a host path's place in the new root
    trees = [t for t in ROOT_TREES if os.path.isdir(t) and not os.path.islink(t)]
    for t in ROOT_TREES:
        if os.path.islink(t):
            os.symlink(os.readlink(t), at(t))
    lib = os.path.join(sys.base_prefix, "lib")  # libpython and the libraries its extension modules link to
    paths = [p for p in sys.path if p and os.path.isdir(p)]
    std = [p for p in [lib] + paths if os.path.isdir(p) and not _under(p, trees)]
    std = [p for p in std if not any(p != q and _under(p, [q]) for q in std)]
    for p in trees + std:
        _bind(libc, p, at(p))
    exe = os.path.realpath(sys.executable)
    for f in list(ROOT_FILES) + [exe]:
        if os.path.isfile(f) and not _under(f, trees + std):
            _bind(libc, f, at(f))
    if sys.executable != exe and not os.path.lexists(at(sys.executable)):
        os.makedirs(os.path.dirname(at(sys.executable)), exist_ok=True)
        os.symlink(exe, at(sys.executable))
    hide = {p for g in SITE_GLOBS for p in glob.glob(g)} | {
        os.path.join(p, n) for p in paths for n in ("site-packages", "dist-packages")
    }
    for d in sorted(hide | set(site)):  # site dirs inside a bound tree: covered, then only packages bound
        if os.path.isdir(d) and (_under(d, trees + std) or d in site):
            os.makedirs(at(d), exist_ok=True)
            libc.mount(b"tmpfs", at(d).encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, b"mode=755,size=64k")
    for d in site:
        for name in packages:
            if os.path.exists(os.path.join(d, name)):
                _bind(libc, os.path.join(d, name), at(os.path.join(d, name)))
    _dev(libc, at("/dev"))
    os.makedirs(at("/proc"))
    os.makedirs(at(WORK), mode=0o755)
    os.chdir(new)
    try:
        libc.pivot_root(b".", b".")  # the old root now lies under the new one: detach it
        libc.umount(b".")
    except OSError:
        os.chroot(".")  # no pivot_root here: the programs' uid cannot chroot back out
    _STATE["pivoted"] = True
    os.chdir("/")
    _read_only(libc)
    libc.mount(b"proc", b"/proc", b"proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)  # /proc/self stays writable
    return ["minroot"]


def _under(path: str, tops: list[str]) -> bool:
    return any(path == t or path.startswith(t.rstrip("/") + "/") for t in tops)


def _bind(libc: _Libc, src: str, dst: str) -> None:
    if os.path.isdir(src):
        os.makedirs(dst, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        open(dst, "a").close()
    libc.mount(src.encode(), dst.encode(), None, _MS_BIND | _MS_REC)


def _dev(libc: _Libc, dev: str) -> None:
    """A /dev of a few harmless nodes; /dev/shm is the program's own tmpfs."""
    os.makedirs(dev)
    libc.mount(b"tmpfs", dev.encode(), b"tmpfs", _MS_NOSUID, b"mode=755,size=64k")
    for n in DEV_NODES:
        if os.path.exists("/dev/" + n):
            _bind(libc, "/dev/" + n, f"{dev}/{n}")
    for name, target in (
        ("shm", WORK),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        os.symlink(target, f"{dev}/{name}")


def _read_only(libc: _Libc) -> None:
    try:
        libc.readonly_tree(b"/")
    except OSError:  # kernel < 5.12: remount each mount point read-only
        with open("/proc/self/mountinfo") as f:
            points = [ln.split()[4].encode().decode("unicode_escape").encode() for ln in f]
        for p in points:
            libc.mount(None, p, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID)


def _mount_work(libc: _Libc, cfg: dict, uid: int | None) -> None:
    """A fresh tmpfs for one program, limited in size and inodes; unmounting it is its whole cleanup."""
    owner = f",uid={uid},gid={uid}" if uid is not None else ""
    opts = f"mode=700,size={cfg['disk_mb']}m,nr_inodes={cfg['inodes']}{owner}"
    libc.mount(b"tmpfs", WORK.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, opts.encode())


def _private_fs(libc: _Libc, init: dict) -> list[str]:
    """The file system of a slot: the minimal root, else (it failed before pivoting) the host's root
    read-only except the slot's dir, else nothing; returns what was reached."""
    try:
        return _min_root(libc, init["root"], init["site"], init["packages"]) + ["tmpfs"]
    except OSError:
        if _STATE.get("pivoted"):  # failed after leaving the host's tree: no way back to it
            return []
    try:
        libc.umount(init["root"].encode())
    except OSError:
        pass
    try:
        return _lock_fs(libc, init["root"], init["uid"])
    except OSError:
        return []


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


def _excerpt(e: BaseException, limit: int = 1500, name: str = "<program>") -> bytes:
    """The part of a traceback in `name` (the program's, or the test's in the judge), short."""
    try:
        import linecache
        import traceback

        src = _STATE["sources"][name]
        linecache.cache[name] = (len(src), None, src.splitlines(True), name)
        te = traceback.TracebackException(type(e), e, e.__traceback__)
        te.stack = traceback.StackSummary.from_list([f for f in te.stack if f.filename == name][-4:])
        text = "".join(te.format())
    except BaseException:  # noqa: BLE001 - a hostile __str__ must not take the child's verdict with it
        text = type(e).__name__
    return text[-limit:].encode("utf-8", "backslashreplace")


def _place(fds: list[int]) -> None:
    """Make `fds` the process's fds 0, 1, ... and close every other one (the report pipe, the config)."""
    import fcntl

    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 1000) for fd in fds]  # out of the way of the targets first
    for target, fd in enumerate(high):
        os.dup2(fd, target)
    os.closerange(len(fds), 1 << 20)


def _enter_child(cfg: dict, fds: list[int], libc: _Libc) -> None:
    """In the forked test child, before any program code: the process the program gets."""
    import resource

    os.setsid()
    _place(fds)  # 0 stdin, 1 stdout, 2 stderr, 3 verdict (judged: 3 calls, 4 replies), then the flags file
    cpu = max(1, math.ceil(cfg["timeout"]))  # RLIMIT_CPU counts whole seconds
    for res, v in (
        (resource.RLIMIT_AS, cfg["memory_mb"] << 20),
        (resource.RLIMIT_CPU, cpu),
        (resource.RLIMIT_FSIZE, cfg["fsize_mb"] << 20),
        (resource.RLIMIT_NOFILE, cfg["nofile"]),
        (resource.RLIMIT_NPROC, cfg["nproc"]),
        (resource.RLIMIT_CORE, 0),
    ):
        hard = resource.getrlimit(res)[1]
        if hard != resource.RLIM_INFINITY:  # may only go down
            v = min(v, hard)
        hi = v + 1 if res == resource.RLIMIT_CPU and (hard == resource.RLIM_INFINITY or v < hard) else v
        resource.setrlimit(res, (v, hi))  # CPU: SIGXCPU at the soft limit, SIGKILL a second later
    os.chdir(cfg["work"])
    os.environ.update(HOME=cfg["work"], TMPDIR=cfg["work"])
    os.umask(0o077)
    try:
        with open("/proc/self/oom_score_adj", "w") as f:  # the slot's OOM killer takes the program first
            f.write("1000")
    except OSError:  # not root and not dumpable: /proc/self is not ours to write
        pass
    if _STATE["uid"] is not None:
        os.setgroups([])
        os.setgid(_STATE["uid"])
        os.setuid(_STATE["uid"])
    libc.prctl(_PR_SET_NO_NEW_PRIVS, 1)  # no setuid binaries to climb back with
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # set after setuid, which clears it
    if _STATE.get("seccomp"):
        _seccomp(libc, _STATE["seccomp"])
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sys.stdin = sys.__stdin__ = open(0, encoding="utf-8", closefd=False)
    sys.stdout = sys.__stdout__ = open(1, "w", encoding="utf-8", closefd=False)
    sys.stderr = sys.__stderr__ = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False, buffering=1)
    _STATE["streams"] = (sys.stdout, sys.stderr)  # flushed at the end even if the program swaps them
    sys.argv = ["main.py"]
    sys.path.extend(cfg["site"])
    _STATE.update(
        flags_fd=len(fds) - 1,
        flagged=set(),
        armed=False,
        readable=[cfg["work"]] + [p for p in sys.path if p] + list(_READABLE),
    )
    sys.addaudithook(_audit)
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
        _STATE["armed"] = True  # from here on, the program's doing
        if mode == "functional":
            exec(code, ns)
            cls = cfg["solution_class"]  # decided on the text, as LiveCodeBench does
            target = ns[cls]() if cls and f"class {cls}" in cfg["code"] else None
            fn = getattr(target, cfg["fn_name"]) if target is not None else ns[cfg["fn_name"]]
            value = fn(*test)
            _note_custom_eq(value)
            value = list(value) if isinstance(value, tuple) else value  # as LCB: tuples count as lists
            verdict = b"=" + repr(value).encode("utf-8", "backslashreplace")
        elif cfg["judge"]:
            exec(code, ns)
            _serve(ns, cfg["calls"])  # returns when the judge is done; the verdict is the judge's
            _exit(0)
        else:
            try:
                exec(code, ns)
            except SystemExit:
                if mode == "script":  # a script that exits has not run its tests to the end
                    raise
            verdict = nonce
    except BaseException as e:  # noqa: BLE001 - everything the program raises is a verdict
        _STATE["armed"] = False
        if isinstance(e, SystemExit) and mode != "stdin":
            _flag(EXITS)
        verdict = (b"failed\n" if isinstance(e, AssertionError) else b"error\n") + _excerpt(e)
        if cfg["judge"]:  # tell the judge why there is nothing to call
            _send(4, json.dumps(["died", verdict.decode("utf-8", "replace")]))
            _exit(0)
    _STATE["armed"] = False
    for stream in (sys.stdout, sys.stderr) + _STATE["streams"]:
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001
            pass
    try:
        while verdict:
            verdict = verdict[_write(3, verdict) :]
    finally:
        _exit(0)


# ---------------------------------------------------------------- the judge: the tests, apart from the program


class _ProgramEnded(BaseException):
    """The program's process ended before the tests did (a BaseException: no test's `except` keeps it)."""


class NotJudgeable(BaseException):
    """The program answered a call with something that is not a plain value: an error verdict (a
    BaseException, so that no `except Exception` of a test turns it into a pass)."""


def _send(fd: int, text: str) -> None:
    data = text.encode()
    data = len(data).to_bytes(4, "little") + data
    while data:
        data = data[os.write(fd, data) :]


def _recv(fd: int, limit: int = 1 << 28) -> str | None:
    """One message; None at EOF or when the length says more than `limit` bytes."""
    head = _read_exact(fd, 4)
    n = int.from_bytes(head, "little") if len(head) == 4 else -1
    if not 0 <= n <= limit:
        return None
    data = _read_exact(fd, n)
    return data.decode("utf-8", "surrogatepass") if len(data) == n else None


def _serve(ns: dict, names: list[str]) -> None:
    """In the program's process, after its code ran: call the functions the judge asks for, with the plain
    arguments it sends, and answer each call with the plain value returned and the arguments after the
    call (in-place changes), or the exception raised. Returns at EOF: the judge is done."""
    _send(4, json.dumps(["ready"]))
    while (text := _recv(3)) is not None:
        name, args, kwargs = json.loads(text)
        args, kwargs = _dec(args, 0), _dec(kwargs, 0)
        flags: set = set()
        try:
            if name not in names or name not in ns:
                raise NameError(f"name {name!r} is not defined")
            value = ns[name](*args, **kwargs)
            budget = [PLAIN_ITEMS]
            reply = ["ok", _enc(value, 0, budget, flags), _enc(args, 0, budget, flags)]
        except NotPlain as e:
            reply = ["bad", str(e)]
        except SystemExit:
            _send(4, json.dumps(["exit"]))
            raise
        except BaseException as e:  # noqa: BLE001 - the judge re-raises it in the test
            reply = ["raise", type(e).__name__, _text(e)[:1000]]
        _send(4, json.dumps(reply + [sorted(flags)], ensure_ascii=True))


def _stub(name: str, flags: set) -> object:
    """In the judge: a function standing for the program's `name`; arguments go to the program's process
    as plain values, the plain value that comes back is returned (in-place changes copied back)."""
    import builtins

    def call(*args: object, **kwargs: object) -> object:
        _send(3, json.dumps([name, _enc(list(args), 0, [PLAIN_ITEMS], set()), _enc(kwargs, 0, [PLAIN_ITEMS], set())]))
        reply = _reply()
        flags.update(str(f)[:40] for f in reply[-1][:8])
        if reply[0] == "ok":
            try:
                value, after = _dec(reply[1], 0), _dec(reply[2], 0)
                if type(after) is not list:
                    raise TypeError
            except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError, OverflowError):
                raise NotJudgeable(f"the program's {name}() answered with something else than plain values") from None
            for a, b in zip(args, after):
                _copy_back(a, b)
            return value
        if reply[0] == "raise":
            cls = getattr(builtins, str(reply[1]), None)
            if not (isinstance(cls, type) and issubclass(cls, Exception)):
                cls, reply[2] = RuntimeError, f"{reply[1]}: {reply[2]}"
            raise cls(f"{reply[2]} (raised by the program)")
        raise NotJudgeable(f"the program's {name}() {reply[1]}")

    call.__name__ = call.__qualname__ = name
    return call


def _reply() -> list:
    """The program's next answer, checked for shape; _ProgramEnded when it is gone or speaks nonsense."""
    text = _recv(4)
    if text is None:
        raise _ProgramEnded("")
    try:
        reply = json.loads(text)
        ok = isinstance(reply, list) and reply and reply[0] in ("ok", "raise", "bad", "died", "exit", "ready")
    except (ValueError, RecursionError):
        ok = False
    if not ok:
        raise _ProgramEnded("the program's process answered with something else than a reply")
    if reply[0] in ("died", "exit"):
        raise _ProgramEnded(str(reply[1]) if reply[0] == "died" and len(reply) > 1 else "")
    if reply[0] != "ready" and (len(reply) < 3 or not isinstance(reply[-1], list)):
        raise _ProgramEnded("the program's process answered with a malformed reply")
    return reply


def _copy_back(a: object, b: object) -> None:
    """What the program did to a mutable argument, done to the test's own object (tests that check
    in-place changes)."""
    if type(a) is list and type(b) is list or type(a) is bytearray and type(b) is bytearray:
        a[:] = b  # type: ignore[index]
    elif type(a) is type(b) and type(a) in (dict, set):
        a.clear()  # type: ignore[attr-defined]
        a.update(b)  # type: ignore[attr-defined]


def _run_judge(head: object, test: object, names: list[str]) -> None:
    """In the judge process (root in the namespaces, never given the program's code): run the test code
    with each name in `names` bound to a stub of the program's function; write the verdict as JSON on
    fd 5. Never returns."""
    import builtins

    flags: set = set()
    out: dict = {"status": "ok"}
    try:
        _reply()  # "ready": the program's code ran
        ns = {"__name__": "__judge__", "__builtins__": builtins}
        if head is not None:
            exec(head, ns)
        ns.update({n: _stub(n, flags) for n in names})
        exec(test, ns)
    except _ProgramEnded as e:
        died = str(e)
        status = died.split("\n", 1)[0] if died.startswith(("failed\n", "error\n")) else "exited"
        out = {"status": status, "err": died.split("\n", 1)[-1] if status != "exited" else died}
    except BaseException as e:  # noqa: BLE001 - a failing assert, or whatever the test raised
        status = "failed" if isinstance(e, AssertionError) else "error"
        out = {"status": status, "err": _excerpt(e, name="<test>").decode("utf-8", "replace")}
    out["flags"] = sorted(flags)
    try:
        data = json.dumps(out).encode()
        while data:
            data = data[os.write(5, data) :]
    finally:
        os._exit(0)


def _enter_judge(cfg: dict, fds: list[int]) -> None:
    """In the forked judge, before the test code: /dev/null for 0-2, the pipes as 3-5, rlimits."""
    import random
    import resource

    null = os.open(os.devnull, os.O_RDWR)
    _place([null, null, null] + fds)
    cfg.pop("code", None)  # the judge never holds the program
    _STATE.get("sources", {}).pop("<program>", None)
    cpu = max(1, math.ceil(cfg["timeout"]))
    for res, v in ((resource.RLIMIT_AS, cfg["memory_mb"] << 20), (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_CORE, 0)):
        hard = resource.getrlimit(res)[1]
        resource.setrlimit(res, (v if hard == resource.RLIM_INFINITY else min(v, hard), hard))
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    random.seed()


def _collect(
    pid: int, fds: list[int], deadline: float, cap: int, other: int | None = None
) -> tuple[list[bytearray], str | None, int, int | None]:
    """Read the child's stdout, stderr and verdict pipes until it exits, times out or floods them;
    kill it (and `other`, the program's process when `pid` is its judge) and everything they started;
    return (contents, why stopped early, wait status, wait status of `other`)."""
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
    other_status = _end(other) if other else None
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
    return [bufs[fd] for fd in fds], why, status, other_status


def _end(pid: int) -> int:
    """The wait status of a child: as it ended by itself, else as killed now."""
    done, st = os.waitpid(pid, os.WNOHANG)
    if done:
        return st
    os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)[1]


def _run_judged(cfg: dict, code: object, prelude: object, judge: tuple, libc: _Libc) -> dict:
    """A program whose tests run in a separate judge process: the program's child serves calls, the judge
    (a fork of the harness, holding the test code) replays the test against the plain values it gets
    back and alone decides. Returns the report for the parent."""
    (calls_r, calls_w), (rep_r, rep_w), (out_r, out_w), (err_r, err_w), (ver_r, ver_w) = [os.pipe() for _ in range(5)]
    null, flags = os.open(os.devnull, os.O_RDONLY), os.memfd_create("flags")
    t0 = time.monotonic()
    pid = _fork_child(
        cfg, [null, out_w, err_w, calls_r, rep_w, flags], libc, lambda: _run_program(cfg, code, prelude, None, b"")
    )
    _STATE["child"] = pid
    jpid = os.fork()
    if jpid == 0:
        try:
            _enter_judge(cfg, [calls_w, rep_r, ver_w])
            _run_judge(*judge)
        finally:
            os._exit(70)
    for fd in (null, calls_r, calls_w, rep_r, rep_w, out_w, err_w, ver_w):
        os.close(fd)
    (_, e, v), why, st, pst = _collect(jpid, [out_r, err_r, ver_r], t0 + cfg["wall"], cfg["caps"][0], pid)
    for fd in (out_r, err_r, ver_r):
        os.close(fd)
    rep = {"t": TEST, "i": 0, "dt": round(time.monotonic() - t0, 4)}
    try:
        got = json.loads(bytes(v))
    except ValueError:
        got = {}
    errtail = e[-1500:].decode("utf-8", "replace")
    cpu = any(s is not None and os.WIFSIGNALED(s) and os.WTERMSIG(s) == signal.SIGXCPU for s in (st, pst))
    if why:
        rep.update(status=why, err=(f"wall-clock limit ({cfg['wall']:g} s)\n" if why == "timeout" else "") + errtail)
    elif cpu:
        rep.update(status="timeout", err=f"CPU time limit ({math.ceil(cfg['timeout'])} s)")
    elif got.get("status") in ("ok", "failed", "error"):
        rep.update(status=got["status"], err=got.get("err", ""))
    else:
        how = f"exit code {os.WEXITSTATUS(pst)}" if os.WIFEXITED(pst) else f"signal {os.WTERMSIG(pst)}"
        why_ = got.get("err") or ""
        rep.update(status="exited", err=f"the program ended ({how}) before the tests finished\n{why_}{errtail}")
    seen = set(_flags_of(flags)) | {f for f in got.get("flags", []) if f in SUSPICIOUS}
    rep["flags"] = sorted(seen | ({EXITS} if rep["status"] == "exited" else set()))
    return rep


def _fork_child(cfg: dict, fds: list[int], libc: _Libc, run: object) -> int:
    """Fork the program's child: `_enter_child` with `fds` as its 0.., then `run()`; never returns there."""
    pid = os.fork()
    if pid == 0:
        _exit = os._exit
        try:
            _enter_child(cfg, fds, libc)
            run()  # type: ignore[operator]
        except BaseException as e:  # noqa: BLE001 - setup failed: say why, never return into the harness
            os.write(2, f"sandbox child setup failed: {e!r}\n".encode())
        finally:
            _exit(70)
    return pid


def _run_test(cfg: dict, i: int, code: object, prelude: object, libc: _Libc) -> dict:
    """One test in a fresh child; returns the report for the parent."""
    test = cfg["tests"][i]
    if cfg["mode"] == "stdin":
        stdin = os.memfd_create("stdin")
        data = test.encode()
        while data:
            data = data[os.write(stdin, data) :]
        os.lseek(stdin, 0, os.SEEK_SET)
    else:
        stdin = os.open(os.devnull, os.O_RDONLY)
    pipes = [os.pipe() for _ in range(3)]  # stdout, stderr, verdict
    flags = os.memfd_create("flags")
    nonce = os.urandom(16).hex().encode()  # in-process scripts: proof that the program and its tests ended
    t0 = time.monotonic()
    pid = _fork_child(
        cfg, [stdin] + [w for _, w in pipes] + [flags], libc, lambda: _run_program(cfg, code, prelude, test, nonce)
    )
    _STATE["child"] = pid
    os.close(stdin)
    for _, w in pipes:
        os.close(w)
    (out, err, verdict), why, st, _ = _collect(pid, [r for r, _ in pipes], t0 + cfg["wall"], cfg["caps"][i])
    for r, _ in pipes:
        os.close(r)
    rep = {"t": TEST, "i": i, "dt": round(time.monotonic() - t0, 4)}
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
        how = f"exit code {os.WEXITSTATUS(st)}" if os.WIFEXITED(st) else f"signal {os.WTERMSIG(st)}"
        rep.update(status="exited", err=f"ended ({how}) before the tests finished\n{errtail}")
    early = rep["status"] == "exited" and cfg["mode"] != "stdin"
    rep["flags"] = sorted(set(_flags_of(flags)) | ({EXITS} if early else set()))
    return rep


def _program(cfg: dict, libc: _Libc) -> None:
    """Run one program's tests, each in a fresh child; stop at the first test that is not ok, or when
    the parent (which alone knows the expected outputs) says a test's output was wrong."""
    import gc

    try:
        with _memory_bound(cfg["memory_mb"]):
            source = assemble(cfg["code"], cfg["head"], cfg["tail"], cfg["complete"])
            code = compile(source, "<program>", "exec", dont_inherit=True)
    except BaseException as e:  # noqa: BLE001 - SyntaxError, ValueError (NUL bytes), MemoryError, RecursionError ...
        _report(t=TEST, i=0, status="error", err=_why(e), dt=0.0)
        return
    _STATE["sources"] = {"<program>": source, "<test>": cfg["judge"]}
    prelude = compile(cfg["prelude"], "<prelude>", "exec", dont_inherit=True) if cfg["prelude"] else None
    n = len(cfg["tests"])
    gc.freeze()  # children's collections skip our objects: fewer copy-on-write page faults after fork
    try:
        if cfg["judge"]:
            head = compile(cfg["judge_head"], "<head>", "exec", dont_inherit=True) if cfg["judge_head"] else None
            test = compile(cfg["judge"], "<test>", "exec", dont_inherit=True)
            _report(**_run_judged(cfg, code, prelude, (head, test, cfg["calls"]), libc))
            return
        for i in range(n):
            rep = _run_test(cfg, i, code, prelude, libc)
            if rep["status"] == "ok" and cfg["expect"] and not _judge_value(cfg, rep):
                return  # the parent is gone
            _report(**rep)
            ok, rep = rep["status"] == "ok", None  # what this test returned is gone before the next forks
            if not ok or (i < n - 1 and _read_exact(0, 1) != GO_ON):
                return
    finally:
        gc.unfreeze()


def _text(e: BaseException) -> str:
    try:
        return str(e)
    except BaseException:  # noqa: BLE001 - a hostile __str__
        return ""


def _why(e: BaseException) -> str:
    try:
        return (f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)[:1500]
    except BaseException:  # noqa: BLE001 - str() of a MemoryError's context may fail again
        return type(e).__name__


def _judge_value(cfg: dict, rep: dict) -> bool:
    """Functional mode: now that the test's processes are gone, ask the parent for the expected value and
    judge the returned one against it (the program never holds an expected value). False at EOF."""
    _report(t=EXPECT, i=rep["i"])
    expected = read_msg(0)
    if not isinstance(expected, str):
        return False
    try:
        with _memory_bound(cfg["memory_mb"]):
            why = value_equal(rep["out"], expected)
    except BaseException as e:  # noqa: BLE001 - expected values that are not JSON: the caller's mistake
        rep.update(status="sandbox_error", err=f"test {rep['i']}: expected value: {_why(e)}")
        return True
    if why:
        rep.update(status="failed", err=f"test {rep['i']}: {why}")
    return True


def _harness(init: dict, feats: list[str], libc: _Libc, is_init: bool) -> None:
    """Serve programs one at a time: a fresh work dir (and SysV IPC namespace) for each, everything the
    program started killed after each test, the dir removed, then a "done" report. Runs no program code."""
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
    if init["isolate"] and _seccomp_works(libc):
        _STATE["seccomp"] = seccomp_filter(os.uname().machine)
        feats.append("seccomp")
    _report(t=HELLO, isolation="+".join(feats) or "rlimits-only", cgroup=_STATE.get("cgroup", ""))
    count, tmpfs = 0, "tmpfs" in feats
    while (cfg := read_msg(0)) is not None:
        count += 1
        if not root:  # RLIMIT_NPROC counts every task of this user: leave the program its share on top
            cfg["nproc"] += _user_tasks(os.getuid())
        work = WORK if tmpfs else os.path.join(init["root"], f"p{count}")
        try:
            if tmpfs:
                _mount_work(libc, cfg, uid)
            else:
                os.mkdir(work, 0o700)
                if uid is not None:
                    os.chown(work, uid, uid)
            cfg.update(work=work, site=init["site"])
            _program(cfg, libc)
        finally:
            gone = _drop_work(libc, work, tmpfs)
            if ipc:
                libc.unshare(_CLONE_NEWIPC)  # SysV objects of this program go now, with its namespace
            _report(t=DONE, **({} if gone else {"err": f"cleanup: could not remove the program's dir {work}"}))


def _drop_work(libc: _Libc, work: str, tmpfs: bool) -> bool:
    """Remove a program's dir once its processes are gone: unmount its tmpfs (all of it goes at once, however
    deep), or remove the dir without recursion."""
    if not tmpfs:
        return remove_tree(work)
    try:
        libc.umount(WORK.encode())
        return True
    except OSError as e:
        return e.errno == 22  # EINVAL: nothing mounted (mounting it failed): nothing to remove


def _main() -> None:
    """A sandbox server (a fresh fork of the zygote): fd 0 brings programs, fd 2 takes reports."""
    init = read_msg(0)
    if init is None:
        os._exit(0)
    libc = _STATE.get("libc") or _Libc()
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1)
    _STATE["cgroup"] = _join_cgroup(init.get("cgroup") or [])
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
            feats += _private_fs(libc, init)
            _harness(init, feats, libc, is_init=True)
        except BaseException:  # noqa: BLE001 - report, the parent calls it a sandbox error
            import traceback

            traceback.print_exc()
        finally:
            _exit(0)
    signal.signal(signal.SIGTERM, lambda *_: os.kill(pid, signal.SIGKILL))
    os.waitpid(pid, 0)
    os._exit(0)


def _join_cgroup(procs: list[str]) -> str:
    """Move this server (and so all it starts) into the slot's cgroup. Returns "" or why it could not."""
    try:
        for f in procs:
            with open(f, "w") as fh:
                fh.write("0")
    except OSError as e:
        return f"none (joining: {e.strerror})"
    return ""


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

    for m in PRELOAD:
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


if __name__ == CHILD_NAME:  # run by BOOT in the fresh interpreter; never on import
    _zygote(int(sys.argv[1]))
