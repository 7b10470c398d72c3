"""Issue 18 on the real server (uvicorn on 127.0.0.1, an ephemeral port): API keys, request
limits at their boundary and one past it, slow clients, logs without content, and a bounded
Hypothesis fuzz. Every request loop is bounded in count and time."""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'bsbr-export[serve]')")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from test_serve import MODEL, ROOT, TIMEOUT, Running, _free_port, export_dir  # noqa: F401 (fixture)

from bsbr_export.errors import InputError
from bsbr_export.serve.app import ServeConfig, server_of
from bsbr_export.serve.security import check_exposure, collect_keys, is_loopback, key_ok

KEYS = ("sk-test-alpha-7f3a", "sk-test-beta-91c2")
PROMPT_SECRET = "zebra quasar marmalade"


def wait_idle(s: Running, seconds: float = 20.0) -> None:
    """Rows all free and no tokens in flight (bounded wait)."""
    srv, end = server_of(s.app), time.monotonic() + seconds
    while (s.sched.free_rows() != s.sched.max_batch or srv.in_flight) and time.monotonic() < end:
        time.sleep(0.05)
    assert s.sched.free_rows() == s.sched.max_batch and srv.in_flight == 0


def slow_decode(srv, seconds: float):
    """Each decode step of ``srv``'s engine takes ``seconds`` longer; returns the real decode."""
    real = srv.engine.decode

    def slow(*a, **k):
        time.sleep(seconds)
        return real(*a, **k)

    srv.engine.decode = slow
    return real


def err(r, status, code=None, param=None):
    assert r.status_code == status, (r.status_code, r.text[:300])
    e = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"}
    if code is not None:
        assert e["code"] == code, e
    if param is not None:
        assert e["param"] == param, e
    return e


# --------------------------------------------------------------------------- keys

@pytest.fixture(scope="module")
def keyed(export_dir):
    s = Running(export_dir, max_batch=2, max_queue=8, api_keys=KEYS)
    yield s
    s.stop()


ENDPOINTS = [("GET", "/v1/models", None), ("GET", "/metrics", None),
             ("POST", "/v1/completions", {"model": MODEL, "prompt": "def f(", "max_tokens": 2, "temperature": 0}),
             ("GET", "/nowhere", None)]


@pytest.mark.parametrize("method,path,body", ENDPOINTS)
def test_every_endpoint_needs_the_key(keyed, caplog, method, path, body):
    caplog.set_level(logging.INFO)
    url = keyed.url + path
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer " + KEYS[0] + "x"},
                    {"Authorization": "Basic " + KEYS[0]}, {"Authorization": KEYS[0]}, {"Authorization": "Bearer"}):
        r = httpx.request(method, url, json=body, headers=headers, timeout=TIMEOUT)
        e = err(r, 401, "invalid_api_key")
        assert e["type"] == "authentication_error" and KEYS[0] not in r.text
    for key in KEYS:
        r = httpx.request(method, url, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=TIMEOUT)
        assert r.status_code == (404 if path == "/nowhere" else 200), r.text[:300]
    for key in KEYS:
        assert key not in caplog.text


def test_health_is_open(keyed):
    assert httpx.get(keyed.url + "/health", timeout=TIMEOUT).status_code == 200


def test_key_sources(tmp_path):
    f = tmp_path / "keys"
    f.write_text("# comment\n\nk-file-1\n  k-file-2  \n")
    assert collect_keys(("k-opt",), f, env={"BSBR_API_KEY": "k-env"}) == ("k-opt", "k-file-1", "k-file-2", "k-env")
    assert collect_keys((), None, env={}) == ()
    (tmp_path / "empty").write_text("# none\n")
    with pytest.raises(InputError, match="holds no key"):
        collect_keys((), tmp_path / "empty", env={})
    with pytest.raises(InputError, match="cannot read"):
        collect_keys((), tmp_path / "missing", env={})
    assert key_ok("Bearer a", ("b", "a")) and key_ok("bearer a", ("a",)) and not key_ok("Bearer", ("a",))
    assert not key_ok(None, ("a",)) and not key_ok("Bearer ", ("",))
    assert all(map(is_loopback, ("127.0.0.1", "::1", "localhost", "127.5.5.5", "[::1]")))
    assert not any(map(is_loopback, ("0.0.0.0", "::", "10.0.0.1", "example.org")))
    check_exposure("127.0.0.1", (), False)
    check_exposure("0.0.0.0", ("k",), False)
    check_exposure("0.0.0.0", (), True)
    with pytest.raises(InputError, match="refusing to listen on 0.0.0.0"):
        check_exposure("0.0.0.0", (), False)
    assert "k-opt" not in repr(ServeConfig("x", api_keys=("k-opt",)))


