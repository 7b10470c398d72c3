"""Defects of the server and runtime, each triggered as a client (or a failing engine) would:
the server stays up under each trigger, and other streams keep receiving tokens where a trigger
could stall them. Servers listen on 127.0.0.1; every loop is bounded in count and time."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'bsbr-export[serve]')")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from test_serve_security import slow_decode  # noqa: E402
from test_serve import MAX_LEN, MODEL, TIMEOUT, Running, _prompt, assert_same, export_dir, oracle  # noqa: F401

from bsbr_export.runtime.engine import Engine
from bsbr_export.runtime.text import MAX_STOP_CHARS, Tokenizer
from bsbr_export.serve.app import server_of
from bsbr_export.serve.scheduler import ENGINE_ERROR, GenRequest, Scheduler, ShuttingDown

DEADLINE = 60.0
SECRET = "secret-path /opt/ort/internal.cc:123"  # what a failing engine call says; never to a client


def wait_for(cond, seconds: float = 20.0, what: str = "condition"):
    end = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.01)


class Faulty:
    """An ``Engine`` whose calls raise when ``fail[name](*args)`` says so (``RuntimeError(SECRET)``)."""

    def __init__(self, eng):
        self.eng, self.fail, self.calls = eng, {}, {"extend": 0, "decode": 0, "reset_rows": 0}

    def __getattr__(self, name):
        return getattr(self.eng, name)

    def _call(self, name, *args):
        self.calls[name] += 1
        check = self.fail.get(name)
        if check is not None and check(*args):
            raise RuntimeError(SECRET)
        return getattr(self.eng, name)(*args)

    def extend(self, *a):
        return self._call("extend", *a)

    def decode(self, *a):
        return self._call("decode", *a)

    def reset_rows(self, *a):
        return self._call("reset_rows", *a)


class Log:
    """A request's events: tokens, finish reason and error; ``done`` once it ends."""

    def __init__(self):
        self.tokens, self.reason, self.error, self.done = [], None, None, threading.Event()

    def __call__(self, ev):
        if ev.finish_reason is None:
            self.tokens.append(ev.token)
        else:
            self.reason, self.error = ev.finish_reason, ev.error
            self.done.set()


@pytest.fixture(scope="module")
def engine(export_dir):
    return Engine(export_dir, threads=1)


@pytest.fixture(scope="module")
def tok(export_dir):
    return Tokenizer.from_dir(export_dir)


def _sched(engine, tok, **kw):
    return Scheduler(Faulty(engine), tok, max_batch=kw.pop("max_batch", 2), max_queue=4, prefill_chunk=64, **kw)


# --------------------------------------------------------------------------- the scheduler's loop

def test_exceptions_outside_engine_calls_do_not_kill_the_loop(engine, tok, heldout_ids, oracle, caplog):
    """metrics.sample raising, reset_rows raising at admission and while a failed row is freed:
    the loop goes on; the request whose admission failed ends with the generic error; the next
    ones complete with their lone output."""
    caplog.set_level(logging.ERROR, "bsbr_export.serve")

    class BadMetrics:
        def __init__(self):
            self.raised = 0

        def __getattr__(self, name):
            return lambda *a, **k: None

        def sample(self, sched):
            if self.raised < 3:
                self.raised += 1
                raise ValueError("metrics backend down")

    metrics = BadMetrics()
    sched = _sched(engine, tok, metrics=metrics)
    eng = sched.engine
    try:
        ids = np.array(_prompt(heldout_ids, 12, 1))
        first = Log()
        sched.submit(GenRequest(ids, 6, first))
        assert first.done.wait(DEADLINE) and first.reason in ("length", "stop")
        assert metrics.raised == 3 and sched.alive
        # reset_rows fails when the next request is admitted
        eng.fail["reset_rows"] = lambda st, rows: len(rows) and eng.calls["reset_rows"] == resets + 1
        resets = eng.calls["reset_rows"]
        bad = Log()
        sched.submit(GenRequest(ids, 6, bad))
        assert bad.done.wait(DEADLINE)
        assert (bad.reason, bad.error) == ("error", ENGINE_ERROR) and SECRET not in bad.error
        # an extend that fails, then the reset_rows that frees its row fails too
        eng.fail["reset_rows"] = lambda st, rows: True
        eng.fail["extend"] = lambda st, rows, pieces: any(7 in p for p in pieces)
        poisoned = Log()
        sched.submit(GenRequest(np.array([7, 7, 7]), 4, poisoned))
        assert poisoned.done.wait(DEADLINE) and poisoned.reason == "error"
        eng.fail.clear()
        good = Log()
        sched.submit(GenRequest(ids, 6, good))
        assert good.done.wait(DEADLINE)
        assert_same(oracle, ids, 6, tok.decode(good.tokens), good.reason)
        assert sched.alive and sched.free_rows() == 2 and sched.reserved == 0
    finally:
        sched.stop(drain_s=5)
    assert SECRET in caplog.text and "metrics backend down" in caplog.text  # the server log has them


