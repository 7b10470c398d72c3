"""The requests of the routes (pydantic, strict: wrong types and unknown fields are refused):
OpenAI's completions and chat completions, vLLM's tokenize and detokenize; and OpenAI-style
errors ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..runtime.text import MAX_STOP_CHARS

MAX_STOP = 4  # as OpenAI
MAX_TOP_LOGPROBS = 5  # as OpenAI's completions endpoint
MAX_CHAT_TOP_LOGPROBS = 20  # as OpenAI's chat endpoint


class APIError(Exception):
    """An error answered as OpenAI does: HTTP status and the ``error`` object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: usage on every chunk (with include_usage)


TokenIds = list[Annotated[int, Field(ge=0)]]
Prompt = Union[str, list[str], TokenIds, list[TokenIds]]
MAX_BIAS = 100.0  # as OpenAI: logit_bias values lie in [-100, 100]


class Sampling(_Strict):
    """The fields the completions and chat routes share: OpenAI's sampling options (defaults as
    OpenAI's) and vLLM's extensions (``top_k``, ``repetition_penalty``, ``ignore_eos``,
    ``min_tokens``, ``skip_special_tokens``). Fields OpenAI has that this server does not
    support are accepted here and refused by ``unsupported`` with a 400 naming them."""

    model: str
    temperature: Annotated[float, Field(ge=0)] | None = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] | None = 1.0
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = 0.0
    seed: int | None = None
    user: str | None = None  # accepted, not used
    logit_bias: dict[str, float] | None = None
    # extensions (as vLLM's)
    top_k: Annotated[int, Field(ge=-1)] | None = None  # -1 or 0: off (vLLM)
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    ignore_eos: bool = False
    min_tokens: Annotated[int, Field(ge=0)] = 0
    skip_special_tokens: bool = True

    def unsupported(self) -> APIError | None:
        """The first option set to a value this server does not support, as a 400."""
        if self.stream_options is not None and not self.stream:
            return APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
        if isinstance(self.stop, list) and any(not s for s in self.stop) or self.stop == "":
            return APIError(400, "stop strings must be non-empty", param="stop")
        longest = max(map(len, [self.stop] if isinstance(self.stop, str) else self.stop or []), default=0)
        if longest > MAX_STOP_CHARS:
            return APIError(400, f"a stop string has {longest} characters, over the limit of {MAX_STOP_CHARS}",
                            param="stop", code="stop_too_long")
        return None

    def logprobs_wanted(self) -> int | None:
        """Top log-probabilities per token (0: the chosen token's only), None: no log-probabilities."""
        raise NotImplementedError


class CompletionRequest(Sampling):
    """``POST /v1/completions``."""

    prompt: Prompt
    max_tokens: Annotated[int, Field(ge=0)] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> APIError | None:
        if self.suffix:
            return APIError(400, "suffix is not supported (no insertion mode)", param="suffix",
                            code="unsupported_value")
        return super().unsupported()

    def logprobs_wanted(self) -> int | None:
        return self.logprobs


class ContentPart(BaseModel):
    """A part of a message's content; only text parts are supported (``unsupported`` says so)."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None


class Message(_Strict):
    """One chat message: its text content (a string or text parts, joined with newlines), as
    given to the chat template; ``name`` is passed to the template too."""

    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str | None:
        if isinstance(self.content, list):
            return "\n".join(p.text or "" for p in self.content)
        return self.content


class ChatCompletionRequest(Sampling):
    """``POST /v1/chat/completions``: OpenAI's chat fields (tools and structured output are
    refused), vLLM's ``add_generation_prompt``, ``continue_final_message``, ``chat_template_kwargs``."""

    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=0)] | None = None  # OpenAI's older name of max_completion_tokens
    max_completion_tokens: Annotated[int, Field(ge=0)] | None = None
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_CHAT_TOP_LOGPROBS)] | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    response_format: dict | None = None
    # accepted, not used: they change nothing in what a model without tools generates
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    metadata: dict | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # extensions (as vLLM's)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict | None = None

    def unsupported(self) -> APIError | None:
        return _non_text(self.messages) or self._unsupported()

    def _unsupported(self) -> APIError | None:
        if self.tools:
            return APIError(400, "tools are not supported (this server has no tool calling)", param="tools",
                            code="unsupported_value")
        if self.tool_choice not in (None, "none", "auto"):
            return APIError(400, "tool_choice is not supported (this server has no tool calling)",
                            param="tool_choice", code="unsupported_value")
        if self.response_format is not None and self.response_format.get("type") != "text":
            return APIError(400, "response_format other than {\"type\": \"text\"} is not supported (no "
                            "structured output)", param="response_format", code="unsupported_value")
        if self.top_logprobs and not self.logprobs:
            return APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if self.add_generation_prompt and self.continue_final_message:
            return APIError(400, "continue_final_message and add_generation_prompt cannot both be true",
                            param="continue_final_message")
        return super().unsupported()

    def logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def tokens_wanted(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def _non_text(messages) -> APIError | None:
    for i, m in enumerate(messages or ()):
        for j, part in enumerate(m.content if isinstance(m.content, list) else ()):
            if part.type != "text" or part.text is None:
                return APIError(400, f"messages[{i}].content[{j}]: only text parts are supported, got type "
                                f"{part.type!r}" + ("" if part.type != "text" else " without text"),
                                param=f"messages.{i}.content.{j}", code="unsupported_value")
    return None


class TokenizeRequest(_Strict):
    """``POST /tokenize`` as vLLM's: a ``prompt`` or chat ``messages`` (rendered by the chat template)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool | None = None  # default: true for a prompt, false for messages (as vLLM)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict | None = None
    return_token_strs: bool = False


class DetokenizeRequest(_Strict):
    """``POST /detokenize`` as vLLM's."""

    model: str | None = None
    tokens: list[int]


def validation_error(e: ValidationError) -> APIError:
    """pydantic's first complaint as a 400 naming the field."""
    errs = e.errors(include_url=False)
    first = errs[0] if errs else {"loc": (), "msg": str(e), "type": ""}
    loc = [str(x) for x in first.get("loc", ())]
    # drop union-branch names pydantic adds (e.g. "str", "list[int]") to keep the field path
    path = ".".join(x for x in loc if not _is_branch(x))
    kind = first.get("type", "")
    if kind == "json_invalid":
        return APIError(400, f"the body is not valid JSON ({first.get('msg', '')})", code="invalid_json")
    if kind == "model_type" or (not path and kind.endswith("_type")):
        return APIError(400, "the body must be a JSON object", code="invalid_type")
    if kind == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {path}", param=path,
                        code="unknown_parameter")
    if kind == "missing":
        return APIError(400, f"missing required parameter: {path}", param=path, code="missing_required_parameter")
    return APIError(400, f"invalid value for {path}: {first.get('msg', '')}", param=path or None,
                    code="invalid_value" if not kind.endswith("_type") else "invalid_type")


def _is_branch(x: str) -> bool:
    return x in ("str", "int", "float", "bool", "list[str]", "list[int]", "list[list[int]]",
                 "constrained-int", "constrained-float", "list[constrained-int]",
                 "list[list[constrained-int]]") or x.startswith(("function-", "list[", "dict["))


def parse(model: type[BaseModel], raw: bytes):
    """A request body as ``model`` (pydantic), or the 400 of its first complaint."""
    try:
        return model.model_validate_json(raw or b"")
    except ValidationError as e:
        raise validation_error(e) from None


def parse_completion(raw: bytes) -> CompletionRequest:
    return parse(CompletionRequest, raw)
