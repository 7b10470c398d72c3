"""Who may call the server and how much one request may take.

``Guard`` is an ASGI middleware around the whole application (uvicorn and Ray Serve alike):

- authentication: with any API key set, every path but ``/health`` needs
  ``Authorization: Bearer KEY`` (compared in constant time); 401 otherwise;
- the request body: a ``Content-Length`` over ``max_body_bytes`` gets 413 before any of the
  body is read; a body streamed without a length is counted as it comes and cut off at the
  limit (413); a body that has not all arrived ``receive_timeout_s`` after the request began
  gets 408 (slow clients), and both close the connection;
- one log line per request: method, path, status, latency and token counts (the prompt and
  completion text only with ``log_content``; headers, hence keys, never).

The body is read here, whole and bounded, and handed to the application from memory; later
``receive`` calls (a client disconnecting mid-stream) go to the server as before.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import os
import time
from pathlib import Path

from ..errors import InputError
from .protocol import error_body

log = logging.getLogger("bsbr_export.serve")

ENV_KEY = "BSBR_API_KEY"
OPEN_PATHS = frozenset({"/health"})
LOG_KEY = "bsbr.log"  # scope entry where the routes put token counts (and text) for the log line


def collect_keys(keys=(), key_file: str | os.PathLike | None = None, env: dict | None = None) -> tuple[str, ...]:
    """API keys from options, a file (one per line; blank lines and ``#`` lines skipped) and
    ``$BSBR_API_KEY``; InputError for an unreadable file or an empty key file."""
    out = [k.strip() for k in keys if k and k.strip()]
    if key_file is not None:
        try:
            lines = Path(key_file).read_text().splitlines()
        except OSError as e:
            raise InputError(f"cannot read the API key file {key_file}: {e.strerror or type(e).__name__}") from None
        found = [s.strip() for s in lines if s.strip() and not s.strip().startswith("#")]
        if not found:
            raise InputError(f"the API key file {key_file} holds no key")
        out += found
    env_key = (os.environ if env is None else env).get(ENV_KEY, "").strip()
    if env_key:
        out.append(env_key)
    return tuple(dict.fromkeys(out))


def is_loopback(host: str) -> bool:
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, keys, insecure: bool) -> None:
    """Refuse (InputError, one line) a non-loopback address without a key unless ``insecure``."""
    if not keys and not insecure and not is_loopback(host):
        raise InputError(f"refusing to listen on {host} without an API key: give --api-key, --api-key-file or "
                         f"${ENV_KEY}, or --insecure to serve without one")


def check_port(host: str, port: int) -> None:
    """Refuse (InputError, one line) an address the server could not listen on, before the
    runtime is loaded: bind it as uvicorn will (every address the host resolves to, with
    SO_REUSEADDR) and let go at once. Port 0 (any free port) always binds."""
    import errno
    import socket

    try:
        addrs = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    for family, kind, proto, _, addr in addrs:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(addr)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise InputError(f"{host}:{port} is already in use (another process listens there): "
                                     f"stop it or choose another --port") from None
                raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def key_ok(header: str | bytes | None, keys) -> bool:
    """``Authorization: Bearer KEY`` against every key, each compared in constant time, as bytes:
    the header's bytes as they came (a str header is the ASGI server's latin-1 decoding of them)
    against each key's UTF-8 bytes, so a non-ASCII key sent as UTF-8 matches."""
    if isinstance(header, str):
        try:
            header = header.encode("latin-1")
        except UnicodeEncodeError:  # not a header as an ASGI server decodes it: its text as UTF-8
            header = header.encode("utf-8", "surrogateescape")
    scheme, _, given = (header or b"").partition(b" ")
    if scheme.lower() != b"bearer":
        given = b""
    given_b = given.strip()
    ok = False
    for k in keys:  # no early exit: the time does not tell which key matched
        ok |= hmac.compare_digest(given_b, k.encode("utf-8", "surrogateescape"))
    return ok and bool(given_b)