def test_engine_failure_ends_only_the_rows_it_touched(engine, tok, heldout_ids, oracle, caplog):
    """A failing prefill piece ends its own request, a failing decode step the decoding rows:
    a row the failed call did not touch goes on to its lone output; clients get a generic message."""
    caplog.set_level(logging.ERROR, "bsbr_export.serve")
    sched = _sched(engine, tok)
    eng = sched.engine
    try:
        run_ids = np.array(_prompt(heldout_ids, 10, 2))
        runner = Log()
        sched.submit(GenRequest(run_ids, 60, runner, stop_tokens=frozenset({tok.eos_token_id})))
        wait_for(lambda: len(runner.tokens) >= 3, what="the running stream")
        eng.fail["extend"] = lambda st, rows, pieces: any(7 in p for p in pieces)
        bad = Log()
        sched.submit(GenRequest(np.array([5, 7, 9]), 8, bad))
        assert bad.done.wait(DEADLINE) and runner.done.wait(DEADLINE)
        assert runner.reason != "error", "a row the failed call did not touch was ended"
        assert_same(oracle, run_ids, 60, tok.decode(runner.tokens), runner.reason)
        assert (bad.reason, bad.error) == ("error", ENGINE_ERROR)
        # a decode step fails while a long prompt is being prefilled in pieces: the decoding row
        # ends, the prefilling one does not
        eng.fail.clear()
        dec_ids, long_ids = np.array(_prompt(heldout_ids, 8, 3)), np.array(_prompt(heldout_ids, 300, 4))
        decoding, prefilling = Log(), Log()
        sched.submit(GenRequest(dec_ids, 200, decoding))
        wait_for(lambda: len(decoding.tokens) >= 2, what="the decoding row")
        long_req = GenRequest(long_ids, 8, prefilling)
        eng.fail["decode"] = lambda st, tokens, active: 0 < long_req.fed < len(long_ids)
        sched.submit(long_req)
        assert decoding.done.wait(DEADLINE) and prefilling.done.wait(DEADLINE)
        assert (decoding.reason, decoding.error) == ("error", ENGINE_ERROR)
        assert_same(oracle, long_ids, 8, tok.decode(prefilling.tokens), prefilling.reason)
        assert sched.alive and sched.free_rows() == 2
    finally:
        sched.stop(drain_s=5)
    assert SECRET in caplog.text


def test_capacity_plus_one_is_accepted(engine, tok, heldout_ids, oracle):
    """prompt + max_tokens = capacity + 1: the last token is never fed, so it fits."""
    sched = _sched(engine, tok)
    try:
        ids = np.array(_prompt(heldout_ids, MAX_LEN - 12, 5))
        log = Log()
        sched.submit(GenRequest(ids, 13, log))
        assert log.done.wait(DEADLINE)
        assert_same(oracle, ids, 13, tok.decode(log.tokens), log.reason, ignore_eos=True)
        assert len(log.tokens) == 13
        with pytest.raises(Exception, match="exceeds the export's maximum"):
            sched.submit(GenRequest(ids, 14, Log()))
    finally:
        sched.stop(drain_s=5)


# --------------------------------------------------------------------------- one server, default limits

@pytest.fixture(scope="module")
def server(export_dir):
    s = Running(export_dir, max_batch=4, max_queue=8, prefill_chunk=64, max_tokens_in_flight=4096,
                request_timeout_s=20.0)
    yield s
    s.stop()


def body_of(**kw):
    return {"model": MODEL, "temperature": 0, **kw}


