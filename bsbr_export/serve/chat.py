"""Chat: ``POST /v1/chat/completions`` (OpenAI's) and ``POST /tokenize`` / ``POST /detokenize``
(vLLM's shapes).

Messages become one prompt through a Jinja chat template, rendered as ``transformers`` renders
one (a sandboxed environment, ``trim_blocks``/``lstrip_blocks``, ``raise_exception``, ``tojson``,
``strftime_now``; variables ``messages``, ``add_generation_prompt``, ``bos_token``,
``eos_token`` and the request's ``chat_template_kwargs``): the file of ``serve --chat-template``,
else ``chat_template`` of the export's ``tokenizer_config.json``. Without one, a chat request
gets 400 naming ``--chat-template`` (GPT-2 ships no template). The prompt then runs through the
completions route's work (``completions.generate``): the same scheduler, sampling fields, limits
and errors; the answer is shaped as OpenAI's chat objects (``message`` / ``delta``, chat
log-probabilities ``{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}``).
"""

from __future__ import annotations

import asyncio
import json
import threading
from datetime import datetime
from pathlib import Path

import numpy as np
from fastapi import Request

from ..errors import InputError
from .completions import Shape, _prompts, check_model, generate
from .protocol import APIError, ChatCompletionRequest, DetokenizeRequest, TokenizeRequest, _non_text, parse
from .request import Event
from .server import Server, server_of

TEMPLATE_CONFIG = "tokenizer_config.json"
_lock = threading.Lock()


def _config_template(export_dir) -> str | None:
    """``chat_template`` of the export's tokenizer config (a string, or a list of named templates:
    the one named "default")."""
    d = Path(export_dir)
    for f in (d / "bsbr" / TEMPLATE_CONFIG, d / TEMPLATE_CONFIG):
        if f.is_file():
            t = json.loads(f.read_text()).get("chat_template")
            if isinstance(t, list):
                t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
            return t if isinstance(t, str) and t.strip() else None
    return None


def compile_template(source: str, origin: str):
    """A Jinja template as ``transformers`` compiles chat templates; InputError naming ``origin``."""
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise InputError(f"{origin}: not a valid Jinja template ({e})") from None


def load_template(config):
    """The compiled chat template of a ``ServeConfig`` (its ``chat_template`` file, else the
    export's tokenizer config), or None."""
    if config.chat_template:
        f = Path(config.chat_template)
        try:
            return compile_template(f.read_text(encoding="utf-8"), str(f))
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"--chat-template {f}: cannot be read ({e})") from None
    source = _config_template(config.export_dir)
    return None if source is None else compile_template(source, f"chat_template of {TEMPLATE_CONFIG}")


def _template(srv: Server):
    with _lock:
        if not hasattr(srv, "chat_template"):
            srv.chat_template = load_template(srv.config)
    if srv.chat_template is None:
        raise APIError(400, "this model has no chat template: start the server with --chat-template FILE (a Jinja "
                       "chat template) or add chat_template to the export's tokenizer_config.json", param="messages",
                       code="chat_template_missing")
    return srv.chat_template


def render(srv: Server, body) -> str:
    """The prompt text of ``body.messages`` through the chat template (400 where it fails)."""
    from jinja2 import TemplateError

    tpl = _template(srv)
    messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name is not None else {})}
                for m in body.messages]
    eos = srv.tokenizer.eos_token_id
    special = srv.tokenizer.decode([eos], skip_special_tokens=False) if eos is not None else ""
    try:
        text = tpl.render(**{**(body.chat_template_kwargs or {}), "messages": messages,
                             "add_generation_prompt": body.add_generation_prompt, "bos_token": special,
                             "eos_token": special})
    except TemplateError as e:
        raise APIError(400, f"the chat template failed on these messages: {e}", param="messages") from None
    if body.continue_final_message:  # the prompt ends with the last message's content, left open
        last = messages[-1]["content"] or ""
        cut = text.rfind(last)
        if not last or cut < 0:
            raise APIError(400, "continue_final_message: the last message's content is not in the rendered prompt",
                           param="continue_final_message")
        text = text[:cut + len(last)]
    return text