def test_run_refuses_before_binding(export_dir, monkeypatch):
    import uvicorn

    from bsbr_export.serve import app as app_mod

    def no(*a, **k):
        raise AssertionError("uvicorn was started")

    monkeypatch.setattr(uvicorn, "Server", no)
    monkeypatch.setattr(app_mod, "create_app", no)
    with pytest.raises(InputError, match="refusing to listen on 0.0.0.0"):
        app_mod.run(ServeConfig(str(export_dir)), host="0.0.0.0", port=0)


def test_cli_refuses_0000_without_a_key_in_one_line(export_dir):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "BSBR_API_KEY"}
    r = subprocess.run([sys.executable, "-m", "bsbr_export.cli", "serve", str(export_dir), "--host", "0.0.0.0",
                        "--port", str(port)], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0 and "refusing to listen" in r.stderr, r.stderr
    assert "--insecure" in r.stderr
    with socket.socket() as sock:  # nothing was left listening there
        sock.settimeout(2)
        assert sock.connect_ex(("127.0.0.1", port)) != 0


# --------------------------------------------------------------------------- limits

LIM = dict(max_body_bytes=2000, max_prompt_tokens=20, max_tokens_cap=8, max_prompts=3, max_tokens_in_flight=60,
           receive_timeout_s=2.0)


@pytest.fixture(scope="module")
def limited(export_dir):
    s = Running(export_dir, max_batch=4, max_queue=8, **LIM)
    yield s
    s.stop()


def body_of(**kw):
    return {"model": MODEL, "prompt": [1] * 4, "max_tokens": 2, "temperature": 0, **kw}


def padded(body: dict, size: int) -> bytes:
    raw = json.dumps(body).encode()
    assert len(raw) <= size
    return raw[:-1] + b" " * (size - len(raw)) + b"}"


def test_body_bytes_at_and_past_the_limit(limited):
    limit = LIM["max_body_bytes"]
    assert limited.post(padded(body_of(), limit)).status_code == 200
    err(limited.post(padded(body_of(), limit + 1)), 413, "request_too_large", "max_body_bytes")

    def chunks(raw):  # no Content-Length: counted as it streams
        for i in range(0, len(raw), 500):
            yield raw[i:i + 500]

    r = httpx.post(limited.url + "/v1/completions", content=chunks(padded(body_of(), limit)), timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    r = httpx.post(limited.url + "/v1/completions", content=chunks(padded(body_of(), limit + 1)), timeout=TIMEOUT)
    err(r, 413, "request_too_large", "max_body_bytes")
    wait_idle(limited)


@pytest.mark.parametrize("length", [b"10000000000", b"9" * 5000])
def test_huge_content_length_is_refused_before_the_body(limited, length):
    """A 10 GB Content-Length gets 413 at once: the server answers without reading a byte of it."""
    with socket.create_connection(("127.0.0.1", int(limited.url.rsplit(":", 1)[1])), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + length + b"\r\n\r\n")
        t0, data = time.monotonic(), b""
        while b"\r\n\r\n" not in data and time.monotonic() - t0 < 10:
            part = sock.recv(4096)
            if not part:
                break
            data += part
    # 5000 digits: uvicorn's parser may refuse the header itself (400) before the app sees it
    assert data.startswith(b"HTTP/1.1 413" if len(length) < 20 else (b"HTTP/1.1 413", b"HTTP/1.1 400")), data[:200]
    assert time.monotonic() - t0 < LIM["receive_timeout_s"]


@pytest.mark.parametrize("field,ok,past,status,param", [
    ("prompt", [1] * 20, [1] * 21, 400, "prompt"),
    ("prompt", [[1] * 4] * 3, [[1] * 4] * 4, 400, "prompt"),
    ("max_tokens", 8, 9, 400, "max_tokens"),
])
def test_limits_at_and_past(limited, field, ok, past, status, param):
    r = limited.post(body_of(**{field: ok}))
    assert r.status_code == 200, r.text
    e = err(limited.post(body_of(**{field: past})), status, param=param)
    assert "--max-" in e["message"]
    wait_idle(limited)


def test_text_prompt_token_limit(limited):
    e = err(limited.post(body_of(prompt="word " * 200)), 400, "prompt_too_long", "prompt")
    assert "--max-prompt-tokens 20" in e["message"]


def test_tokens_in_flight_at_and_past(limited):
    # 3 prompts x (12 + 8) = 60 = the limit; 3 x (13 + 8) = 63 is past it: it could never fit,
    # so 400 (no Retry-After: a retry would never succeed); 429 is for requests that fit alone
    # (test_tokens_in_flight_counts_running_requests)
    r = limited.post(body_of(prompt=[[1] * 12] * 3, max_tokens=8))
    assert r.status_code == 200, r.text
    r = limited.post(body_of(prompt=[[1] * 13] * 3, max_tokens=8))
    e = err(r, 400, "tokens_in_flight_exceeded", "max_tokens")
    assert "--max-tokens-in-flight 60" in e["message"] and "Retry-After" not in r.headers
    wait_idle(limited)


def test_tokens_in_flight_counts_running_requests(export_dir):
    s = Running(export_dir, max_batch=2, max_queue=4, max_tokens_in_flight=100)
    srv = server_of(s.app)
    real = slow_decode(srv, 0.02)
    try:
        big = body_of(prompt=[1] * 10, max_tokens=80, ignore_eos=True)  # 90 tokens in flight
        t = threading.Thread(target=lambda: s.post(big))
        t.start()
        end = time.monotonic() + 20
        while srv.in_flight == 0 and time.monotonic() < end:
            time.sleep(0.01)
        assert srv.in_flight == 90
        err(s.post(body_of(prompt=[1] * 9, max_tokens=2)), 429, "tokens_in_flight")  # 11 more: past 100
        assert s.post(body_of(prompt=[1] * 8, max_tokens=2)).status_code == 200  # 10 more: at 100
        t.join(TIMEOUT)
        wait_idle(s)
    finally:
        s.stop()


def test_request_timeout_cancels_and_frees_the_row(export_dir):
    s = Running(export_dir, max_batch=2, max_queue=4, request_timeout_s=1.0)
    srv = server_of(s.app)
    real = slow_decode(srv, 0.05)
    try:
        body = body_of(prompt="def f(", max_tokens=200, ignore_eos=True)
        t0 = time.monotonic()
        err(s.post(body), 408, "request_timeout", "request_timeout")
        assert time.monotonic() - t0 < 5
        wait_idle(s)
        with httpx.stream("POST", s.url + "/v1/completions", json={**body, "stream": True}, timeout=TIMEOUT) as r:
            lines = [x for x in r.iter_lines() if x]
        assert r.status_code == 200 and "request_timeout" in lines[-1]
        wait_idle(s)
        srv.engine.decode = real
        assert s.post(body_of()).status_code == 200
    finally:
        s.stop()


def test_mixed_burst_with_disconnects_leaks_nothing(export_dir):
    """Requests at and past the limits, streams and clients that give up mid-generation, all at
    once: only 200/400/429 (or the client's own timeout), and afterwards every row and every
    in-flight token is free."""
    import asyncio

    s = Running(export_dir, max_batch=2, max_queue=2, max_tokens_in_flight=400, max_tokens_cap=40,
                request_timeout_s=3.0)
    real = slow_decode(server_of(s.app), 0.01)
    bodies = [body_of(prompt=[1] * 10, max_tokens=40, ignore_eos=True, stream=bool(i % 2)) for i in range(8)]
    bodies += [body_of(max_tokens=41), body_of(prompt=[[1] * 30] * 3, max_tokens=40)]

    async def one(ac, body, timeout):
        try:
            r = await ac.post(s.url + "/v1/completions", json=body, timeout=timeout)
            return r.status_code
        except httpx.TimeoutException:
            return "gave up"

    async def burst():
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=32)) as ac:
            return await asyncio.wait_for(asyncio.gather(
                *(one(ac, b, 0.3 if i % 3 == 0 else TIMEOUT) for i, b in enumerate(bodies * 2))), 60)

    try:
        codes = asyncio.run(burst())
        print(f"[burst] {codes}")
        assert set(codes) <= {200, 400, 429, 408, "gave up"} and 400 in codes and 200 in codes
        wait_idle(s)
        server_of(s.app).engine.decode = real
        assert s.post(body_of()).status_code == 200
    finally:
        s.stop()


