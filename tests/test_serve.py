"""``bsbr-export serve``: the real server (uvicorn on 127.0.0.1, an ephemeral port) spoken to with
the official ``openai`` client and raw HTTP (httpx).

The oracle of every greedy output is the ``Engine`` run on that request alone (one prompt, one
prefill, one token at a time); a step whose top two logits lie within ``TIE`` ends the
comparison of that request (batched and lone matmuls round differently). Every request loop is
bounded in count and in time (client timeouts, ``DEADLINE``).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'bsbr-export[serve]')")
openai = pytest.importorskip("openai", reason="the openai client is not installed (the test extra has it)")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from bsbr_export.errors import InputError
from bsbr_export.runtime.engine import Engine
from bsbr_export.runtime.text import Tokenizer
from bsbr_export.serve.app import ServeConfig, create_app, server_of

ROOT = Path(__file__).resolve().parents[1]
CHUNK, MAX_LEN = 32, 512  # a small export: many chunk closings, short prefills
TIE = 1e-4
MODEL = "pystdlib"
TIMEOUT = 60.0  # seconds any one request may take
DEADLINE = 90.0  # seconds any one loop of requests may take


@pytest.fixture(scope="module")
def export_dir(bundled_dir, tmp_path_factory):
    from bsbr_export.convert import convert, save_bsbr
    from bsbr_export.export import ExportSpec, export_onnx

    d = tmp_path_factory.mktemp("serve_export")
    model = convert(bundled_dir, chunk_size=CHUNK)
    save_bsbr(model, d / "bsbr", tokenizer_from=bundled_dir)
    export_onnx(model, d, ExportSpec(max_seq_len=MAX_LEN))
    return d


class Running:
    """A uvicorn server in a thread of this process (so tests can reach its scheduler)."""

    def __init__(self, export_dir, **options):
        self.app = create_app(ServeConfig(str(export_dir), model_name=MODEL, threads=1, **options))
        self.uv = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning",
                                                timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.uv.run, daemon=True)
        self.thread.start()
        end = time.monotonic() + 60
        while not self.uv.started:
            assert self.thread.is_alive() and time.monotonic() < end, "server did not start"
            time.sleep(0.05)
        port = self.uv.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.sched = server_of(self.app).scheduler

    def client(self):
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", timeout=TIMEOUT, max_retries=0)

    def aclient(self):
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key="none", timeout=TIMEOUT, max_retries=0)

    def post(self, body, timeout=TIMEOUT):
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return httpx.post(self.url + "/v1/completions", content=data, timeout=timeout,
                          headers={"Content-Type": "application/json"})

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics", timeout=TIMEOUT).text
        vals = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " ")
                or line.startswith(name + "{")]
        return sum(vals)

    def stop(self):
        self.uv.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def server(export_dir):
    s = Running(export_dir, max_batch=8, max_queue=64, prefill_chunk=64)
    yield s
    s.stop()
    assert not s.sched.alive


@pytest.fixture(scope="module")
def oracle(export_dir):
    """Greedy generation of one request alone on its own engine: (text, finish_reason, tokens, margins)."""
    eng, tok = Engine(export_dir, threads=1), Tokenizer.from_dir(export_dir)
    cache = {}

    def run(ids, max_tokens, stop_eos=True):
        key = (tuple(int(i) for i in ids), max_tokens, stop_eos)
        if key not in cache:
            st = eng.new_state(1)
            lg = eng.extend(st, [0], [np.asarray(ids, np.int64)])[0]
            toks, margins, reason = [], [], "length"
            while True:
                top2 = np.partition(lg, -2)[-2:]
                toks.append(int(lg.argmax()))
                margins.append(float(top2[1] - top2[0]))
                if stop_eos and toks[-1] == tok.eos_token_id:
                    reason = "stop"
                    break
                if len(toks) == max_tokens:
                    break
                lg = eng.decode(st, np.array(toks[-1:], np.int64))[0]
            cache[key] = (toks, margins, reason)
        toks, margins, reason = cache[key]
        return tok.decode(toks), reason, toks, margins

    run.tokenizer = tok
    return run


def assert_same(oracle, ids, max_tokens, text, reason, ignore_eos=False):
    """``text`` equals the lone greedy run, up to its first near-tie step."""
    want, want_reason, toks, margins = oracle(ids, max_tokens, stop_eos=not ignore_eos)
    tie = next((i for i, m in enumerate(margins) if m < TIE), None)
    if tie is None:
        assert (text, reason) == (want, want_reason)
    else:  # the tokens before the near-tie must agree
        prefix = oracle.tokenizer.decode(toks[:tie]).rstrip("\ufffd")
        assert text.startswith(prefix), (text, prefix)


def _prompt(heldout, n, seed):
    s = int(np.random.default_rng(seed).integers(0, len(heldout) - n))
    return [int(x) for x in heldout[s:s + n]]


# --------------------------------------------------------------------------- the API

def test_models_health_metrics(server):
    c = server.client()
    models = c.models.list()
    assert [m.id for m in models.data] == [MODEL]
    h = httpx.get(server.url + "/health", timeout=TIMEOUT)
    assert h.status_code == 200 and h.json()["status"] == "ok"
    text = httpx.get(server.url + "/metrics", timeout=TIMEOUT).text
    for name in ("bsbr_queue_depth", "bsbr_active_sequences", "bsbr_free_rows", "bsbr_generated_tokens_total",
                 "bsbr_time_to_first_token_seconds_bucket", "bsbr_time_per_output_token_seconds_bucket"):
        assert name in text, name
    assert server.metric("bsbr_free_rows") == server.sched.free_rows() == 8


def test_completion_with_the_openai_client(server, oracle):
    c = server.client()
    tok = oracle.tokenizer
    r = c.completions.create(model=MODEL, prompt="def parse(", max_tokens=24, temperature=0, logprobs=2)
    ids = tok.encode("def parse(")
    ch = r.choices[0]
    assert_same(oracle, ids, 24, ch.text, ch.finish_reason)
    assert r.object == "text_completion" and r.model == MODEL and r.id.startswith("cmpl-")
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == len(ch.logprobs.tokens) == len(ch.logprobs.token_logprobs)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert all(len(t) == 2 for t in ch.logprobs.top_logprobs)
    assert all(lp <= 0 for lp in ch.logprobs.token_logprobs)
    # greedy: the chosen token is the most likely one
    assert all(max(t.values()) == pytest.approx(lp) for t, lp in zip(ch.logprobs.top_logprobs,
                                                                       ch.logprobs.token_logprobs))
    # a list of prompts: one choice each, in order; token-id prompts; echo
    two = c.completions.create(model=MODEL, prompt=["def parse(", "import os\n"], max_tokens=8, temperature=0)
    assert [x.index for x in two.choices] == [0, 1]
    assert_same(oracle, tok.encode("import os\n"), 8, two.choices[1].text, two.choices[1].finish_reason)
    by_ids = c.completions.create(model=MODEL, prompt=ids, max_tokens=24, temperature=0, echo=True)
    assert by_ids.choices[0].text == "def parse(" + ch.text
    # stop strings cut the text before them
    first = ch.text[3:6]
    if first.strip():
        cut = c.completions.create(model=MODEL, prompt="def parse(", max_tokens=24, temperature=0, stop=[first])
        assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == ch.text[:ch.text.find(first)]
    zero = c.completions.create(model=MODEL, prompt="x", max_tokens=0, echo=True)
    assert zero.choices[0].text == "x" and zero.usage.completion_tokens == 0


def test_streaming_equals_non_streaming(server):
    c = server.client()
    args = dict(model=MODEL, prompt="import sys\n", max_tokens=40, temperature=0)
    whole = c.completions.create(**args, extra_body={"ignore_eos": True})
    pieces, reasons, usage = [], [], None
    for chunk in c.completions.create(**args, stream=True, stream_options={"include_usage": True},
                                      extra_body={"ignore_eos": True}):
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
            reasons.append(chunk.choices[0].finish_reason)
        else:
            usage = chunk.usage
    assert "".join(pieces) == whole.choices[0].text
    assert reasons[-1] == "length" and set(reasons[:-1]) == {None}
    assert usage.completion_tokens == 40 == whole.usage.completion_tokens
    # raw SSE: every event a data line, the last one [DONE]
    with httpx.stream("POST", server.url + "/v1/completions", timeout=TIMEOUT,
                      json={**args, "ignore_eos": True, "stream": True, "max_tokens": 4}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"


def test_seeded_sampling_does_not_depend_on_the_batch(server):
    c = server.client()
    args = dict(model=MODEL, prompt="class ", max_tokens=24, temperature=0.9, top_p=0.95, seed=11,
                extra_body={"top_k": 40, "ignore_eos": True}, presence_penalty=0.5, frequency_penalty=0.3)
    alone = c.completions.create(**args).choices[0].text

    async def crowd():
        ac = server.aclient()
        others = [ac.completions.create(model=MODEL, prompt=f"x = {i}", max_tokens=30, temperature=1.0, seed=i)
                  for i in range(6)]
        res = await asyncio.wait_for(asyncio.gather(ac.completions.create(**args), *others), DEADLINE)
        await ac.close()
        return res[0].choices[0].text

    assert asyncio.run(crowd()) == alone
    again = c.completions.create(**{**args, "seed": 12}).choices[0].text
    assert again != alone


BAD = [
    (b"{", 400, None),
    (b"[1, 2]", 400, None),
    (b"", 400, None),
    ({"model": MODEL}, 400, "prompt"),
    ({"model": MODEL, "prompt": "x", "foo": 1}, 400, "foo"),
    ({"model": MODEL, "prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"model": MODEL, "prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"model": MODEL, "prompt": 5}, 400, "prompt"),
    ({"model": MODEL, "prompt": [[1, -2]]}, 400, "prompt"),
    ({"model": MODEL, "prompt": [10 ** 9]}, 400, "prompt"),
    ({"model": MODEL, "prompt": ""}, 400, "prompt"),
    ({"model": MODEL, "prompt": []}, 400, "prompt"),
    ({"model": MODEL, "prompt": "x", "n": 0}, 400, "n"),
    ({"model": MODEL, "prompt": "x", "n": 2, "best_of": 1}, 400, "best_of"),
    ({"model": MODEL, "prompt": "x", "best_of": 3, "stream": True}, 400, "best_of"),
    ({"model": MODEL, "prompt": "x", "suffix": "y"}, 400, "suffix"),
    ({"model": MODEL, "prompt": "x", "logit_bias": {"x5": 1.0}}, 400, "logit_bias"),
    ({"model": MODEL, "prompt": "x", "logit_bias": {"-1": 1.0}}, 400, "logit_bias"),
    ({"model": MODEL, "prompt": "x", "logit_bias": {"8192": 1.0}}, 400, "logit_bias"),
    ({"model": MODEL, "prompt": "x", "logit_bias": {"5": 100.5}}, 400, "logit_bias"),
    ({"model": MODEL, "prompt": "x", "logit_bias": {"5": "1"}}, 400, "logit_bias.5"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 4, "min_tokens": 5}, 400, "min_tokens"),
    ({"model": MODEL, "prompt": "x", "stream": True, "stream_options": {"include_usage": True, "x": 1}}, 400,
     "stream_options.x"),
    ({"model": MODEL, "prompt": "x", "logprobs": 6}, 400, "logprobs"),
    ({"model": MODEL, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": MODEL, "prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": MODEL, "prompt": "x", "max_tokens": MAX_LEN + 1}, 400, "max_tokens"),  # the last token is not fed
    ({"model": MODEL, "prompt": [1] * (MAX_LEN - 3), "max_tokens": 5}, 400, "max_tokens"),
    ({"model": "gpt-4", "prompt": "x"}, 404, "model"),
]


@pytest.mark.parametrize("body,status,param", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_requests_get_openai_errors(server, body, status, param):
    before = server.sched.steps.copy()
    r = server.post(body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    assert server.sched.steps == before  # refused before any model work


def test_other_http_errors_are_openai_style(server):
    for method, path, status in (("GET", "/v1/completions", 405), ("GET", "/v2/nothing", 404),
                                 ("POST", "/v1/models", 405)):
        r = httpx.request(method, server.url + path, timeout=TIMEOUT)
        assert r.status_code == status and "error" in r.json()
    r = httpx.post(server.url + "/v1/completions", content=b"\xff\xfe", timeout=TIMEOUT)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


# --------------------------------------------------------------------------- continuous batching

def test_load_32_clients_4_requests_each_equal_alone(server, oracle, heldout_ids):
    """32 concurrent clients x 4 requests (mixed prompt lengths and max_tokens, some streamed):
    no 5xx, and every greedy output equals the same request alone."""
    rng = np.random.default_rng(5)
    specs = [(_prompt(heldout_ids, int(n), k), int(m)) for k, (n, m) in
             enumerate(zip(rng.choice([1, 7, 31, 32, 33, 90, 200, 300], 24), rng.choice([1, 5, 17, 40, 64], 24)))]
    plan = [[specs[int(j)] for j in rng.integers(0, len(specs), 4)] for _ in range(32)]
    http_5xx_before = sum(server.metric(f'bsbr_http_responses_total{{code="{c}"}}') for c in (500, 503))

    async def one_client(k, reqs):
        ac = server.aclient()
        out = []
        try:
            for q, (ids, m) in enumerate(reqs):
                if (k + q) % 4 == 0:
                    text, reason = "", None
                    async for ch in await ac.completions.create(model=MODEL, prompt=ids, max_tokens=m,
                                                                temperature=0, stream=True):
                        text += ch.choices[0].text
                        reason = ch.choices[0].finish_reason or reason
                else:
                    r = await ac.completions.create(model=MODEL, prompt=ids, max_tokens=m, temperature=0)
                    text, reason = r.choices[0].text, r.choices[0].finish_reason
                out.append((ids, m, text, reason))
        finally:
            await ac.close()
        return out

    async def all_clients():
        return await asyncio.wait_for(asyncio.gather(*(one_client(k, p) for k, p in enumerate(plan))), DEADLINE)

    t0 = time.monotonic()
    results = asyncio.run(all_clients())  # any error (a 5xx included) raises here
    print(f"[load] 128 requests in {time.monotonic() - t0:.1f} s; steps {server.sched.steps}")
    assert sum(len(r) for r in results) == 128
    for ids, m, text, reason in (x for r in results for x in r):
        assert_same(oracle, ids, m, text, reason)
    assert sum(server.metric(f'bsbr_http_responses_total{{code="{c}"}}') for c in (500, 503)) == http_5xx_before
    assert server.sched.free_rows() == 8


def test_long_prompt_is_prefilled_between_decode_steps(export_dir, oracle, heldout_ids):
    """A prompt of 400 tokens (7 pieces of 64) arrives while a stream runs: the stream gets
    tokens between its pieces, and both outputs equal their lone runs."""
    from bsbr_export.serve.scheduler import GenRequest, Scheduler

    eng, tok = Engine(export_dir, threads=1), Tokenizer.from_dir(export_dir)
    sched = Scheduler(eng, tok, max_batch=2, max_queue=2, prefill_chunk=64)
    log, done = [], threading.Event()

    def sink(name):
        def put(ev):
            log.append((name, ev.token, ev.finish_reason))
            if name == "long" and ev.finish_reason:
                done.set()
        return put

    try:
        runner = GenRequest(np.array(_prompt(heldout_ids, 10, 1)), 120, sink("run"))
        sched.submit(runner)
        end = time.monotonic() + DEADLINE
        while sum(1 for x in log if x[0] == "run") < 3:
            assert time.monotonic() < end
            time.sleep(0.005)
        long_ids = np.array(_prompt(heldout_ids, 400, 2))
        sched.submit(GenRequest(long_ids, 8, sink("long")))
        assert done.wait(DEADLINE)
        first_long = next(i for i, x in enumerate(log) if x[0] == "long")
        before = [x for x in log[:first_long] if x[0] == "run"]
        between = len(before) - 3
        assert between >= 6, f"the running stream got {between} tokens during the 7-piece prefill"
        assert sched.steps["prefill"] >= 8  # the runner's prompt, then 7 pieces
    finally:
        sched.stop(drain_s=DEADLINE)
    def toks(name):
        return [x[1] for x in log if x[0] == name and x[2] is None]

    assert_same(oracle, runner.ids, 120, tok.decode(toks("run")), runner.finish_reason)
    assert_same(oracle, long_ids, 8, tok.decode(toks("long")), "length" if len(toks("long")) == 8 else "stop")
    assert sched.free_rows() == 2


def test_request_beyond_the_state_budget_waits_then_completes(export_dir, oracle, heldout_ids):
    """With state memory for one long request's bank beside the rows' buffers, a second long
    request waits in the queue (although a row is free) until the first ends, then completes with
    its lone output; a request that could never fit is refused at once; banks are given back."""
    from bsbr_export.serve.scheduler import GenRequest, Scheduler

    eng, tok = Engine(export_dir, threads=1), Tokenizer.from_dir(export_dir)
    n_prompt, n_new = 3 * CHUNK + 5, 24
    need = eng.bank_bytes(n_prompt + n_new)
    fixed = eng.new_state(2).nbytes()
    sched = Scheduler(eng, tok, max_batch=2, max_queue=2, state_memory=fixed + need + need // 2)
    log, done = [], threading.Event()

    def sink(name):
        def put(ev):
            log.append((name, ev.token, ev.finish_reason))
            if name == "b" and ev.finish_reason:
                done.set()
        return put

    try:
        with pytest.raises(InputError, match="state memory"):
            sched.submit(GenRequest(np.arange(1, MAX_LEN - 8), 8, sink("never")))
        a = GenRequest(np.array(_prompt(heldout_ids, n_prompt, 3)), n_new, sink("a"))
        b = GenRequest(np.array(_prompt(heldout_ids, n_prompt, 4)), n_new, sink("b"))
        sched.submit(a, b)
        assert done.wait(DEADLINE)
        end_a = next(i for i, x in enumerate(log) if x[0] == "a" and x[2] is not None)
        first_b = next(i for i, x in enumerate(log) if x[0] == "b")
        assert first_b > end_a, "the second request ran before the first gave its state memory back"
        for r in (a, b):
            text = tok.decode([x[1] for x in log if x[0] == ("a" if r is a else "b") and x[2] is None])
            assert_same(oracle, r.ids, n_new, text, r.finish_reason)
        assert sched.reserved == 0 and sched.state.banks == [None, None]
    finally:
        sched.stop(drain_s=DEADLINE)


def test_disconnect_mid_stream_frees_the_row(server, oracle, heldout_ids):
    start = server.sched.free_rows()
    cancelled = server.metric("bsbr_requests_finished_total{reason=\"cancelled\"}")
    ids = _prompt(heldout_ids, 20, 3)
    body = {"model": MODEL, "prompt": ids, "max_tokens": 480, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=TIMEOUT) as r:
        assert r.status_code == 200
        got = 0
        for line in r.iter_lines():
            got += line.startswith("data: ")
            if got >= 3:
                break
        assert server.sched.free_rows() == start - 1
    end = time.monotonic() + 10  # the row comes back long before the 480 tokens would end
    while server.sched.free_rows() != start:
        assert time.monotonic() < end, "row not freed after the client went away"
        time.sleep(0.01)
    assert server.metric("bsbr_requests_finished_total{reason=\"cancelled\"}") == cancelled + 1
    assert server.metric("bsbr_free_rows") == start
    r = server.client().completions.create(model=MODEL, prompt=ids, max_tokens=30, temperature=0)
    assert_same(oracle, ids, 30, r.choices[0].text, r.choices[0].finish_reason)
    assert server.sched.free_rows() == start
    # a client that gives up on a non-streamed answer frees its row too (and is no 5xx)
    with pytest.raises(httpx.ReadTimeout):
        server.post({**body, "stream": False}, timeout=httpx.Timeout(TIMEOUT, read=0.3))
    end = time.monotonic() + 10
    while server.metric("bsbr_requests_finished_total{reason=\"cancelled\"}") != cancelled + 2:
        assert time.monotonic() < end, "row not freed after the client went away"
        time.sleep(0.01)
    assert server.sched.free_rows() == start
    assert server.metric('bsbr_http_responses_total{code="503"}') == 0


def test_overload_gets_429_then_keeps_serving(export_dir, oracle):
    s = Running(export_dir, max_batch=2, max_queue=4, prefill_chunk=64)
    try:
        body = {"model": MODEL, "prompt": "def f(", "max_tokens": 48, "temperature": 0, "ignore_eos": True}

        async def burst():
            async with httpx.AsyncClient(timeout=TIMEOUT, limits=httpx.Limits(max_connections=64)) as ac:
                return await asyncio.wait_for(asyncio.gather(
                    *(ac.post(s.url + "/v1/completions", json=body) for _ in range(32))), DEADLINE)

        rs = asyncio.run(burst())
        codes = [r.status_code for r in rs]
        print(f"[overload] {codes.count(200)} x 200, {codes.count(429)} x 429")
        assert set(codes) <= {200, 429}
        # 2 rows + 4 waiting admit at least 6 at once; the burst outpaces 48-token generations
        assert codes.count(200) >= 6 and codes.count(429) >= 8
        for r in rs:
            if r.status_code == 429:
                assert int(r.headers["Retry-After"]) >= 1
                assert r.json()["error"]["type"] == "rate_limit_error"
            else:
                assert_same(oracle, oracle.tokenizer.encode("def f("), 48, r.json()["choices"][0]["text"],
                            r.json()["choices"][0]["finish_reason"], ignore_eos=True)
        assert s.metric("bsbr_requests_rejected_total") == codes.count(429)
        after = s.client().completions.create(model=MODEL, prompt="def f(", max_tokens=48, temperature=0,
                                              extra_body={"ignore_eos": True})
        assert after.choices[0].text == rs[codes.index(200)].json()["choices"][0]["text"]
        assert s.sched.free_rows() == 2
    finally:
        s.stop()


# --------------------------------------------------------------------------- the command

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cli_serve_sigterm_drains_and_exits_0(export_dir):
    """The command, torch-free (importing torch fails in the child): SIGTERM mid-stream stops
    accepting, the stream in flight ends with [DONE], and the process exits 0."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["serve", str(export_dir), "--port", str(port), "--max-batch", "2", "--threads", "1", "--model-name", MODEL,
            "--drain", "20"]
    torch_free = ("import sys\nfor m in ('torch', 'transformers'):\n    sys.modules[m] = None  # import fails\n"
                  f"from bsbr_export.cli import main\nmain({args!r})\n")
    proc = subprocess.Popen([sys.executable, "-c", torch_free],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        end = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < end, "server did not start"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        body = {"model": MODEL, "prompt": "import os\n", "max_tokens": 200, "temperature": 0, "stream": True,
                "ignore_eos": True}
        lines = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=TIMEOUT) as r:
            for line in r.iter_lines():
                if not line:
                    continue  # the blank line between events: one SIGTERM only, after the second event
                lines.append(line)
                if len(lines) == 2:
                    proc.send_signal(signal.SIGTERM)
                    time.sleep(0.5)
                    with pytest.raises(httpx.TransportError):  # no longer accepting
                        httpx.get(url + "/health", timeout=2)
        assert lines[-1] == "data: [DONE]"  # the stream in flight finished
        assert sum('"text"' in x for x in lines) >= 1
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    log = proc.stdout.read()
    assert "Shutting down" in log or "Finished server process" in log, log[-2000:]
    started = [line for line in log.splitlines() if " serving " in line]  # one line: what, how, where
    assert len(started) == 1, log[-2000:]
    assert started[0].endswith(f"serving {MODEL} (fp32) at {url}: max batch 2, queue 64, context {MAX_LEN} tokens, "
                               f"prompt <= {MAX_LEN} tokens, max_tokens <= 4096, 131072 tokens in flight"), started


