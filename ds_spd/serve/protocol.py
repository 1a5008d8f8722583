"""The OpenAI-compatible API's request bodies and error objects (pydantic), as vLLM's ``protocol.py`` holds them.

A field this server cannot honour is refused by name, never ignored; an unknown field is refused too; booleans are
not numbers. The bodies' constraints are what the published OpenAPI schema states (ds_spd.serve.app).
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, Strict, TypeAdapter, ValidationError,
                      field_validator, model_validator)

from ds_spd.serve.sampling import SamplingParams
from ds_spd.serve.state import RequestError


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = False


#: Fields of OpenAI's API this server cannot honour, with the value that means "not used" (accepted as such).
UNSUPPORTED = {"suffix": (None,), "best_of": (None, 1), "tools": (None, []), "tool_choice": (None, "none"),
               "response_format": (None, {"type": "text"}), "parallel_tool_calls": (None,), "functions": (None,),
               "function_call": (None,)}


def _integral(v):
    """JSON Schema's integer (the published schema's type): 3.0 is 3. Booleans and text stay refused."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


JsonInt = Annotated[int, BeforeValidator(_integral), Strict()]


def _bounded(**bounds):
    """A :data:`JsonInt` within ``bounds`` (ge, gt, le, lt), the bounds inside the type: on an Optional field with
    a before-validator, bounds given to the field are enforced but published under pydantic's own names (``ge``),
    which no JSON Schema reader knows."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral), Strict()]


MAX_STOPS = 4          # stop strings a request may give
MAX_BIASED = 300       # token ids a logit_bias may name
BIAS_LIMIT = 100       # |bias| at most
_INT64 = 2**63   # seeds, token counts: what a 64-bit integer holds (a 5000-digit number is refused by name)
_PENALTY = dict(ge=-2, le=2, strict=True)


class _Sampling(_Body):
    model: str
    max_tokens: Optional[_bounded(gt=0, lt=_INT64)] = None
    temperature: float = Field(1.0, ge=0, le=2, strict=True)
    top_p: float = Field(1.0, gt=0, le=1, strict=True)
    top_k: JsonInt = Field(0, ge=-1, lt=_INT64, strict=True,
                       description="vLLM's extension: sample from the k best tokens (0 or -1: all)")
    ignore_eos: bool = Field(False, strict=True,
                             description="vLLM's extension: go on past end-of-sequence up to max_tokens")
    seed: Optional[_bounded(ge=-_INT64, lt=_INT64)] = None
    stop: Union[str, list[str], None] = None
    n: JsonInt = Field(1, ge=1, le=16, strict=True)
    stream: bool = Field(False, strict=True)
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None   # metadata for the client's own accounting; not used
    presence_penalty: Optional[float] = Field(None, **_PENALTY)
    frequency_penalty: Optional[float] = Field(None, **_PENALTY)
    repetition_penalty: Optional[float] = Field(None, gt=0, le=10, strict=True,
                                                description="vLLM's extension: > 1 discourages prompt and output tokens")
    logit_bias: Optional[dict[str, float]] = Field(None, description=f"token id (as a string) -> bias in [-{BIAS_LIMIT}, {BIAS_LIMIT}]")
    min_tokens: JsonInt = Field(0, ge=0, lt=_INT64, strict=True,
                            description="vLLM's extension: no end-of-sequence before this many tokens")
    suffix: Any = None
    best_of: Any = None
    tools: Any = None
    tool_choice: Any = None
    response_format: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None

    @model_validator(mode="after")
    def _refuse_unsupported(self):
        for name, unused in UNSUPPORTED.items():
            if getattr(self, name) not in unused:
                raise RequestError(name, f"'{name}' is not supported by this server (it would be ignored)")
        if self.stream_options is not None and not self.stream:
            raise RequestError("stream_options", "'stream_options' needs 'stream': true")
        return self

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if any(not s for s in stops) or len(stops) > MAX_STOPS:
            raise ValueError(f"stop takes up to {MAX_STOPS} non-empty strings")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        if v is None:
            return v
        if len(v) > MAX_BIASED or any(not k.isdigit() or not -BIAS_LIMIT <= b <= BIAS_LIMIT for k, b in v.items()):
            raise ValueError(f"logit_bias maps up to {MAX_BIASED} token ids (strings of digits) to biases in "
                             f"[-{BIAS_LIMIT}, {BIAS_LIMIT}]")
        return v

    def params(self, max_tokens: int, logprobs: int | None = None, prompt_logprobs: int | None = None
               ) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=max(self.top_k, 0), seed=self.seed, stop=tuple(self.stop or ()),
                              ignore_eos=self.ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                              presence_penalty=self.presence_penalty or 0.0,
                              frequency_penalty=self.frequency_penalty or 0.0,
                              repetition_penalty=self.repetition_penalty or 1.0,
                              logit_bias=tuple((int(k), b) for k, b in (self.logit_bias or {}).items()),
                              min_tokens=self.min_tokens)


_Prompt = Union[str, list[str], list[JsonInt], list[list[JsonInt]]]
_PROMPT_LISTS = {str: TypeAdapter(list[str]), int: TypeAdapter(list[JsonInt]), float: TypeAdapter(list[JsonInt]),
                 list: TypeAdapter(list[list[JsonInt]])}


class CompletionBody(_Sampling):
    prompt: _Prompt
    logprobs: Optional[_bounded(ge=0, le=20)] = Field(
        None, description="log-probabilities of each token, with this many alternatives")
    echo: bool = Field(False, strict=True, description="the prompt before the completion (with logprobs: scored)")

    def sampling(self, max_tokens: int) -> SamplingParams:
        return self.params(max_tokens, self.logprobs, self.logprobs if self.echo else None)

    @field_validator("prompt", mode="plain", json_schema_input_type=_Prompt)
    @classmethod
    def _prompt(cls, v):
        """The form is decided by the first element, then checked once (a union would try every form on every
        element: a second on a 4 MB list of token ids, holding the interpreter)."""
        if isinstance(v, str):
            return v
        adapter = _PROMPT_LISTS.get(type(v[0]) if isinstance(v, list) and v else int) if isinstance(v, list) else None
        if adapter is None:
            raise ValueError("prompt is a string, a list of strings, a list of token ids or a list of such lists")
        try:
            return adapter.validate_python(v, strict=True)
        except ValidationError as err:
            first = err.errors()[0]
            raise ValueError(f"prompt{''.join(f'[{i}]' for i in first['loc'])}: {first['msg']}") from None


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[dict]]
    name: Optional[str] = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise RequestError("messages", f"content part of type {part.get('type')!r} is not supported (text only)")
            parts.append(part.get("text", ""))
        return "".join(parts)


class ChatBody(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[_bounded(gt=0, lt=_INT64)] = None
    logprobs: bool = Field(False, strict=True)
    top_logprobs: Optional[_bounded(ge=0, le=20)] = None

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs", "'top_logprobs' needs 'logprobs': true")
        return self

    def sampling(self, max_tokens: int) -> SamplingParams:
        return self.params(max_tokens, (self.top_logprobs or 0) if self.logprobs else None)


_ERROR_TYPES = {401: "authentication_error", 429: "rate_limit_error", 503: "service_unavailable"}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def validation_error(errors: list[dict]) -> RequestError:
    """The first of pydantic's (or FastAPI's) validation errors as a 400 that names its field."""
    err = errors[0]
    ctx_err = (err.get("ctx") or {}).get("error")
    if isinstance(ctx_err, RequestError):
        return ctx_err
    loc = [str(p) for p in err.get("loc", ()) if p != "body" and not isinstance(p, int)]
    param = loc[0] if loc else None
    if err.get("type") == "json_invalid":
        return RequestError(None, f"request body is not valid JSON (UTF-8): {err.get('msg')}", "invalid_json")
    if err.get("type") == "extra_forbidden":
        return RequestError(param, f"unknown field '{'.'.join(loc)}'", "unknown_field")
    what = "missing" if err.get("type") == "missing" else err.get("msg", "invalid value")
    return RequestError(param, f"{'.'.join(loc) or 'body'}: {what}", err.get("type"))