# --------------------------------------------------------------------------- slow clients

def test_slow_body_is_cut_off_while_others_complete(limited):
    port = int(limited.url.rsplit(":", 1)[1])
    result = {}

    def slowloris():
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"model\"")
            t0, data = time.monotonic(), b""
            sock.settimeout(0.3)
            while time.monotonic() - t0 < 15:
                if time.monotonic() - t0 < LIM["receive_timeout_s"] / 2:  # a byte every 0.3 s, then nothing
                    sock.sendall(b" ")
                try:
                    part = sock.recv(4096)
                except socket.timeout:
                    continue
                except OSError:  # reset after the answer: closed too
                    part = b""
                if not part:  # closed by the server
                    result["closed"] = True
                    break
                data += part
            result["data"], result["t"] = data, time.monotonic() - t0

    t = threading.Thread(target=slowloris)
    t.start()
    codes = [limited.post(body_of()).status_code for _ in range(3)]  # others are served meanwhile
    t.join(30)
    assert codes == [200] * 3
    assert result["data"].startswith(b"HTTP/1.1 408"), result
    assert b"receive_timeout" in result["data"] and result.get("closed"), result
    assert result["t"] < LIM["receive_timeout_s"] + 5
    assert httpx.get(limited.url + "/health", timeout=TIMEOUT).status_code == 200


