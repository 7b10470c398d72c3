"""The OpenAI-compatible HTTP application (FastAPI on Starlette, served by uvicorn or Ray Serve).

    POST /v1/completions   OpenAI completions, streamed as server-sent events or not
    POST /v1/chat/completions, /tokenize, /detokenize   chat (serve.chat)
    GET  /v1/models        the one model this server holds
    GET  /health           200 while the scheduler runs, 503 otherwise
    GET  /metrics          Prometheus text format

``create_app(ServeConfig(...))`` builds the application; the runtime (engine, tokenizer,
scheduler, metrics: ``Server``) starts in the application's lifespan, or on the first request
where no lifespan runs. Every route reads it from ``app.state``; cross-cutting concerns (API
keys, body size and receive timeout, the log line) sit in ``security.Guard``, an ASGI
middleware around the routes; the routes check prompt, ``max_tokens`` and in-flight limits and
the request timeout. Every error is OpenAI-style JSON
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import BSBRExportError, InputError
from .completions import complete
from .metrics import HTTPMetrics
from .protocol import APIError, parse_completion
from .scheduler import PREFILL_CHUNK, Scheduler
from .security import Guard, check_exposure, check_port, header_timeout_protocol


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
    chat_template: str | None = None  # a Jinja file (--chat-template); None: the export's tokenizer_config.json

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
        return await complete(srv, request, body)

    from .chat import add_routes  # /v1/chat/completions, /tokenize, /detokenize

    add_routes(app)
    return app


def _error_response(request, e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


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
    unless ``insecure``, and so is an address already in use, before the runtime is loaded;
    ``ssl_certfile``/``ssl_keyfile`` serve HTTPS (uvicorn's own TLS). Once listening, one line
    says what is served where (``started_line``)."""
    import logging

    import uvicorn

    check_exposure(host, config.api_keys, insecure)
    if (ssl_certfile is None) != (ssl_keyfile is None):
        raise InputError("TLS needs both --ssl-certfile and --ssl-keyfile")
    check_port(host, port)
    app = create_app(config)
    logging.getLogger("bsbr_export.serve").setLevel(logging.INFO)
    if not logging.getLogger("bsbr_export.serve").handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logging.getLogger("bsbr_export.serve").addHandler(handler)
    # uvicorn's access log is replaced by the Guard's line per request (status, latency, tokens)
    uv = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=config.drain_s,
                        lifespan="on", ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile, **uvicorn_options(config))
    scheme = "https" if ssl_certfile else "http"

    class Uvicorn(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:  # the runtime loaded (lifespan) and the socket bound: the actual port
                bound = self.servers[0].sockets[0].getsockname()[1]
                logging.getLogger("bsbr_export.serve").info(
                    started_line(server_of(app), f"{scheme}://{_url_host(host)}:{bound}"))

    server = Uvicorn(uv)
    if threading.current_thread() is threading.main_thread():
        # uvicorn re-raises the signal that stopped it once it has shut down; a drained SIGTERM
        # is a clean stop here (exit code 0), so the re-raised SIGTERM is ignored.
        signal.signal(signal.SIGTERM, lambda *_: None)
    server.run()
    if not server.started:
        raise BSBRExportError(f"the server did not start on {host}:{port} (see the log above)")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def started_line(srv: Server, url: str) -> str:
    """The one start-up line: what is served, how many rows at once, the limits, and where."""
    c = srv.config
    queue = f"queue {c.max_queue}" if c.max_queue else "no queue"
    return (f"serving {srv.name} ({c.precision}) at {url}: max batch {c.max_batch}, {queue}, context "
            f"{srv.max_len} tokens, prompt <= {c.max_prompt_tokens} tokens, max_tokens <= {c.max_tokens_cap}, "
            f"{c.max_tokens_in_flight} tokens in flight")
