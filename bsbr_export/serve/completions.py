"""The completions route's work, shared with the chat route (``serve.chat``): prompts checked
against the server's limits, ``GenRequest`` objects built from the sampling fields, tokens of
``--max-tokens-in-flight`` reserved, the requests submitted to the scheduler, and the answer
assembled (one JSON object) or streamed (server-sent events), with OpenAI-style errors.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass

import numpy as np
from fastapi import Request

from ..errors import InputError
from ..runtime import scoring
from ..runtime.sampling import SamplingOptions
from . import fanout
from .failures import QueueFull, ShuttingDown
from .flow import OVERFLOW_MESSAGE, BoundedStreamingResponse, RequestFlow
from .logprobs import Choice
from .protocol import MAX_BIAS, APIError, CompletionRequest, Sampling, error_body, parse_completion
from .request import Event, GenRequest
from .security import LOG_KEY
from .server import Server, server_of

RETRY_AFTER_S = 1


@dataclass(frozen=True)
class Shape:
    """What one route's answers look like: its choice class (text, tokens and log-probabilities
    as they come, and their JSON), the id's prefix and the objects' names."""

    choice: type
    prefix: str
    object: str
    chunk_object: str


def _prompts(srv: Server, p, param: str = "prompt") -> list[np.ndarray]:
    if isinstance(p, str) or (isinstance(p, list) and p and isinstance(p[0], int)):
        p = [p]
    if not p:
        raise APIError(400, "prompt is empty: give a string, a list of strings, or token ids", param=param)
    cfg = srv.config
    if len(p) > cfg.max_prompts:
        raise APIError(400, f"{len(p)} prompts in one request exceed --max-prompts {cfg.max_prompts}", param=param,
                       code="too_many_prompts")
    out = []
    for i, x in enumerate(p):
        x = srv.tokenizer.encode(x) if isinstance(x, str) else x
        if len(x) > cfg.max_prompt_tokens:  # before any array is made
            raise APIError(400, f"prompt {i} has {len(x)} tokens, over --max-prompt-tokens {cfg.max_prompt_tokens}",
                           param=param, code="prompt_too_long")
        try:
            ids = np.asarray(x, dtype=np.int64)
        except OverflowError:
            raise APIError(400, f"prompt {i}: token ids must lie in [0, {srv.vocab_size})", param=param) from None
        if ids.size == 0:
            raise APIError(400, f"prompt {i} is empty (no tokens)", param=param)
        if ids.max() >= srv.vocab_size:
            raise APIError(400, f"prompt {i}: token ids must lie in [0, {srv.vocab_size}), got {int(ids.max())}",
                           param=param)
        out.append(ids)
    return out


def _logit_bias(srv: Server, bias: dict | None) -> tuple | None:
    """OpenAI's ``logit_bias`` ({"token id": bias in [-100, 100]}) as (ids, biases) arrays."""
    if not bias:
        return None
    out = {}
    for k, v in bias.items():
        if not (k.isascii() and k.isdigit()):
            raise APIError(400, f"logit_bias: key {k!r} is not a token id (a non-negative integer as a string)",
                           param="logit_bias", code="invalid_value")
        if int(k) >= srv.vocab_size:
            raise APIError(400, f"logit_bias: token id {int(k)} is outside the vocabulary [0, {srv.vocab_size})",
                           param="logit_bias", code="invalid_value")
        if not -MAX_BIAS <= v <= MAX_BIAS:
            raise APIError(400, f"logit_bias: the bias of token {k} must lie in [-100, 100], got {v}",
                           param="logit_bias", code="invalid_value")
        out[int(k)] = float(v)
    return np.fromiter(out, np.int64, len(out)), np.fromiter(out.values(), np.float32, len(out))


def _requests(srv: Server, body: Sampling, prompts, sink, max_tokens: int) -> list[GenRequest]:
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
        opts = SamplingOptions(temperature=1.0 if body.temperature is None else body.temperature,
                               top_k=body.top_k if body.top_k and body.top_k > 0 else None,
                               top_p=None if body.top_p in (None, 1) else body.top_p,
                               repetition_penalty=body.repetition_penalty)
    except InputError as e:
        raise APIError(400, str(e), param=str(e).split(" ", 1)[0]) from None
    if body.seed is not None and not 0 <= body.seed < 2 ** 63:
        raise APIError(400, f"seed must lie in [0, 2**63), got {body.seed}", param="seed", code="invalid_value")
    if body.min_tokens > max_tokens:
        raise APIError(400, f"min_tokens {body.min_tokens} is over max_tokens {max_tokens}", param="min_tokens",
                       code="invalid_value")
    bias, lp = _logit_bias(srv, body.logit_bias), body.logprobs_wanted()
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    eos = srv.tokenizer.eos_token_id
    stops = frozenset() if body.ignore_eos or eos is None else frozenset({int(eos)})
    return [GenRequest(ids=ids, max_tokens=max_tokens, sink=(lambda ev, i=i: sink(i, ev)), opts=opts,
                       seed=body.seed, stop=stop, stop_tokens=stops, presence_penalty=body.presence_penalty or 0.0,
                       frequency_penalty=body.frequency_penalty or 0.0, top_logprobs=lp or 0,
                       logprobs=lp is not None, score_prompt=bool(getattr(body, "echo", False)) and lp is not None,
                       logit_bias=bias, min_tokens=body.min_tokens, skip_special_tokens=body.skip_special_tokens)
            for i, ids in enumerate(prompts)]