@pytest.fixture(scope="module")
def headed(export_dir):
    """The server with the uvicorn options ``run`` uses (the header timeout), 1.5 s."""
    import test_serve

    from bsbr_export.serve.app import uvicorn_options

    real = test_serve.uvicorn.Config
    test_serve.uvicorn.Config = lambda app, **kw: real(app, **{**kw, **uvicorn_options(app.state.config)})
    try:
        s = Running(export_dir, max_batch=2, max_queue=4, header_timeout_s=1.5)
    finally:
        test_serve.uvicorn.Config = real
    yield s
    s.stop()


def trickle(url: str, first: bytes, seconds: float = 15.0) -> tuple[bytes, float]:
    """Send ``first``, then one header byte every 0.3 s until the server closes (bounded)."""
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=10) as sock:
        sock.sendall(first)
        sock.settimeout(0.3)
        t0, data = time.monotonic(), b""
        while time.monotonic() - t0 < seconds:
            try:
                sock.sendall(b"X")
                part = sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                break
            if not part:
                break
            data += part
        return data, time.monotonic() - t0


@pytest.mark.parametrize("keep_alive", [False, True])
def test_slow_headers_are_cut_off_while_others_complete(headed, keep_alive):
    get = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
    first = (get if keep_alive else b"") + b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow: "
    result = {}
    t = threading.Thread(target=lambda: result.update(out=trickle(headed.url, first)))
    t.start()
    codes = [httpx.get(headed.url + "/v1/models", timeout=TIMEOUT).status_code for _ in range(3)]
    t.join(30)
    data, took = result["out"]
    assert codes == [200] * 3
    assert took < 1.5 + 3, took  # closed by the header timeout, not the 15 s bound
    assert data.count(b"HTTP/1.1 200") == (1 if keep_alive else 0), data[:300]


# --------------------------------------------------------------------------- logs

def test_log_has_counts_not_content(limited, caplog):
    caplog.set_level(logging.INFO, logger="bsbr_export.serve")
    r = limited.post(body_of(prompt=PROMPT_SECRET, max_tokens=4))
    assert r.status_code == 200
    completion = r.json()["choices"][0]["text"]
    lines = [x.getMessage() for x in caplog.records if x.name == "bsbr_export.serve"]
    line = next(x for x in lines if x.startswith("POST /v1/completions 200"))
    assert "ms" in line and "prompt_tokens=" in line and "completion_tokens=" in line
    assert PROMPT_SECRET not in caplog.text
    assert not completion.strip() or completion not in caplog.text


def test_log_content_when_asked(export_dir, caplog):
    s = Running(export_dir, max_batch=1, max_queue=2, log_content=True)
    try:
        caplog.set_level(logging.INFO, logger="bsbr_export.serve")
        assert s.post(body_of(prompt=PROMPT_SECRET)).status_code == 200
        assert PROMPT_SECRET in caplog.text
    finally:
        s.stop()