class Stream:
    """A streaming request in a thread: the arrival time of each text chunk, then its text."""

    def __init__(self, url, **body):
        self.times, self.text, self.reason, self.error, self.failed = [], "", None, None, None
        self.body = body_of(stream=True, **body)
        self.thread = threading.Thread(target=self._run, args=(url,), daemon=True)
        self.thread.start()

    def _run(self, url):
        try:
            with httpx.stream("POST", url + "/v1/completions", json=self.body, timeout=TIMEOUT) as r:
                assert r.status_code == 200, r.read()
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        obj = json.loads(line[6:])
                        if "error" in obj:  # the stream ended with an error event
                            self.failed = obj["error"]
                            continue
                        ch = obj["choices"][0]
                        self.times.append(time.monotonic())
                        self.text += ch["text"]
                        self.reason = ch["finish_reason"] or self.reason
        except Exception as e:  # noqa: BLE001  (reported by join)
            self.error = e

    def join(self):
        self.thread.join(DEADLINE)
        assert not self.thread.is_alive() and self.error is None, self.error
        return self

    def gaps_between(self, t0, t1):
        """Gaps between consecutive chunks whose later chunk arrived in [t0, t1]."""
        return [b - a for a, b in zip(self.times, self.times[1:]) if t0 <= b <= t1]


def test_stop_strings_capped_and_other_streams_go_on(server, oracle, heldout_ids):
    """A stop string over the limit gets 400 (param stop); four at the limit run while another
    stream keeps receiving tokens, and both outputs equal their lone runs."""
    r = server.post(body_of(prompt="x", max_tokens=4, stop=["y" * (MAX_STOP_CHARS + 1)]))
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop", r.text
    r = server.post(body_of(prompt="x", max_tokens=4, stop=["y" * 20000] * 4))
    assert r.status_code == 400 and r.json()["error"]["code"] == "stop_too_long"
    ids = _prompt(heldout_ids, 10, 6)
    other = Stream(server.url, prompt=ids, max_tokens=150, ignore_eos=True)
    stops = [c * MAX_STOP_CHARS for c in "☃☂☀☁"]
    r = server.post(body_of(prompt=ids, max_tokens=150, ignore_eos=True, stop=stops))
    assert r.status_code == 200
    other.join()
    assert_same(oracle, ids, 150, r.json()["choices"][0]["text"], "length", ignore_eos=True)
    assert_same(oracle, ids, 150, other.text, other.reason, ignore_eos=True)
    assert len(other.times) >= 100 and max(other.gaps_between(0, float("inf"))) < 2.0
    assert server.sched.alive


def test_request_that_can_never_fit_gets_400(server):
    """16 prompts x max_tokens 400 under --max-tokens-in-flight 4096: 400, no Retry-After."""
    before = server.sched.steps.copy()
    r = server.post(body_of(prompt=["def f(x):"] * 16, max_tokens=400))
    assert r.status_code == 400, r.text
    e = r.json()["error"]
    assert e["code"] == "tokens_in_flight_exceeded" and "4096" in e["message"] and "Retry-After" not in r.headers
    assert server_of(server.app).in_flight == 0 and server.sched.steps == before
    r = server.post(body_of(prompt=["def f(x):"] * 2, max_tokens=4))  # one that fits still runs
    assert r.status_code == 200


def test_prompt_plus_max_tokens_capacity_plus_one_over_http(server, heldout_ids, oracle):
    ids = _prompt(heldout_ids, MAX_LEN - 20, 7)
    r = server.post(body_of(prompt=ids, max_tokens=21, ignore_eos=True))
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 21
    assert_same(oracle, ids, 21, r.json()["choices"][0]["text"], "length", ignore_eos=True)
    assert server.post(body_of(prompt=ids, max_tokens=22)).status_code == 400


def test_tokenization_and_echo_run_off_the_event_loop(server, heldout_ids):
    """The prompt's encoding and the echo's decoding run in a worker thread (never on the event
    loop), and a ~1 MB prompt does not pause a running stream for its tokenization."""
    srv = server_of(server.app)
    where, real = [], (srv.tokenizer.encode, srv.tokenizer.decode)

    def on_loop():
        try:
            asyncio.get_running_loop()
            return True
        except RuntimeError:
            return False

    def recorded(f):
        def g(*a, **k):
            where.append(on_loop())
            return f(*a, **k)
        return g

    srv.tokenizer.encode, srv.tokenizer.decode = recorded(real[0]), recorded(real[1])
    try:
        r = server.post(body_of(prompt="def parse(text):", max_tokens=2, echo=True))
        assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith("def parse(text):")
        assert len(where) >= 2 and not any(where), where
    finally:
        srv.tokenizer.encode, srv.tokenizer.decode = real
    text = ("def parse(self, text):\n    return [int(x) for x in text.split()]\n" * 16000)[:1_000_000]
    t0 = time.perf_counter()
    srv.tokenizer.encode(text)
    t_tok = time.perf_counter() - t0
    ids = _prompt(heldout_ids, 10, 8)
    runner = Stream(server.url, prompt=ids, max_tokens=400, ignore_eos=True)
    wait_for(lambda: len(runner.times) >= 5, what="the running stream")
    t_send = time.monotonic()
    r = server.post(body_of(prompt=text, max_tokens=1))
    t_back = time.monotonic()
    assert r.status_code == 400 and r.json()["error"]["code"] == "prompt_too_long"
    runner.join()
    gaps = runner.gaps_between(t_send, t_back + 0.1)
    print(f"[tokenize] 1 MB: {t_tok:.2f} s to encode, {t_back - t_send:.2f} s to answer; the stream's longest "
          f"gap meanwhile {max(gaps):.3f} s")
    assert gaps and max(gaps) < max(0.15, t_tok / 2), (t_tok, max(gaps))


