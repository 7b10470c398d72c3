"""The OpenAI-compatible HTTP application (FastAPI on Starlette, served by uvicorn or Ray Serve).

    POST /v1/completions   OpenAI completions, streamed as server-sent events or not
    GET  /v1/models        the one model this server holds
    GET  /health           200 while the scheduler runs, 503 otherwise
    GET  /metrics          Prometheus text format

``create_app(ServeConfig(...))`` builds the application; the runtime (engine, tokenizer,
scheduler, metrics: ``Server``) starts in the application's lifespan, or on the first request
where no lifespan runs. Every route reads it from ``app.state``; cross-cutting concerns (API
keys, body size and receive timeout, the log line: issue 18) sit in ``security.Guard``, an ASGI
middleware around the routes; the routes check prompt, ``max_tokens`` and in-flight limits and
the request timeout. Every error is OpenAI-style JSON
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import BSBRExportError, InputError
from ..runtime import scoring
from ..runtime.sampling import SamplingOptions
from . import fanout
from .flow import OVERFLOW_MESSAGE, BoundedStreamingResponse, RequestFlow
from .metrics import HTTPMetrics
from .logprobs import Choice as _Choice
from .protocol import APIError, CompletionRequest, error_body, parse_completion
from .scheduler import PREFILL_CHUNK, GenRequest, QueueFull, Scheduler, ShuttingDown
from .security import LOG_KEY, Guard, check_exposure, header_timeout_protocol

RETRY_AFTER_S = 1


@dataclass
class ServeConfig:
    """What ``bsbr-export serve`` takes (see its --help)."""

    export_dir: str
    precision: str = "fp32"
    threads: int | None = None
    max_batch: int = 8
    max_queue: int = 64
    prefill_chunk: int = PREFILL_CHUNK
    model_name: str | None = None
    drain_s: float = 10.0
    providers: list | None = None
    state_memory: int | None = None  # bytes of decode state (rows' buffers and banks); None: half the free memory
    prepack: bool | str = "decode"  # ORT weight prepacking: "decode" (per-token graph), True (all graphs), False
    prefix_cache: int = 1 << 30  # bytes of prompt states kept for reuse (runtime.prefix); 0: off
    # who may call (security.Guard) and how much one request may take
    api_keys: tuple = ()
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int = 8192
    max_tokens_cap: int = 4096
    max_prompts: int = 16
    max_tokens_in_flight: int = 131072
    request_timeout_s: float = 600.0
    receive_timeout_s: float = 30.0
    header_timeout_s: float = 10.0
    send_timeout_s: float = 30.0  # a streaming client that reads nothing for this long is dropped
    stream_buffer: int = 1024  # token events per prompt waiting for the response; past it, dropped
    log_content: bool = False

    def __post_init__(self):
        self.api_keys = tuple(self.api_keys or ())
        for name in ("max_body_bytes", "max_prompt_tokens", "max_tokens_cap", "max_prompts", "max_tokens_in_flight",
                     "stream_buffer"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"{name} must be an integer >= 1, got {v!r}")
        for name in ("request_timeout_s", "receive_timeout_s", "header_timeout_s", "send_timeout_s"):
            if not getattr(self, name) > 0:
                raise InputError(f"{name} must be > 0, got {getattr(self, name)!r}")

    def __repr__(self) -> str:  # keys never reach a log through the config
        return f"ServeConfig({self.export_dir!r}, api_keys=<{len(self.api_keys)} keys>, ...)"

    @property
    def served_name(self) -> str:
        return self.model_name or Path(self.export_dir).resolve().name


class Server:
    """The runtime behind the routes: tokenizer, engine, scheduler and metrics of one export."""

    def __init__(self, config: ServeConfig):
        from ..runtime.api import check_export, check_providers
        from ..runtime.engine import Engine
        from ..runtime.text import Tokenizer
        from .metrics import Metrics

        check_export(config.export_dir, config.precision)
        self.config, self.name, self.created = config, config.served_name, int(time.time())
        self.tokenizer = Tokenizer.from_dir(config.export_dir)
        self.engine = Engine(config.export_dir, precision=config.precision, threads=config.threads,
                             providers=check_providers(config.providers), prepack=config.prepack)
        self.metrics = Metrics()
        self.scheduler = Scheduler(self.engine, self.tokenizer, max_batch=config.max_batch,
                                   max_queue=config.max_queue, prefill_chunk=config.prefill_chunk,
                                   metrics=self.metrics, state_memory=config.state_memory,
                                   prefix_cache=config.prefix_cache)
        self.metrics.sample(self.scheduler)
        self.max_len, self.vocab_size = int(self.engine.max_len), int(self.engine.vocab_size)
        self.in_flight, self._flight_lock = 0, threading.Lock()

    def reserve(self, n: int) -> bool:
        """Take ``n`` tokens of ``--max-tokens-in-flight``; False when they do not fit."""
        with self._flight_lock:
            if self.in_flight + n > self.config.max_tokens_in_flight:
                return False
            self.in_flight += n
            return True

    def release(self, n: int) -> None:
        with self._flight_lock:
            self.in_flight -= n

    def close(self) -> None:
        self.scheduler.stop(self.config.drain_s)


_lock = threading.Lock()


def server_of(app) -> Server:
    """The app's ``Server``, started on first use (Ray Serve replicas, tests without lifespan)."""
    with _lock:
        if getattr(app.state, "server", None) is None:
            app.state.server = Server(app.state.config)
    return app.state.server


