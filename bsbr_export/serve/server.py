"""What every route of the server reads: the configuration (``ServeConfig``), the runtime behind
the routes (``Server``: tokenizer, engine, scheduler and metrics of one export), ``server_of``
(the application's ``Server``, started on first use) and ``error_response`` (an ``APIError`` as
OpenAI-style JSON). ``app`` assembles the application from the route modules (``completions``,
``chat``, ``status``); they all import these from here."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi.responses import JSONResponse

from ..errors import InputError
from .protocol import APIError
from .scheduler import PREFILL_CHUNK, Scheduler


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
    prepack: bool | str = "decode"  # ORT weight prepacking: "decode" (prompt + per-token session), True (all), False
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


def error_response(request, e: APIError) -> JSONResponse:
    """``e`` as the answer to ``request``: OpenAI-style JSON (``APIError.body``), its status and headers."""
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)
