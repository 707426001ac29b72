"""Request bodies, validated at the API boundary with OpenAI's ranges, and their translation into
the worker's sampling settings. Nothing that passes here can fail inside the model thread as a
bad parameter; the worker still fails such a row alone if one ever does."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..generation import SamplingParams
from .errors import ApiError
from .store import check_session_name
from .worker import LogitAdjust

# torch.Generator.manual_seed takes -2**63 .. 2**64 - 1; OpenAI documents an integer seed. The
# signed 64-bit range is what most clients and servers (vLLM included) accept.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
# Below this a temperature is greedy decoding: dividing logits by it would overflow to inf.
GREEDY_BELOW = 1e-5


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        """The message's text, its parts joined."""
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""

    def template_role(self) -> str:
        """The role for the chat template, which knows no "developer"."""
        return "system" if self.role == "developer" else self.role


class StreamOptions(BaseModel):
    include_usage: bool = False


Penalty = Annotated[float, Field(ge=-2, le=2)]
Bias = Annotated[float, Field(ge=-100, le=100)]
TokenId = Annotated[int, Field(ge=0)]


# OpenAI request fields that ask for nothing this server would do otherwise: accepted as no-ops.
NO_OP_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls"})


class ChatRequest(BaseModel):
    """OpenAI's chat completion request. Every field is honoured or refused (`refuse_unsupported`):
    none is silently dropped, so a client relying on one learns at once that it does not work."""

    model_config = ConfigDict(extra="allow")

    messages: list[Message] = Field(min_length=1)
    model: str | None = Field(None, max_length=256)
    session_id: str | None = Field(None, max_length=256)
    # A library to route over instead of a session, mixing library_k documents per token.
    library: str | None = Field(None, max_length=256)
    library_k: int | None = Field(None, ge=1, le=64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    n: int | None = Field(None, ge=1, le=1)  # one choice per request
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[TokenId, Bias] | None = Field(None, max_length=1024)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # Tool and function calls are not implemented: accepted only where they ask for nothing
    # (refuse_unsupported). response_format: text, or JSON by grammar (grammar.py).
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    functions: list[dict] | None = None
    function_call: str | dict | None = None
    response_format: dict | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop must be up to 4 non-empty strings")
        return stops

    def wanted_tokens(self) -> int | None:
        """max_tokens, or its newer name max_completion_tokens; None when neither is given."""
        return self.max_completion_tokens if self.max_tokens is None else self.max_tokens

    def refuse_unsupported(self) -> None:
        """ApiError 400 `unsupported_parameter`, naming the field, for a request that asks for
        what this server does not do: tool or function calls (tools are accepted only with
        tool_choice "none"), a response_format other than text, json_object and json_schema
        (grammar.py), logprobs, or a field that is not OpenAI's (other than NO_OP_FIELDS)."""

        def refuse(param: str, message: str):
            raise ApiError(400, message, "unsupported_parameter", param)

        if self.logprobs or self.top_logprobs:
            refuse("logprobs", "this server does not return logprobs")
        if self.tool_choice not in (None, "none", "auto"):
            refuse("tool_choice", 'this server calls no tools: tool_choice may only be "none"')
        if self.tools and self.tool_choice != "none":
            refuse("tools", 'this server calls no tools: send none, or tool_choice "none"')
        if self.functions or self.function_call not in (None, "none"):
            refuse("functions", "this server calls no functions")
        kind = (self.response_format or {}).get("type", "text")
        if kind not in ("text", "json_object", "json_schema"):
            refuse("response_format", f"response_format {kind!r}: text, json_object or json_schema")
        schema = (self.response_format or {}).get("json_schema")
        if kind == "json_schema" and not (isinstance(schema, dict) and "schema" in schema):
            raise ApiError(
                400,
                'response_format json_schema needs {"json_schema": {"name": ..., "schema": {...}}}',
                "invalid_value",
                "response_format",
            )
        for name in sorted((self.model_extra or {}).keys() - NO_OP_FIELDS):
            refuse(name, f"unknown or unsupported parameter {name!r}")

    def sampling(self, max_new_tokens: int, vocab_size: int) -> tuple[SamplingParams, LogitAdjust]:
        """The worker's settings for this request; ApiError (400) for what this server cannot
        do (refuse_unsupported) or what does not fit the model."""
        self.refuse_unsupported()
        bias = self.logit_bias or {}
        if any(t >= vocab_size for t in bias):
            raise ApiError(
                400,
                f"logit_bias names a token id beyond the model's vocabulary ({vocab_size})",
                "invalid_value",
                "logit_bias",
            )
        temperature = 1.0 if self.temperature is None else self.temperature
        params = SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=0.0 if temperature < GREEDY_BELOW else temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            stop=self.stop or [],
            seed=self.seed,
        )
        adjust = LogitAdjust(self.presence_penalty or 0.0, self.frequency_penalty or 0.0, bias)
        return params, adjust


class DocumentBody(BaseModel):
    text: str
    name: str | None = Field(None, max_length=256)


class SessionBody(BaseModel):
    """POST /v1/sessions: an optional unique name, usable as `model` in chat requests."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        return None if v is None else check_session_name(v)