class _Choice(Choice):
    """A completions choice (``logprobs.Choice``) and the objects of its stream's chunks."""

    def opening(self) -> list[dict]:
        """The choice objects a stream starts with: the echoed prompt (max_tokens 0 ends there)."""
        return [{"index": self.index, "text": self.echo, "logprobs": None, "finish_reason": self.finish_reason}] \
            if (self.echo and not self.scores_prompt) or self.finish_reason is not None else []

    def streamed(self, ev: Event, frag: dict | None) -> dict | None:
        """The choice object of an event's chunk (None: nothing to send)."""
        return {"index": self.index, "text": self.piece, "logprobs": frag, "finish_reason": None} \
            if self.piece or frag is not None else None

    def closing(self) -> dict:
        return {"index": self.index, "text": "", "logprobs": None, "finish_reason": self.finish_reason}


def _usage_so_far(choices, k: int) -> dict:
    """The usage of a stream's chunks so far (``continuous_usage_stats``): prompt tokens once per
    prompt, the tokens streamed of every choice."""
    p, c = sum(ch.prompt_tokens for ch in choices[::k]), sum(len(ch.tokens) for ch in choices)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def check_model(srv: Server, model: str | None) -> None:
    if model is not None and model != srv.name:
        raise APIError(404, f"The model '{model}' does not exist (this server holds '{srv.name}')",
                       param="model", code="model_not_found")


def add_routes(app) -> None:
    """Register the completions route on ``app`` (``app.create_app``)."""

    @app.post("/v1/completions")
    async def completions(request: Request):
        srv = server_of(request.app)
        body = parse_completion(await request.body())
        return await complete(srv, request, body)


async def complete(srv: Server, request: Request, body: CompletionRequest):
    bad = body.unsupported()
    if bad is not None:
        raise bad
    check_model(srv, body.model)
    # a long text does not stall other streams
    prompts = await asyncio.get_running_loop().run_in_executor(None, _prompts, srv, body.prompt)
    max_tokens = min(16, srv.config.max_tokens_cap) if body.max_tokens is None else body.max_tokens
    return await generate(srv, request, body, prompts, max_tokens, COMPLETION, body.prompt)


async def generate(srv: Server, request: Request, body: Sampling, prompts: list[np.ndarray], max_tokens: int,
                   shape: Shape, logged):
    """Run ``prompts`` (checked token ids) through the scheduler and answer as ``shape`` says:
    one JSON object, or server-sent events when ``body.stream``. ``logged``: the prompt as
    --log-content writes it."""
    loop = asyncio.get_running_loop()
    k = fanout.per_prompt(body)  # completions drawn per prompt
    events = RequestFlow(srv, len(prompts) * k, srv.config.stream_buffer)
    deadline = loop.time() + srv.config.request_timeout_s
    info = request.scope.get(LOG_KEY, {})
    info["prompt_tokens"], info["completion_tokens"] = sum(int(p.size) for p in prompts), 0
    if srv.config.log_content:
        info["prompt"] = logged
    events.reqs = reqs = fanout.expand(_requests(srv, body, prompts, events.put, max_tokens), k, events.put)
    if reqs[0].score_prompt and not scoring.can_score(srv.engine):  # an export made before extend took logit_rows
        raise APIError(400, f"echo with logprobs: {scoring.NO_SCORES}", param="logprobs", code="unsupported_value")
    choices = await loop.run_in_executor(None, lambda: [shape.choice(srv, body, i * k + j, p)  # echo decoded here
                                                        for i, p in enumerate(prompts) for j in range(k)])
    head = {"id": f"{shape.prefix}{uuid.uuid4().hex}", "object": shape.object, "created": int(time.time()),
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
        so = body.stream_options
        usage = bool(so and so.include_usage) + bool(so and so.include_usage and so.continuous_usage_stats)
        return BoundedStreamingResponse(_stream(srv, {**head, "object": shape.chunk_object}, choices, reqs, events,
                                                watcher, usage, deadline, info), srv.config.send_timeout_s,
                                        media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
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
    return {**head, "choices": [c.json() for c in fanout.best(choices, body.n or 1, k)],
            "usage": fanout.usage(choices, reqs, k)}


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


async def _stream(srv: Server, head: dict, choices, reqs, events, watcher, usage: int, deadline: float, info: dict):
    """The answer as server-sent events; ``usage``: 0 none, 1 a last chunk with the usage
    (``include_usage``), 2 that and the usage so far on every chunk (``continuous_usage_stats``)."""
    k = reqs[0].forks + 1 if reqs else 1  # choices per prompt
    try:
        def chunk(choice: dict) -> bytes:
            return _sse({**head, "choices": [choice], **({"usage": _usage_so_far(choices, k) if usage == 2 else None}
                                                          if usage else {})})

        for ch in choices:
            for c in ch.opening():  # e.g. the echoed prompt; max_tokens 0 ends here
                yield chunk(c)
        left = sum(ch.finish_reason is None for ch in choices)
        while left:
            try:
                i, ev = await asyncio.wait_for(events.get(), max(0.0, deadline - asyncio.get_running_loop().time()))
            except asyncio.TimeoutError:
                yield _sse(_timeout(srv).body())
                return
            ch = choices[i]
            if ev.finish_reason is None:
                c = ch.streamed(ev, ch.add(ev))
                if c is not None:
                    yield chunk(c)
                continue
            ch.end(ev)
            left -= 1
            if ev.finish_reason in ("error", "cancelled"):
                yield _sse(error_body(OVERFLOW_MESSAGE if events.overflowed else ev.error
                                      or "the request was cancelled (server shutting down)", "server_error"))
                return
            yield chunk(ch.closing())
        if usage:
            yield _sse({**head, "choices": [], "usage": fanout.usage(choices, reqs, k)})
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


COMPLETION = Shape(_Choice, "cmpl-", "text_completion", "text_completion")
