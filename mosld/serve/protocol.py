"""The OpenAI request bodies the server takes, checked before anything reaches the model.

The bodies are parsed here rather than by FastAPI's automatic body binding so that every bad request gets an
OpenAI-style error (``{"error": {"message", "type", "param", "code"}}``) with a 4xx status and a message that
names the field: bytes that are not UTF-8, text that is not JSON, a field missing or of the wrong type
(pydantic in strict mode: ``"max_tokens": "8"`` is refused, not converted).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class RequestError(Exception):
    """A request the server refuses: answered with ``status`` and the OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class SamplingFields(BaseModel):
    """The fields both endpoints share. Unknown fields are ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    ignore_eos: bool = False  # vLLM's extension: answers of exactly max_tokens, for benchmarks
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise RequestError(400, f"stop: at most 4 stop strings, got {len(stops)}", "stop")
        return tuple(stops)


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def as_template_message(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None  # the newer name of max_tokens in OpenAI's chat API


class CompletionRequest(SamplingFields):
    # A string, or token ids (what OpenAI's API also takes): ids let a client send exactly the prompt it tokenized.
    prompt: str | list[int]
    echo: bool = False


def parse_body(raw: bytes, schema: type[SamplingFields]) -> SamplingFields:
    """The request body as ``schema``, or a ``RequestError`` (400) that says what is wrong with it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RequestError(400, f"the request body is not valid UTF-8 (byte {err.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise RequestError(400, f"the request body is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise RequestError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        request = schema.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in err.errors(include_url=False)
        )
        raise RequestError(400, problems, param) from None
    if request.n != 1:
        raise RequestError(400, f"n: only n=1 is served, got {request.n}", "n")
    return request