# --------------------------------------------------------------------------- slow readers

async def _stalled(app, body: dict, bodies_before_stall: int, seconds: float):
    """Call the ASGI app as a client that stops reading after ``bodies_before_stall`` body
    messages (every later send blocks, as a full socket does); True if the app returned within
    ``seconds``. Returns (returned, body messages sent)."""
    data = json.dumps(body).encode()
    fed, sent = [False], []

    async def receive():
        if not fed[0]:
            fed[0] = True
            return {"type": "http.request", "body": data, "more_body": False}
        await asyncio.Event().wait()  # the client never disconnects

    async def send(msg):
        if msg["type"] == "http.response.body" and len(sent) >= bodies_before_stall:
            await asyncio.Event().wait()
        if msg["type"] == "http.response.body":
            sent.append(msg)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    task = asyncio.ensure_future(app(scope, receive, send))
    try:
        await asyncio.wait_for(asyncio.shield(task), seconds)
        return True, len(sent)
    except asyncio.TimeoutError:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return False, len(sent)


@pytest.fixture(scope="module")
def slow_server(export_dir):
    s = Running(export_dir, max_batch=4, max_queue=8, prefill_chunk=64, send_timeout_s=2.0, stream_buffer=16)
    yield s
    s.stop()


def test_stalled_reader_past_its_buffer_is_dropped_while_others_stream(slow_server, oracle, heldout_ids):
    """A streaming client that stops reading: once 16 token events wait for it, its generation is
    cancelled and its row freed (long before its 400 tokens), while another stream goes on to its
    lone output; the server stays up."""
    s, srv = slow_server, server_of(slow_server.app)
    real = slow_decode(srv, 0.01)
    try:
        cancelled = s.metric('bsbr_requests_finished_total{reason="cancelled"}')
        ids = _prompt(heldout_ids, 10, 9)
        other = Stream(s.url, prompt=ids, max_tokens=200, ignore_eos=True)
        body = body_of(prompt=_prompt(heldout_ids, 10, 10), max_tokens=400, ignore_eos=True, stream=True, logprobs=0)
        t0 = time.monotonic()

        async def stall_then_watch():
            task = asyncio.ensure_future(_stalled(s.app, body, 2, 30.0))
            end = time.monotonic() + 10
            while s.metric('bsbr_requests_finished_total{reason="cancelled"}') == cancelled:
                assert time.monotonic() < end, "the stalled request was not dropped"
                await asyncio.sleep(0.05)
            dropped = time.monotonic() - t0
            returned, n = await task  # the send timeout (2 s) then ends the response
            return dropped, returned, n

        dropped, returned, n = asyncio.run(stall_then_watch())
        print(f"[slow reader] dropped after {dropped:.2f} s, {n} bodies sent")
        assert returned and n == 2 and dropped < 10
        assert srv.scheduler.free_rows() >= 3
        other.join()
        assert_same(oracle, ids, 200, other.text, other.reason, ignore_eos=True)
        wait_for(lambda: srv.in_flight == 0 and srv.scheduler.free_rows() == 4, what="everything given back")
    finally:
        srv.engine.decode = real
    assert httpx.get(s.url + "/health", timeout=TIMEOUT).status_code == 200


def test_stalled_reader_is_timed_out_and_its_finished_generation_freed(slow_server):
    """A client that stops reading a short stream (its generation ends within the buffer): the
    response is dropped after --send-timeout (2 s) instead of waiting forever, and the tokens it
    held go back."""
    s, srv = slow_server, server_of(slow_server.app)
    body = body_of(prompt="def f(", max_tokens=10, ignore_eos=True, stream=True, logprobs=0)
    t0 = time.monotonic()
    returned, n = asyncio.run(_stalled(s.app, body, 1, 8.0))
    assert returned, "the stalled stream was never timed out"
    assert 1.5 < time.monotonic() - t0 < 8.0 and n == 1
    wait_for(lambda: srv.in_flight == 0 and srv.scheduler.free_rows() == 4, what="everything given back")
    assert httpx.get(s.url + "/health", timeout=TIMEOUT).status_code == 200