def create_app(config: ServeConfig) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        server_of(app)
        yield
        srv = getattr(app.state, "server", None)
        if srv is not None:
            await asyncio.get_running_loop().run_in_executor(None, srv.close)

    app = FastAPI(title="bsbr-export serve", lifespan=lifespan)
    app.state.config = config
    app.add_middleware(Guard, config=config)
    app.add_middleware(HTTPMetrics)  # outermost: counts the Guard's answers too

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return _error_response(request, e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error_response(request, APIError(e.status_code, str(e.detail), type=kind))

    @app.exception_handler(Exception)
    async def _internal(request, e):
        return _error_response(request, APIError(500, f"internal error: {type(e).__name__}", type="server_error"))

    @app.get("/health")
    async def health(request: Request):
        srv = server_of(request.app)
        ok = srv.scheduler.alive
        return JSONResponse({"status": "ok" if ok else "unavailable", "free_rows": srv.scheduler.free_rows(),
                             "max_batch": srv.scheduler.max_batch}, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models(request: Request):
        srv = server_of(request.app)
        return {"object": "list", "data": [{"id": srv.name, "object": "model", "created": srv.created,
                                            "owned_by": "bsbr-export", "max_model_len": srv.max_len}]}

    @app.get("/metrics")
    async def metrics(request: Request):
        from .metrics import CONTENT_TYPE_LATEST

        srv = server_of(request.app)
        return Response(srv.metrics.render(srv.scheduler), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(request: Request):
        srv = server_of(request.app)
        body = parse_completion(await request.body())
        return await _complete(srv, request, body)

    return app


def _error_response(request, e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


# --------------------------------------------------------------------------- completions

def _prompts(srv: Server, body: CompletionRequest) -> list[np.ndarray]:
    p = body.prompt
    if isinstance(p, str) or (isinstance(p, list) and p and isinstance(p[0], int)):
        p = [p]
    if not p:
        raise APIError(400, "prompt is empty: give a string, a list of strings, or token ids", param="prompt")
    cfg = srv.config
    if len(p) > cfg.max_prompts:
        raise APIError(400, f"{len(p)} prompts in one request exceed --max-prompts {cfg.max_prompts}", param="prompt",
                       code="too_many_prompts")
    out = []
    for i, x in enumerate(p):
        x = srv.tokenizer.encode(x) if isinstance(x, str) else x
        if len(x) > cfg.max_prompt_tokens:  # before any array is made
            raise APIError(400, f"prompt {i} has {len(x)} tokens, over --max-prompt-tokens {cfg.max_prompt_tokens}",
                           param="prompt", code="prompt_too_long")
        try:
            ids = np.asarray(x, dtype=np.int64)
        except OverflowError:
            raise APIError(400, f"prompt {i}: token ids must lie in [0, {srv.vocab_size})", param="prompt") from None
        if ids.size == 0:
            raise APIError(400, f"prompt {i} is empty (no tokens)", param="prompt")
        if ids.max() >= srv.vocab_size:
            raise APIError(400, f"prompt {i}: token ids must lie in [0, {srv.vocab_size}), got {int(ids.max())}",
                           param="prompt")
        out.append(ids)
    return out


def _requests(srv: Server, body: CompletionRequest, prompts, sink) -> list[GenRequest]:
    max_tokens = min(16, srv.config.max_tokens_cap) if body.max_tokens is None else body.max_tokens
    if max_tokens > srv.config.max_tokens_cap:
        raise APIError(400, f"max_tokens {max_tokens} is over --max-tokens-cap {srv.config.max_tokens_cap}",
                       param="max_tokens", code="max_tokens_too_large")
    for i, ids in enumerate(prompts):  # the last token is never fed: it takes no room
        if ids.size > srv.max_len or ids.size + max_tokens > srv.max_len + 1:
            raise APIError(400, f"This model's maximum context length is {srv.max_len} tokens; prompt "
                           f"{i} has {ids.size} tokens and max_tokens is {max_tokens} ({ids.size + max_tokens} in "
                           f"all). Reduce the prompt or max_tokens.", param="max_tokens",
                           code="context_length_exceeded")
    try:
        opts = SamplingOptions(temperature=1.0 if body.temperature is None else body.temperature, top_k=body.top_k,
                               top_p=None if body.top_p in (None, 1) else body.top_p,
                               repetition_penalty=body.repetition_penalty)
    except InputError as e:
        raise APIError(400, str(e), param=str(e).split(" ", 1)[0]) from None
    if body.seed is not None and not 0 <= body.seed < 2 ** 63:
        raise APIError(400, f"seed must lie in [0, 2**63), got {body.seed}", param="seed", code="invalid_value")
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    eos = srv.tokenizer.eos_token_id
    stops = frozenset() if body.ignore_eos or eos is None else frozenset({int(eos)})
    return [GenRequest(ids=ids, max_tokens=max_tokens, sink=(lambda ev, i=i: sink(i, ev)), opts=opts,
                       seed=body.seed, stop=stop, stop_tokens=stops, presence_penalty=body.presence_penalty or 0.0,
                       frequency_penalty=body.frequency_penalty or 0.0, top_logprobs=body.logprobs or 0,
                       logprobs=body.logprobs is not None, score_prompt=bool(body.echo) and body.logprobs is not None)
            for i, ids in enumerate(prompts)]


async def _complete(srv: Server, request: Request, body: CompletionRequest):
    bad = body.unsupported()
    if bad is not None:
        raise bad
    if body.model != srv.name:
        raise APIError(404, f"The model '{body.model}' does not exist (this server holds '{srv.name}')",
                       param="model", code="model_not_found")
    loop = asyncio.get_running_loop()
    prompts = await loop.run_in_executor(None, _prompts, srv, body)  # a long text does not stall other streams
    k = fanout.per_prompt(body)  # completions drawn per prompt
    events = RequestFlow(srv, len(prompts) * k, srv.config.stream_buffer)
    deadline = loop.time() + srv.config.request_timeout_s
    info = request.scope.get(LOG_KEY, {})
    info["prompt_tokens"], info["completion_tokens"] = sum(int(p.size) for p in prompts), 0
    if srv.config.log_content:
        info["prompt"] = body.prompt
    events.reqs = reqs = fanout.expand(_requests(srv, body, prompts, events.put), k, events.put)
    if reqs[0].score_prompt and not scoring.can_score(srv.engine):  # an export made before extend took logit_rows
        raise APIError(400, f"echo with logprobs: {scoring.NO_SCORES}", param="logprobs", code="unsupported_value")
    choices = await loop.run_in_executor(None, lambda: [_Choice(srv, body, i * k + j, p) for i, p in enumerate(prompts) for j in range(k)])
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": srv.name}
    if reqs[0].max_tokens > 0 or reqs[0].score_prompt:
        need = [int(r.ids.size) + r.max_tokens for r in reqs]
        if sum(need) > srv.config.max_tokens_in_flight:  # could never fit: a retry would not help
            raise APIError(400, f"this request's {sum(need)} tokens (prompt + max_tokens) exceed --max-tokens-in-flight "
                           f"{srv.config.max_tokens_in_flight}", param="max_tokens", code="tokens_in_flight_exceeded")
        if not srv.reserve(sum(need)):
            raise APIError(429, f"the server is busy: this request's {sum(need)} tokens (prompt + max_tokens) do not "
                           f"fit in --max-tokens-in-flight {srv.config.max_tokens_in_flight} "
                           f"({srv.in_flight} in flight); retry after {RETRY_AFTER_S} s", type="rate_limit_error",
                           param="max_tokens_in_flight", code="tokens_in_flight",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        events.hold(need)
        try:
            srv.scheduler.submit(*reqs)
        except BaseException as e:
            events.release()
            if isinstance(e, QueueFull):
                raise APIError(429, f"the server is busy: {e}; retry after {RETRY_AFTER_S} s",
                               type="rate_limit_error", code="queue_full",
                               headers={"Retry-After": str(RETRY_AFTER_S)}) from None
            if isinstance(e, ShuttingDown):
                raise APIError(503, str(e), type="server_error", code="shutting_down") from None
            if isinstance(e, InputError):
                raise APIError(400, str(e), param="max_tokens", code="context_length_exceeded") from None
            raise
    else:  # max_tokens 0 without the prompt's logprobs: the prompt (echo) and nothing else, no model work
        for ch in choices:
            ch.finish_reason = "length"
    watcher = asyncio.create_task(_watch_disconnect(request, srv, reqs))
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return BoundedStreamingResponse(_stream(srv, head, choices, reqs, events, watcher, include_usage, deadline,
                                                info), srv.config.send_timeout_s, media_type="text/event-stream",
                                        headers={"Cache-Control": "no-cache"})
    timed_out = False
    try:
        left = sum(ch.finish_reason is None for ch in choices)
        while left:
            try:
                i, ev = await asyncio.wait_for(events.get(), max(0.0, deadline - asyncio.get_running_loop().time()))
            except asyncio.TimeoutError:
                timed_out = True
                break
            if ev.finish_reason is None:
                choices[i].add(ev)
            else:
                choices[i].end(ev)
                left -= 1
    finally:
        _finish(srv, watcher, reqs, info, choices, events)
    if timed_out:
        raise _timeout(srv)
    failed = next((ch for ch in choices if ch.finish_reason in ("error", "cancelled")), None)
    if failed is not None:
        if watcher.done() and not watcher.cancelled() and watcher.result():
            # nobody reads this answer; 499 (client closed request) keeps it out of the 5xx counts
            raise APIError(499, "the client closed the request", code="client_closed_request")
        if failed.finish_reason == "error":
            raise APIError(500, failed.error or "internal error", type="server_error")
        raise APIError(503, "the request was cancelled (server shutting down)", type="server_error",
                       code="shutting_down")
    return {**head, "choices": [c.json() for c in fanout.best(choices, body.n or 1, k)], "usage": fanout.usage(choices, reqs, k)}


def _note(srv: Server, info: dict, choices) -> None:
    """Token counts (and, with --log-content, the text) for the request's log line."""
    info["completion_tokens"] = sum(len(ch.tokens) for ch in choices)
    if srv.config.log_content:
        info["completion"] = [ch.text for ch in choices]


def _timeout(srv: Server) -> APIError:
    return APIError(408, f"the request ran past --request-timeout {srv.config.request_timeout_s:g} s and was "
                    "cancelled", param="request_timeout", code="request_timeout")


async def _watch_disconnect(request: Request, srv: Server, reqs) -> bool:
    """Cancel the requests when the client goes away (their rows are freed at once); True then."""
    try:
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                for r in reqs:
                    srv.scheduler.cancel(r)
                return True
    except RuntimeError:
        return False


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


async def _stream(srv: Server, head: dict, choices, reqs, events: asyncio.Queue, watcher, include_usage: bool,
                  deadline: float, info: dict):
    usage_null = {"usage": None} if include_usage else {}
    try:
        def chunk(i, text, logprobs=None, finish_reason=None):
            return _sse({**head, "choices": [{"index": i, "text": text, "logprobs": logprobs,
                                              "finish_reason": finish_reason}], **usage_null})

        for ch in choices:
            if (ch.echo and not ch.scores_prompt) or ch.finish_reason is not None:  # echo; max_tokens 0 ends here
                yield chunk(ch.index, ch.echo, None, ch.finish_reason)
        left = sum(ch.finish_reason is None for ch in choices)
        while left:
            try:
                i, ev = await asyncio.wait_for(events.get(), max(0.0, deadline - asyncio.get_running_loop().time()))
            except asyncio.TimeoutError:
                yield _sse(_timeout(srv).body())
                return
            ch = choices[i]
            if ev.finish_reason is None:
                frag = ch.add(ev)
                if ch.piece or frag is not None:
                    yield chunk(i, ch.piece, frag)
                continue
            ch.end(ev)
            left -= 1
            if ev.finish_reason in ("error", "cancelled"):
                yield _sse(error_body(OVERFLOW_MESSAGE if events.overflowed else ev.error
                                      or "the request was cancelled (server shutting down)", "server_error"))
                return
            yield chunk(i, "", None, ev.finish_reason)
        if include_usage:
            yield _sse({**head, "choices": [], "usage": fanout.usage(choices, reqs, reqs[0].forks + 1)})
        yield b"data: [DONE]\n\n"
    finally:
        _finish(srv, watcher, reqs, info, choices, events)


def _finish(srv, watcher, reqs, info, choices, events) -> None:
    """After a response, whatever ended it: stop watching the client, cancel what still runs
    (its rows go back to the scheduler), give its in-flight tokens back, and log the request."""
    watcher.cancel()
    events.close()
    for r in reqs:
        if r.finish_reason is None:
            srv.scheduler.cancel(r)
    _note(srv, info, choices)


def uvicorn_options(config: ServeConfig) -> dict:
    """What closes uvicorn's gaps for slow clients: a header timeout (its h11 protocol, extended),
    bounded header size, a short keep-alive; its access log is replaced by the Guard's line."""
    return dict(http=header_timeout_protocol(config.header_timeout_s), h11_max_incomplete_event_size=16 * 1024,
                timeout_keep_alive=5, access_log=False)


def run(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
        insecure: bool = False, ssl_certfile: str | None = None, ssl_keyfile: str | None = None) -> None:
    """Serve until SIGINT/SIGTERM: uvicorn stops accepting, lets streams finish for up to
    ``config.drain_s`` seconds, then the scheduler cancels what is left and the process exits 0.
    A non-loopback ``host`` without an API key is refused (InputError) before anything binds,
    unless ``insecure``; ``ssl_certfile``/``ssl_keyfile`` serve HTTPS (uvicorn's own TLS)."""
    import logging

    import uvicorn

    check_exposure(host, config.api_keys, insecure)
    if (ssl_certfile is None) != (ssl_keyfile is None):
        raise InputError("TLS needs both --ssl-certfile and --ssl-keyfile")
    app = create_app(config)
    logging.getLogger("bsbr_export.serve").setLevel(logging.INFO)
    if not logging.getLogger("bsbr_export.serve").handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logging.getLogger("bsbr_export.serve").addHandler(handler)
    # uvicorn's access log is replaced by the Guard's line per request (status, latency, tokens)
    uv = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=config.drain_s,
                        lifespan="on", ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile, **uvicorn_options(config))
    server = uvicorn.Server(uv)
    if threading.current_thread() is threading.main_thread():
        # uvicorn re-raises the signal that stopped it once it has shut down; a drained SIGTERM
        # is a clean stop here (exit code 0), so the re-raised SIGTERM is ignored.
        signal.signal(signal.SIGTERM, lambda *_: None)
    server.run()
    if not server.started:
        raise BSBRExportError(f"the server did not start on {host}:{port} (see the log above)")
