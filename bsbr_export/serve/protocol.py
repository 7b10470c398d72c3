"""The OpenAI completions request (pydantic, strict: wrong types and unknown fields are refused)
and OpenAI-style errors ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..runtime.text import MAX_STOP_CHARS

MAX_STOP = 4  # as OpenAI
MAX_TOP_LOGPROBS = 5  # as OpenAI's completions endpoint


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


TokenIds = list[Annotated[int, Field(ge=0)]]
Prompt = Union[str, list[str], TokenIds, list[TokenIds]]


class CompletionRequest(_Strict):
    """``POST /v1/completions``: OpenAI's fields (defaults as OpenAI's) and three extensions
    (``top_k``, ``repetition_penalty``, ``ignore_eos``). Fields that OpenAI has and this server
    does not support are accepted here and refused by ``unsupported`` with a 400 naming them."""

    model: str
    prompt: Prompt
    max_tokens: Annotated[int, Field(ge=0)] | None = 16
    temperature: Annotated[float, Field(ge=0)] | None = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] | None = 1.0
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    echo: bool | None = False
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = 0.0
    seed: int | None = None
    user: str | None = None
    best_of: int | None = None
    suffix: str | None = None
    logit_bias: dict[str, float] | None = None
    # extensions (as vLLM's)
    top_k: Annotated[int, Field(ge=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    ignore_eos: bool = False

    def unsupported(self) -> APIError | None:
        """The first OpenAI option set to a value this server does not support, as a 400."""
        if self.suffix:
            return APIError(400, "suffix is not supported (no insertion mode)", param="suffix",
                            code="unsupported_value")
        if self.logit_bias:
            return APIError(400, "logit_bias is not supported", param="logit_bias", code="unsupported_value")
        if self.stream_options is not None and not self.stream:
            return APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
        if isinstance(self.stop, list) and any(not s for s in self.stop) or self.stop == "":
            return APIError(400, "stop strings must be non-empty", param="stop")
        longest = max(map(len, [self.stop] if isinstance(self.stop, str) else self.stop or []), default=0)
        if longest > MAX_STOP_CHARS:
            return APIError(400, f"a stop string has {longest} characters, over the limit of {MAX_STOP_CHARS}",
                            param="stop", code="stop_too_long")
        return None


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


def parse_completion(raw: bytes) -> CompletionRequest:
    try:
        return CompletionRequest.model_validate_json(raw or b"")
    except ValidationError as e:
        raise validation_error(e) from None