# --------------------------------------------------------------------------- a dead scheduler

def test_dead_scheduler_refuses_with_503_and_gives_tokens_back(export_dir, heldout_ids):
    """Should the loop thread die anyway (a BaseException): the request it held ends at once with
    a generic error, its tokens of --max-tokens-in-flight go back, and new requests get 503 (not
    accepted to wait for their timeout, nor 429 for a leaked budget)."""

    class Die(BaseException):
        pass

    s = Running(export_dir, max_batch=2, max_queue=4, max_tokens_in_flight=1000, request_timeout_s=30.0)
    srv = server_of(s.app)
    try:
        real = srv.metrics.sample
        runner = Stream(s.url, prompt=_prompt(heldout_ids, 10, 11), max_tokens=400, ignore_eos=True)
        wait_for(lambda: len(runner.times) >= 3, what="the stream")
        assert srv.in_flight == 410

        def die(sched):
            raise Die("the loop ends")

        srv.metrics.sample = die
        t0 = time.monotonic()
        runner.thread.join(DEADLINE)
        assert time.monotonic() - t0 < 10, "the held request waited for its timeout"
        assert not s.sched.alive and runner.error is None and runner.reason is None
        assert runner.failed["message"] == ENGINE_ERROR  # ended by an error event, a generic one
        wait_for(lambda: srv.in_flight == 0, 5, "the tokens in flight back")
        srv.metrics.sample = real
        r = s.post(body_of(prompt="def f(", max_tokens=5), timeout=10)
        assert r.status_code == 503, r.text
        with pytest.raises(ShuttingDown):
            s.sched.submit(GenRequest(np.array([1, 2]), 2, Log()))
        assert httpx.get(s.url + "/health", timeout=TIMEOUT).status_code == 503
        assert srv.in_flight == 0
    finally:
        s.stop()


# --------------------------------------------------------------------------- metrics and keys

KEYS = ("sk-plain-1", "clé-ключ-1")


@pytest.fixture(scope="module")
def keyed(export_dir):
    s = Running(export_dir, max_batch=2, max_queue=4, api_keys=KEYS, max_body_bytes=4000, receive_timeout_s=1.0)
    yield s
    s.stop()


def _auth(key=KEYS[0]):
    return {"Authorization": b"Bearer " + key.encode("utf-8")}


def test_non_ascii_api_key_sent_as_utf8(keyed):
    from bsbr_export.serve.security import key_ok

    wire = ("Bearer " + KEYS[1]).encode("utf-8")
    assert key_ok(wire.decode("latin-1"), KEYS) and key_ok(wire, KEYS)  # as an ASGI server hands it over
    assert not key_ok(("Bearer " + KEYS[1][:-1] + "2").encode("utf-8").decode("latin-1"), KEYS)
    for key in KEYS:
        r = httpx.get(keyed.url + "/v1/models", headers=_auth(key), timeout=TIMEOUT)
        assert r.status_code == 200, (key, r.text)
    r = httpx.get(keyed.url + "/v1/models", headers=_auth("clé-ключ-2"), timeout=TIMEOUT)
    assert r.status_code == 401


