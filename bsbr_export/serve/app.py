"""The OpenAI-compatible HTTP application (FastAPI on Starlette, served by uvicorn or Ray Serve).

    POST /v1/completions   OpenAI completions, streamed as server-sent events or not (serve.completions)
    POST /v1/chat/completions, /tokenize, /detokenize   chat (serve.chat)
    GET  /v1/models        the one model this server holds (serve.status)
    GET  /health           200 while the scheduler runs, 503 otherwise
    GET  /metrics          Prometheus text format

``create_app(ServeConfig(...))`` builds the application from those route modules, its middleware
and its lifecycle; the runtime (engine, tokenizer, scheduler, metrics: ``serve.server.Server``)
starts in the application's lifespan, or on the first request where no lifespan runs. Every
route reads it from ``app.state`` (``server.server_of``); cross-cutting concerns (API
keys, body size and receive timeout, the log line) sit in ``security.Guard``, an ASGI
middleware around the routes; the routes check prompt, ``max_tokens`` and in-flight limits and
the request timeout. Every error is OpenAI-style JSON
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import BSBRExportError, InputError
from . import chat, completions, status
from .metrics import HTTPMetrics
from .protocol import APIError
from .security import Guard, check_exposure, check_port, header_timeout_protocol
from .server import ServeConfig, Server, error_response, server_of


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
        return error_response(request, e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(request, APIError(e.status_code, str(e.detail), type=kind))

    @app.exception_handler(Exception)
    async def _internal(request, e):
        return error_response(request, APIError(500, f"internal error: {type(e).__name__}", type="server_error"))

    status.add_routes(app)  # /health, /v1/models, /metrics
    completions.add_routes(app)  # /v1/completions
    chat.add_routes(app)  # /v1/chat/completions, /tokenize, /detokenize
    return app


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
    """The one start-up line: what is served, how many rows at once, the limits in effect (a
    prompt never exceeds the export's context, whatever --max-prompt-tokens says), and where."""
    c = srv.config
    queue = f"queue {c.max_queue}" if c.max_queue else "no queue"
    return (f"serving {srv.name} ({c.precision}) at {url}: max batch {c.max_batch}, {queue}, context "
            f"{srv.max_len} tokens, prompt <= {min(c.max_prompt_tokens, srv.max_len)} tokens, "
            f"max_tokens <= {c.max_tokens_cap}, "
            f"{c.max_tokens_in_flight} tokens in flight")