class _ChatChoice:
    """One chat answer's text, tokens and log-probabilities as they come (the shape of
    ``completions._Choice`` with OpenAI's chat objects)."""

    def __init__(self, srv: Server, body: ChatCompletionRequest, index: int, prompt: np.ndarray):
        self.index, self.prompt_tokens, self.tok = index, int(prompt.size), srv.tokenizer
        self.text, self.finish_reason, self.error, self.tokens = "", None, None, []
        self.top, self.lp = body.logprobs_wanted(), []

    def _entry(self, token: int, logprob: float) -> dict:
        s = self.tok.decode([token], skip_special_tokens=False)
        b = self.tok.token_bytes(token) if self.tok.byte_level and token not in self.tok.special_ids else s.encode()
        return {"token": s, "logprob": logprob, "bytes": list(b)}

    def add(self, ev: Event) -> dict | None:
        self.tokens.append(ev.token)
        self.text += ev.piece
        if self.top is None:
            return None
        entry = {**self._entry(ev.token, ev.logprob),
                 "top_logprobs": [self._entry(t, lp) for t, lp in (ev.top or {}).items()][:self.top]}
        self.lp.append(entry)
        return {"content": [entry]}

    def opening(self) -> list[dict]:
        first = {"index": self.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None}
        return [first] if self.finish_reason is None else [first, self.closing()]

    def streamed(self, ev: Event, frag: dict | None) -> dict | None:
        return {"index": self.index, "delta": {"content": ev.piece}, "logprobs": frag, "finish_reason": None} \
            if ev.piece or frag is not None else None

    def closing(self) -> dict:
        return {"index": self.index, "delta": {}, "logprobs": None, "finish_reason": self.finish_reason}

    def end(self, ev: Event) -> None:
        self.finish_reason, self.error = ev.finish_reason, ev.error

    def json(self) -> dict:
        return {"index": self.index, "message": {"role": "assistant", "content": self.text},
                "logprobs": {"content": self.lp} if self.top is not None else None,
                "finish_reason": self.finish_reason}


CHAT = Shape(_ChatChoice, "chatcmpl-", "chat.completion", "chat.completion.chunk")


async def _off_loop(fn, *args):
    """Template rendering and tokenization off the event loop (a long prompt stalls no stream)."""
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


async def chat_completion(srv: Server, request: Request, body: ChatCompletionRequest):
    bad = body.unsupported()
    if bad is not None:
        raise bad
    check_model(srv, body.model)
    text = await _off_loop(render, srv, body)
    ids = await _off_loop(srv.tokenizer.encode, text)  # the template writes any special tokens itself
    prompts = _prompts(srv, [ids], param="messages")
    wanted = body.tokens_wanted()
    room = max(1, min(srv.config.max_tokens_cap, srv.max_len - len(ids)))  # as vLLM: up to the context
    return await generate(srv, request, body, prompts, room if wanted is None else wanted, CHAT, text)


async def tokenize(srv: Server, body: TokenizeRequest) -> dict:
    check_model(srv, body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give either prompt or messages", param="prompt")
    bad = _non_text(body.messages)
    if bad is not None:
        raise bad
    if body.prompt is not None:
        ids = await _off_loop(srv.tokenizer.encode, body.prompt, body.add_special_tokens is not False)
    else:
        text = await _off_loop(render, srv, body)
        ids = await _off_loop(srv.tokenizer.encode, text, bool(body.add_special_tokens))
    strs = [srv.tokenizer.decode([t], skip_special_tokens=False) for t in ids] if body.return_token_strs else None
    return {"count": len(ids), "max_model_len": srv.max_len, "tokens": ids, "token_strs": strs}


async def detokenize(srv: Server, body: DetokenizeRequest) -> dict:
    check_model(srv, body.model)
    bad = next((t for t in body.tokens if not 0 <= t < srv.vocab_size), None)
    if bad is not None:
        raise APIError(400, f"tokens: token id {bad} is outside the vocabulary [0, {srv.vocab_size})",
                       param="tokens", code="invalid_value")
    text = await _off_loop(lambda: srv.tokenizer.decode(body.tokens, skip_special_tokens=False))
    return {"prompt": text}


def add_routes(app) -> None:
    """Register the chat, tokenize and detokenize routes on ``app`` (``app.create_app``)."""
    @app.post("/v1/chat/completions")
    async def _chat(request: Request):
        body = parse(ChatCompletionRequest, await request.body())
        return await chat_completion(server_of(request.app), request, body)

    @app.post("/tokenize")
    async def _tokenize(request: Request):
        return await tokenize(server_of(request.app), parse(TokenizeRequest, await request.body()))

    @app.post("/detokenize")
    async def _detokenize(request: Request):
        return await detokenize(server_of(request.app), parse(DetokenizeRequest, await request.body()))
