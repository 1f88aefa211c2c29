"""Client of an OpenAI-compatible completion server (vLLM's `api_server`, started by `run_inference.sh serve`).

Standard library only (urllib and a thread pool), so that btp talks to a local, remote or load-balanced server
without extra packages. Transient failures (connection refused or reset, timeouts, HTTP 5xx and 429) are retried
with exponential backoff; a server that stays away is one user error naming the URL and what to do. The
generation stage (`btp.generate --backend server`) owns what is asked; this module only how it is asked.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .store import UserError

T = TypeVar("T")
R = TypeVar("R")
BACKOFF_CAP = 30.0  # seconds: the longest wait between two tries
# what a dying, restarting or overloaded server answers with; anything else (4xx) is the request's fault
TRANSIENT_ERRORS = (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout, http.client.HTTPException)


class ServerGone(UserError):
    """The server did not answer after every retry."""


def root_url(url: str) -> str:
    """`http://host:8000/v1/` -> `http://host:8000`: the server's root (health and version live there)."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise UserError(f"--base-url {url!r} is no http(s) URL — give e.g. http://localhost:8000")
    return url[: -len("/v1")] if url.endswith("/v1") else url


@dataclass
class Client:
    """JSON over HTTP to one server root, with retries: `retries` more tries after the first, waiting
    `backoff`, 2x, 4x ... seconds (capped at BACKOFF_CAP)."""

    base_url: str
    retries: int = 5
    backoff: float = 1.0
    timeout: float = 600.0
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)

    def __post_init__(self) -> None:
        self.base_url = root_url(self.base_url)

    def request(self, path: str, body: dict | None = None) -> Any:
        """GET (no body) or POST `body` to `path`; the decoded JSON answer."""
        url = self.base_url + path
        data = None if body is None else json.dumps(body).encode()
        last: object = None
        for attempt in range(self.retries + 1):
            if attempt:
                self.sleep(min(self.backoff * 2 ** (attempt - 1), BACKOFF_CAP))
            req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    raw = r.read()
            except urllib.error.HTTPError as e:
                if e.code < 500 and e.code != 429:
                    msg = f"{url} refused the request: HTTP {e.code} {_detail(e)} — check the flags"
                    raise UserError(msg) from None
                last = f"HTTP {e.code} {_detail(e)}"
                continue
            except TRANSIENT_ERRORS as e:
                last = getattr(e, "reason", None) or e
                continue
            try:
                return json.loads(raw) if raw.strip() else None
            except ValueError:
                raise UserError(f"{url} answered with something other than JSON — check --base-url") from None
        raise ServerGone(
            f"server {self.base_url} did not answer {path} after {self.retries + 1} tries ({last}) — start it "
            "(./run_inference.sh serve MODEL --port N) or fix --base-url, then rerun to resume"
        )

    def get(self, path: str) -> Any:
        return self.request(path)

    def post(self, path: str, body: dict) -> Any:
        return self.request(path, body)


def _detail(e: urllib.error.HTTPError) -> str:
    try:
        body = e.read().decode(errors="replace")
        msg = json.loads(body)
        msg = msg.get("error", msg) if isinstance(msg, dict) else msg
        msg = msg.get("message", msg) if isinstance(msg, dict) else msg
        return " ".join(str(msg).split())[:300]
    except Exception:  # noqa: BLE001 - a detail is only a courtesy
        return e.reason or ""


def bounded_map(fn: Callable[[T], R], items: Iterable[T], limit: int) -> Iterator[tuple[T, R]]:
    """(item, fn(item)) in the order they finish, with at most `limit` calls running at once. The first error
    stops submitting: what finished before it has been yielded, calls still running are awaited, then it is
    raised."""
    if limit < 1:
        raise UserError(f"--max-concurrency {limit} — give 1 or more")
    todo = iter(items)
    with ThreadPoolExecutor(max_workers=limit) as pool:
        running = {}
        for it in todo:
            running[pool.submit(fn, it)] = it
            if len(running) >= limit:
                break
        error: BaseException | None = None
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in done:
                it = running.pop(f)
                if f.exception() is not None:
                    error = error or f.exception()
                    continue
                yield it, f.result()
                if error is None:
                    nxt = next(todo, _END)
                    if nxt is not _END:
                        running[pool.submit(fn, nxt)] = nxt
        if error is not None:
            raise error


_END = object()