def test_cli_tls_key_and_log_line(export_dir, tmp_path):
    """The command over HTTPS (a self-signed certificate) with a key file: the key is needed, and
    its log has one line per request with counts, no prompt and no key."""
    import signal

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out",
                    str(cert)], check=True, capture_output=True, timeout=60)
    (tmp_path / "keys").write_text(KEYS[1] + "\n")
    import ssl

    port, ctx = _free_port(), ssl.create_default_context(cafile=str(cert))
    url = f"https://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "BSBR_API_KEY"}
    proc = subprocess.Popen([sys.executable, "-m", "bsbr_export.cli", "serve", str(export_dir), "--port", str(port),
                             "--max-batch", "1", "--threads", "1", "--model-name", MODEL, "--api-key-file",
                             str(tmp_path / "keys"), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**env, "PYTHONUNBUFFERED": "1"})
    try:
        for _ in range(300):  # up to about 60 s
            assert proc.poll() is None, "server exited"
            try:
                up = httpx.get(url + "/health", timeout=2, verify=ctx).status_code == 200
            except httpx.TransportError:
                up = False
            if up:
                break
            time.sleep(0.2)
        assert up, "server did not start"
        with httpx.Client(verify=ctx, timeout=TIMEOUT) as c:
            assert c.get(url + "/v1/models").status_code == 401
            auth = {"Authorization": "Bearer " + KEYS[1]}
            assert c.get(url + "/v1/models", headers=auth).status_code == 200
            r = c.post(url + "/v1/completions", headers=auth, json=body_of(prompt=PROMPT_SECRET, max_tokens=3))
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.poll() is None and proc.kill()
        log = proc.communicate(timeout=10)[0]
    assert "GET /v1/models 401" in log and "GET /v1/models 200" in log, log[-2000:]
    assert "POST /v1/completions 200" in log and "prompt_tokens=" in log
    assert PROMPT_SECRET not in log and KEYS[1] not in log


def test_ray_serve_takes_the_same_keys(export_dir, monkeypatch):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'bsbr-export[ray]')")
    serve = pytest.importorskip("ray.serve")
    from bsbr_export.serve.ray_app import build

    port = _free_port()
    monkeypatch.setenv("BSBR_API_KEY", KEYS[1])  # read on the driver, as with the command
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2 ** 20, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build({"export_dir": str(export_dir), "model_name": MODEL, "max_batch": "2", "api_key": KEYS[0],
                         "max_tokens_cap": "8"}), name="bsbr", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(url + "/health", timeout=TIMEOUT).status_code == 200
        for headers, want in (({}, 401), ({"Authorization": "Bearer wrong"}, 401),
                              ({"Authorization": "Bearer " + KEYS[0]}, 200), ({"Authorization": "Bearer " + KEYS[1]}, 200)):
            assert httpx.get(url + "/v1/models", headers=headers, timeout=TIMEOUT).status_code == want
        r = httpx.post(url + "/v1/completions", json=body_of(max_tokens=9), timeout=TIMEOUT,
                       headers={"Authorization": "Bearer " + KEYS[0]})
        err(r, 400, "max_tokens_too_large", "max_tokens")
    finally:
        serve.shutdown()
        ray.shutdown()


# --------------------------------------------------------------------------- fuzz

hyp = pytest.importorskip("hypothesis")
st = pytest.importorskip("hypothesis.strategies")

FUZZ_SEED = int(os.environ.get("BSBR_FUZZ_SEED", random.randrange(2 ** 32)))
FUZZ_EXAMPLES = int(os.environ.get("BSBR_FUZZ_EXAMPLES", "60"))
FUZZ_SECONDS = 120.0


def _ints_around(*edges):
    return st.one_of(st.sampled_from([e + d for e in edges for d in (-1, 0, 1)]),
                     st.integers(-(2 ** 70), 2 ** 70))


_scalar = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=False), _ints_around(0, 1), st.text(max_size=20))
_fields = {
    "model": st.one_of(st.just(MODEL), st.text(max_size=10)),
    "prompt": st.one_of(st.text(max_size=120), st.lists(_ints_around(0, 50257), max_size=24),
                        st.lists(st.lists(st.integers(0, 300), min_size=0, max_size=22), max_size=5),
                        st.lists(st.text(max_size=8), max_size=5), _scalar),
    "max_tokens": st.one_of(_ints_around(0, LIM["max_tokens_cap"]), _scalar),
    "temperature": st.one_of(st.floats(-1, 3, allow_nan=False), _scalar),
    "top_p": st.one_of(st.floats(0, 1.5), _scalar), "top_k": st.one_of(_ints_around(1, 50257), _scalar),
    "seed": st.one_of(_ints_around(0, 2 ** 63), _scalar), "stream": st.booleans(),
    "stop": st.one_of(st.text(max_size=4), st.lists(st.text(max_size=3), max_size=6), _scalar),
    "logprobs": st.one_of(_ints_around(0, 5), _scalar), "echo": st.booleans(), "ignore_eos": st.booleans(),
    "presence_penalty": st.one_of(st.floats(-3, 3), _scalar), "repetition_penalty": st.one_of(st.floats(-1, 3), _scalar),
    "n": _scalar, "unknown_field": _scalar,
}
_body = st.fixed_dictionaries({}, optional=_fields)
_served = st.fixed_dictionaries({"model": st.just(MODEL), "prompt": _fields["prompt"]},
                                optional={k: v for k, v in _fields.items() if k not in ("model", "prompt", "n",
                                                                                         "unknown_field")})