def _counts(s) -> dict:
    text = httpx.get(s.url + "/metrics", headers=_auth(), timeout=TIMEOUT).text
    out = {}
    for line in text.splitlines():
        if line.startswith(("bsbr_http_responses_total{", "bsbr_request_duration_seconds_count{")):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_metrics_count_every_status_and_latency(keyed):
    """One middleware counts every answer: the guard's 401, 413 and 408, the 200s of /health,
    /v1/models and /metrics, the routes' 400 and 200; and each one's latency."""
    import socket

    before = _counts(keyed)
    url = keyed.url
    assert httpx.get(url + "/health", timeout=TIMEOUT).status_code == 200
    assert httpx.get(url + "/v1/models", headers=_auth(), timeout=TIMEOUT).status_code == 200
    assert httpx.get(url + "/v1/models", timeout=TIMEOUT).status_code == 401
    assert httpx.post(url + "/v1/completions", content=b"x" * 5000, headers=_auth(), timeout=TIMEOUT).status_code == 413
    ok = httpx.post(url + "/v1/completions", json=body_of(prompt="def f(", max_tokens=2), headers=_auth(),
                    timeout=TIMEOUT)
    assert ok.status_code == 200
    assert httpx.post(url + "/v1/completions", json=body_of(prompt="", max_tokens=2), headers=_auth(),
                      timeout=TIMEOUT).status_code == 400
    host, port = url.rsplit("/", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:  # a body that never comes: 408
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEYS[0].encode()
                     + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        assert b" 408 " in sock.recv(4096).split(b"\r\n", 1)[0]
    after = _counts(keyed)

    def delta(name, code):
        key = f'{name}{{code="{code}"}}'
        return after.get(key, 0.0) - before.get(key, 0.0)

    # the first /metrics call (in ``before``) is counted once its answer has ended
    want = {"200": 4, "401": 1, "413": 1, "400": 1, "408": 1}
    for code, n in want.items():
        assert delta("bsbr_http_responses_total", code) == n, (code, before, after)
        assert delta("bsbr_request_duration_seconds_count", code) == n, code


# --------------------------------------------------------------------------- chunk size 1

@pytest.fixture(scope="module")
def export_l1(bundled_dir, tmp_path_factory):
    from bsbr_export.convert import convert, save_bsbr
    from bsbr_export.export import ExportSpec, export_onnx

    d = tmp_path_factory.mktemp("export_l1")
    model = convert(bundled_dir, chunk_size=1)
    save_bsbr(model, d / "bsbr", tokenizer_from=bundled_dir)
    export_onnx(model, d, ExportSpec(max_seq_len=64))
    return d


def test_chunk_size_1_paused_rows_keep_every_byte(export_l1, heldout_ids):
    """With L = 1 every position closes a chunk: rows outside ``active`` (mid-prefill, free) keep
    every byte of their state through decode steps, and a paused prompt resumes exactly as alone."""
    eng = Engine(export_l1, threads=1)
    ids = np.asarray(heldout_ids[:30], np.int64)
    st = eng.new_state(3)
    eng.extend(st, [0], [ids[:5]])
    eng.extend(st, [1], [ids[:10]])  # row 1 pauses mid-prompt; row 2 is free (position 0)
    snap = {n: [b[1:].copy() for b in bufs] for n, bufs in st.buf.items()}
    banks = {k: v.copy() for k, v in st.banks[1].items()}
    for i in range(4):
        eng.decode(st, np.array([ids[5 + i], 0, 0]), np.array([True, False, False]))
    for n, bufs in st.buf.items():
        for layer, (b, was) in enumerate(zip(bufs, snap[n])):
            assert np.array_equal(b[1:], was), f"{n} layer {layer} of a paused row changed"
    assert all(np.array_equal(st.banks[1][k], v) for k, v in banks.items())
    assert st.positions.tolist() == [9, 10, 0]
    resumed = eng.extend(st, [1], [ids[10:20]])[0]
    lone = eng.new_state(1)
    want = eng.extend(lone, [0], [ids[:20]])[0]
    np.testing.assert_allclose(resumed, want, atol=1e-4)
    for t in ids[20:25]:  # and decoding on
        got = eng.decode(st, np.array([0, t, 0]), np.array([False, True, False]))[1]
        np.testing.assert_allclose(got, eng.decode(lone, np.array([t]))[0], atol=1e-4)


# --------------------------------------------------------------------------- the serving benchmark

def test_bench_server_log_is_drained(export_dir):
    """A benchmark server that logs over 64 KiB (a line per request) keeps answering: its stderr
    pipe is read all along."""
    from bsbr_export.bench.serving import ServerProcess

    srv = ServerProcess(export_dir, max_batch=1, threads=1)
    try:
        with httpx.Client(timeout=5.0) as c:
            for _ in range(2500):  # ~55 bytes of log each: ~135 KiB
                assert c.get(srv.url + "/health").status_code == 200
        assert any("/health" in line for line in srv.log)
    finally:
        assert srv.stop() == 0


def test_bench_long_prompt_failure_is_reported(server):
    """The long-prompt test against a server that refuses the long prompt: a row with the error,
    no IndexError."""
    from bsbr_export.bench import serving as bench

    row = asyncio.run(bench.long_prompt_gap(server.url, [[1, 2, 3]] * 2, [5] * (MAX_LEN + 8), 2))
    assert row["max_gap_ms"] is None and row["long_ttft_s"] is None and "long request failed (HTTP 4" in row["error"]