class _Reject(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None, type_="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type_


class Guard:
    """The ASGI middleware (see the module docstring); ``config`` is the app's ``ServeConfig``."""

    def __init__(self, app, config):
        self.app, self.config = app, config

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, cfg = time.perf_counter(), self.config
        info = scope[LOG_KEY] = {}
        status = [0]

        async def send_logged(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
            if cfg.api_keys and scope.get("path") not in OPEN_PATHS and not key_ok(headers.get("authorization"),
                                                                                   cfg.api_keys):
                raise _Reject(401, "Incorrect or missing API key: send the header 'Authorization: Bearer KEY'",
                              "invalid_api_key", type_="authentication_error")
            if scope.get("method") in ("POST", "PUT", "PATCH"):
                body = await self._read_body(headers, receive)
                replay = [{"type": "http.request", "body": body, "more_body": False}]

                async def receive_replayed():
                    return replay.pop() if replay else await receive()

                await self.app(scope, receive_replayed, send_logged)
            else:
                await self.app(scope, receive, send_logged)
        except _Reject as e:
            await _send_error(send_logged, e)
        finally:
            self._log(scope, status[0], time.perf_counter() - t0, info)

    async def _read_body(self, headers: dict, receive) -> bytes:
        cfg, limit = self.config, self.config.max_body_bytes
        length = headers.get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                raise _Reject(400, "invalid Content-Length header", "invalid_content_length")
            size = int(length) if len(length.strip()) <= 18 else None  # int() of thousands of digits is slow
            if size is None or size > limit:
                raise _Reject(413, f"the request body ({size or 'over 10**18'} bytes) exceeds --max-body-bytes "
                              f"{limit}", "request_too_large", "max_body_bytes")
        chunks, size = [], 0
        end = time.monotonic() + cfg.receive_timeout_s
        while True:
            left = end - time.monotonic()
            try:
                if left <= 0:
                    raise asyncio.TimeoutError
                msg = await asyncio.wait_for(receive(), left)
            except asyncio.TimeoutError:
                raise _Reject(408, f"the request body did not arrive within --receive-timeout "
                              f"{cfg.receive_timeout_s:g} s", "request_timeout", "receive_timeout") from None
            if msg["type"] == "http.disconnect":
                raise _Reject(400, "the client closed the connection while sending the body", "client_closed_request")
            part = msg.get("body", b"")
            size += len(part)
            if size > limit:
                raise _Reject(413, f"the request body exceeds --max-body-bytes {limit}", "request_too_large",
                              "max_body_bytes")
            chunks.append(part)
            if not msg.get("more_body", False):
                return b"".join(chunks)

    def _log(self, scope, status: int, seconds: float, info: dict) -> None:
        parts = [f'{scope.get("method", "-")} {scope.get("path", "-")} {status or "-"} {seconds * 1000:.1f}ms']
        for k in ("prompt_tokens", "completion_tokens"):
            if k in info:
                parts.append(f"{k}={info[k]}")
        if self.config.log_content:
            for k in ("prompt", "completion"):
                if k in info:
                    parts.append(f"{k}={json.dumps(info[k])}")
        log.info(" ".join(parts))


async def _send_error(send, e: _Reject) -> None:
    data = json.dumps(error_body(e.message, e.type, e.param, e.code)).encode()
    # the body (or its rest) is not read: the connection cannot be reused
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
               (b"connection", b"close")]
    if e.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    try:
        await send({"type": "http.response.start", "status": e.status, "headers": headers})
        await send({"type": "http.response.body", "body": data})
    except OSError:  # the client is gone
        pass


def header_timeout_protocol(seconds: float):
    """uvicorn's h11 protocol with a header timeout: a connection whose next request's headers
    are not all in ``seconds`` after it opens (or after its last response, once a byte of the
    next request came) is closed. uvicorn has none (its keep-alive timer stops at the first byte)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11(H11Protocol):
        _header_timer = None

        def _idle(self) -> bool:  # no request in progress: waiting for (the rest of) headers
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expired(self) -> None:
            self._header_timer = None
            if self._idle() and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._idle():
                self._arm()
            else:
                self._disarm()

    return HeaderTimeoutH11