_deep = st.fixed_dictionaries(  # mostly valid: reaches the token, in-flight and scheduler paths
    {"model": st.sampled_from([MODEL, MODEL, "other"]),
     "prompt": st.one_of(st.text(max_size=60), st.lists(st.integers(0, 300), min_size=1, max_size=21),
                         st.lists(st.lists(st.integers(0, 300), min_size=1, max_size=21), min_size=1, max_size=4)),
     "max_tokens": st.integers(0, LIM["max_tokens_cap"] + 1)},
    optional={"stream": st.booleans(), "echo": st.booleans(), "ignore_eos": st.booleans(),
              "temperature": st.floats(0, 2), "seed": st.integers(0, 2 ** 63 - 1), "top_k": st.integers(1, 60000),
              "logprobs": st.integers(0, 6), "stop": st.lists(st.text(min_size=1, max_size=3), max_size=4),
              "frequency_penalty": st.floats(-2, 2), "repetition_penalty": st.floats(0.5, 2)})
_at_limit = st.tuples(_served, st.integers(-1, 1)).map(  # padded to the body limit -1, 0, +1
    lambda t: json.dumps(t[0]).encode() + b" " * max(0, LIM["max_body_bytes"] + t[1] - len(json.dumps(t[0]))))
_raw = st.one_of(_body.map(lambda b: json.dumps(b).encode()), _served.map(lambda b: json.dumps(b).encode()),
                 _deep.map(lambda b: json.dumps(b).encode()), _deep.map(lambda b: json.dumps(b).encode()), _at_limit, st.binary(max_size=3000),
                 st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")),
                 _body.map(lambda b: json.dumps(b).encode("utf-16")))
_headers = st.fixed_dictionaries({}, optional={
    "Content-Type": st.sampled_from(["application/json", "text/plain", "application/json; charset=latin-1", ""]),
    "Authorization": st.one_of(st.just("Bearer " + KEYS[0]), st.text(alphabet=st.characters(min_codepoint=32,
                                                                                            max_codepoint=126),
                                                                      max_size=40)),
})


def test_fuzz_no_5xx_and_nothing_leaks(export_dir):
    print(f"[fuzz] seed {FUZZ_SEED} (replay: BSBR_FUZZ_SEED={FUZZ_SEED}), {FUZZ_EXAMPLES} examples")
    s = Running(export_dir, max_batch=2, max_queue=4, api_keys=(KEYS[0],), request_timeout_s=20.0, **LIM)
    t_end = time.monotonic() + FUZZ_SECONDS
    seen = []
    try:
        with httpx.Client(timeout=TIMEOUT) as client:
            @hyp.seed(FUZZ_SEED)
            @hyp.settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=False,
                          suppress_health_check=list(hyp.HealthCheck))
            @hyp.given(raw=_raw, headers=_headers, path=st.sampled_from(["/v1/completions", "/v1/models", "/health"]))
            def check(raw, headers, path):
                if time.monotonic() > t_end:  # the fixed budget in seconds
                    return
                headers = {"Authorization": "Bearer " + KEYS[0], **headers}
                try:
                    r = client.post(s.url + path, content=raw, headers=headers) if path == "/v1/completions" else \
                        client.get(s.url + path, headers=headers)
                except httpx.LocalProtocolError:  # a header the client itself will not send
                    hyp.assume(False)
                seen.append(r.status_code)
                assert r.status_code < 500, (r.status_code, r.text[:300], raw[:300])
                if r.status_code >= 400 and r.headers.get("content-type", "").startswith("application/json"):
                    assert set(r.json()["error"]) == {"message", "type", "param", "code"}

            check()
        print(f"[fuzz] {len(seen)} requests, statuses {sorted(set(seen))}")
        assert httpx.get(s.url + "/health", timeout=TIMEOUT).status_code == 200
        wait_idle(s)
        assert s.sched.alive
    finally:
        s.stop()