def test_cli_serve_busy_port_fails_in_one_line_before_loading(export_dir):
    """A port another process listens on: one error line naming the address, before the model
    is loaded or uvicorn starts (no "[Errno 98]" from uvicorn after a load)."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "bsbr_export.cli", "serve", str(export_dir), "--port", str(port)],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
        took = time.monotonic() - t0
    assert r.returncode == 1 and r.stdout == "", r.stdout[-2000:]
    assert r.stderr.strip().splitlines() == [f"error: 127.0.0.1:{port} is already in use (another process listens "
                                             f"there): stop it or choose another --port"], r.stderr[-2000:]
    assert took < 20, f"took {took:.1f} s"


def test_cli_serve_bad_export_fails_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bsbr_export.cli", "serve", str(tmp_path / "none")], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "no such export directory" in r.stderr


@pytest.mark.parametrize("size, msg", [("4XB", "must be a size"), ("1KiB", "state memory must be more than")])
def test_cli_serve_bad_state_memory_fails_in_one_line(export_dir, size, msg):
    """--state-memory: an unreadable size, or one below the rows' buffers, fails before the server starts."""
    r = subprocess.run([sys.executable, "-m", "bsbr_export.cli", "serve", str(export_dir), "--state-memory", size,
                        "--port", "0"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and msg in r.stderr, r.stderr[-500:]
