"""From the scheduler's thread to one HTTP response, bounded.

``RequestFlow``: the events of one request's generations, handed from the scheduler's thread to
the event loop, and the tokens of ``--max-tokens-in-flight`` the request holds. The tokens of a
prompt are given back at its last event or when the response ends, whichever comes first (once).
Token events waiting for the response are bounded (``stream_buffer`` per prompt): a response that
falls that far behind (a streaming client that stops reading) has its generations cancelled
(their rows freed) and ends with an error, so nothing queues without bound behind it.

``BoundedStreamingResponse``: a streaming response whose every send must complete within
``send_timeout_s``; a client that stops reading for that long is dropped (its generations
cancelled, the connection closed by the server).
"""

from __future__ import annotations

import asyncio
import logging
import threading

from starlette.responses import StreamingResponse

log = logging.getLogger("bsbr_export.serve")

OVERFLOW_MESSAGE = "the client did not read the stream fast enough; the request was dropped"


class RequestFlow:
    """Events of one HTTP request's prompts and the in-flight tokens they hold (see the module
    docstring). Made on the event loop; ``put`` is called on the scheduler's thread."""

    def __init__(self, srv, n_prompts: int, stream_buffer: int):
        self.loop, self.queue = asyncio.get_running_loop(), asyncio.Queue()
        self.srv, self.held = srv, [0] * n_prompts
        self.bound, self.pending, self.overflowed = stream_buffer * n_prompts, 0, False
        self.reqs: list = []  # the scheduler's requests, cancelled on overflow
        self._lock = threading.Lock()

    def hold(self, amounts) -> None:
        """Record the tokens each prompt holds (already taken with ``srv.reserve``)."""
        with self._lock:
            self.held[:] = amounts

    def release(self, i: int | None = None) -> None:
        """Give back prompt ``i``'s tokens (all prompts' with None), each once."""
        with self._lock:
            idx = range(len(self.held)) if i is None else (i,)
            n = sum(self.held[j] for j in idx)
            for j in idx:
                self.held[j] = 0
        if n:
            self.srv.release(n)

    def put(self, i: int, ev) -> None:
        """The scheduler's sink for prompt ``i``: its last event is always delivered (and gives
        its tokens back); a token event past the bound cancels the request's generations."""
        last = ev.finish_reason is not None
        if last:
            self.release(i)
        with self._lock:
            drop = not last and (self.overflowed or self.pending >= self.bound)
            first = drop and not self.overflowed
            self.overflowed |= drop
            self.pending += not drop
        if first:
            log.warning("a response fell %d events behind its generations: request dropped", self.bound)
            for r in self.reqs:
                r.cancel()  # on the scheduler's thread: the rows are freed at its next iteration
        if not drop:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (i, ev))

    async def get(self):
        item = await self.queue.get()
        with self._lock:
            self.pending -= 1
        return item

    def close(self) -> None:
        """The response ended, however: every token still held is given back."""
        self.release()


class BoundedStreamingResponse(StreamingResponse):
    """A ``StreamingResponse`` whose every send must complete within ``send_timeout_s``; past it,
    the body generator is closed (its ``finally`` cancels the generations) and the response is
    left incomplete, so the ASGI server closes the connection."""

    def __init__(self, content, send_timeout_s: float, **kw):
        super().__init__(content, **kw)
        self.send_timeout_s = send_timeout_s

    async def stream_response(self, send) -> None:
        async def timed(message) -> bool:
            try:
                await asyncio.wait_for(send(message), self.send_timeout_s)
                return True
            except asyncio.TimeoutError:
                return False

        ok = await timed({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        if ok:
            async for chunk in self.body_iterator:
                chunk = chunk if isinstance(chunk, (bytes, memoryview)) else chunk.encode(self.charset)
                if not await timed({"type": "http.response.body", "body": chunk, "more_body": True}):
                    ok = False
                    break
        if not ok:
            log.warning("a streaming client read nothing for %g s: request dropped", self.send_timeout_s)
            await self.body_iterator.aclose()
            return
        await timed({"type": "http.response.body", "body": b"", "more_body": False})
