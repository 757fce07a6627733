"""The OpenAI-compatible HTTP routes (FastAPI), in front of the batching engine.

Routes: ``POST /v1/chat/completions`` (the tokenizer's chat template), ``POST /v1/completions`` (a prompt string
or token ids), ``GET /v1/models``, ``GET /health``. A request is checked completely (``mosld.serve.protocol``,
then the model name, the prompt and token budget against the context) before it is queued, so a bad request
costs the model nothing and gets a 4xx JSON error. Streaming answers are server-sent events in OpenAI's chunk
format, ending with ``data: [DONE]``. A client that goes away (mid-stream or while waiting) cancels its row.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mosld.evaluation.decoding import DecodeOptions, RowUpdate

from .engine import BatchStarted, Engine, EngineError, Job
from .protocol import ChatRequest, CompletionRequest, RequestError, SamplingFields, parse_body

BATCH_HEADER = "x-mosld-batch-rows"  # how many requests decoded together with this one
# How often a waiting non-streamed request checks that its client is still there.
DISCONNECT_POLL_SECONDS = 0.5


class Server:
    """What the routes need: the engine, the served model's name and limits."""

    def __init__(self, engine: Engine, name: str, context_length: int, max_tokens_limit: int, description: str):
        self.engine, self.name, self.context_length = engine, name, context_length
        self.max_tokens_limit, self.description = max_tokens_limit, description
        self.created = int(time.time())

    def check_model(self, request: SamplingFields) -> None:
        if request.model != self.name:
            raise RequestError(404, f"model {request.model!r} is not served here; this server has {self.name!r}",
                               "model", "model_not_found")  # fmt: skip

    def options(self, request: SamplingFields, prompt: list[int], requested: int | None) -> DecodeOptions:
        """The decoder's options after the budget checks: the prompt and its answer must fit the context."""
        if not prompt:
            raise RequestError(400, "the prompt is empty", "prompt")
        room = self.context_length - len(prompt)
        if room <= 0:
            raise RequestError(400, f"the prompt has {len(prompt)} tokens; this model's context is "
                               f"{self.context_length} tokens", "messages", "context_length_exceeded")  # fmt: skip
        if requested is None:
            requested = min(room, self.max_tokens_limit)
        elif requested <= 0:
            raise RequestError(400, f"max_tokens: expected a positive number, got {requested}", "max_tokens")
        elif requested > self.max_tokens_limit:
            raise RequestError(400, f"max_tokens: at most {self.max_tokens_limit} on this server, got {requested}",
                               "max_tokens")  # fmt: skip
        elif requested > room:
            raise RequestError(400, f"max_tokens: the prompt ({len(prompt)} tokens) and {requested} new tokens "
                               f"exceed this model's context of {self.context_length} tokens", "max_tokens",
                               "context_length_exceeded")  # fmt: skip
        return DecodeOptions(requested, request.stop_strings(), request.temperature, request.top_p, request.seed,
                             request.ignore_eos)  # fmt: skip

    def chat_prompt(self, request: ChatRequest) -> list[int]:
        tokenizer = self.engine.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise RequestError(400, "this model's tokenizer has no chat template: use /v1/completions", "messages")
        messages = [m.as_template_message() for m in request.messages]
        # As generation tasks encode chat prompts (mosld.data.generation): the template's text, then its tokens
        # without added special tokens (the template writes its own), so served and evaluated prompts are one.
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as err:  # templates raise on conversations they do not take (e.g. roles out of order)
            raise RequestError(400, f"messages: the chat template refused them: {err}", "messages") from None
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def completion_prompt(self, request: CompletionRequest) -> list[int]:
        if isinstance(request.prompt, str):
            return self.engine.tokenizer(request.prompt, add_special_tokens=True)["input_ids"]
        vocab = len(self.engine.tokenizer)
        bad = [t for t in request.prompt if not 0 <= t < vocab]
        if bad:
            raise RequestError(400, f"prompt: token ids must be in [0, {vocab}), got {bad[:3]}", "prompt")
        return list(request.prompt)


def error_response(err: RequestError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def usage(prompt: list[int], update: RowUpdate) -> dict[str, int]:
    return {"prompt_tokens": len(prompt), "completion_tokens": update.tokens,
            "total_tokens": len(prompt) + update.tokens}  # fmt: skip


def finish_reason(update: RowUpdate) -> str:
    return "length" if update.finish_reason == "length" else "stop"


async def next_event(job: Job, request: Request) -> BatchStarted | RowUpdate | EngineError | None:
    """The job's next event; ``None`` (and the job cancelled) once the client has gone away."""
    while True:
        try:
            return await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_SECONDS)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancelled = True
                return None


def create_app(server: Server) -> FastAPI:
    """The FastAPI application serving ``server``; its engine thread runs while the application does."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.engine.start()
        yield
        server.engine.stop()

    app = FastAPI(title="mosld", lifespan=lifespan)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # unknown routes and methods: the same error shape as every other refusal
        return error_response(RequestError(exc.status_code, str(exc.detail)))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        stats = server.engine.stats
        return {"status": "ok", "model": server.name, "serving": server.description, **dataclasses.asdict(stats)}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": server.name, "object": "model", "created": server.created, "owned_by": "mosld",
                "max_model_len": server.context_length}  # fmt: skip
        return {"object": "list", "data": [card]}

    async def answer(request: Request, chat: bool) -> Any:
        try:
            body = parse_body(await request.body(), ChatRequest if chat else CompletionRequest)
            server.check_model(body)
            prompt = server.chat_prompt(body) if chat else server.completion_prompt(body)
            requested = body.max_tokens
            if chat and body.max_completion_tokens is not None:
                requested = body.max_completion_tokens
            options = server.options(body, prompt, requested)
        except RequestError as err:
            return error_response(err)
        job = server.engine.submit(prompt, options, stream=body.stream)
        started = await next_event(job, request)
        if started is None:
            return JSONResponse({}, status_code=499)  # the client is gone; nobody reads this
        headers = {BATCH_HEADER: str(started.rows)} if isinstance(started, BatchStarted) else {}
        meta = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, "created": int(time.time()),
                "model": server.name}  # fmt: skip
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = stream_events(job, request, prompt, meta, chat, include_usage)
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        while True:
            event = await next_event(job, request)
            if event is None:
                return JSONResponse({}, status_code=499)
            if isinstance(event, EngineError):
                return error_response(RequestError(500, event.message))
            if isinstance(event, RowUpdate) and event.finish_reason is not None:
                break
        text = event.text or ""
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            echo = server.engine.tokenizer.decode(prompt) if body.echo else ""
            choice = {"index": 0, "text": echo + text, "logprobs": None}
        choice["finish_reason"] = finish_reason(event)
        kind = "chat.completion" if chat else "text_completion"
        result = {**meta, "object": kind, "choices": [choice], "usage": usage(prompt, event)}
        return JSONResponse(result, headers=headers)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await answer(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await answer(request, chat=False)

    return app


async def stream_events(
    job: Job, request: Request, prompt: list[int], meta: dict[str, Any], chat: bool, include_usage: bool
) -> AsyncIterator[str]:
    """The job's answer as server-sent events; the job is cancelled if the client goes away."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta: str | None, reason: str | None, role: bool = False) -> str:
        if chat:
            message: dict[str, str] = {"role": "assistant"} if role else {}
            if delta is not None:
                message["content"] = delta
            choice = {"index": 0, "delta": message, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": reason}
        return "data: " + json.dumps({**meta, "object": kind, "choices": [choice]}) + "\n\n"

    try:
        if chat:
            yield chunk("", None, role=True)
        while True:
            event = await next_event(job, request)
            if event is None:
                return
            if isinstance(event, EngineError):
                yield "data: " + json.dumps(RequestError(500, event.message).body()) + "\n\n"
                return
            if not isinstance(event, RowUpdate):
                continue
            if event.delta:
                yield chunk(event.delta, None)
            if event.finish_reason is not None:
                yield chunk(None, finish_reason(event))
                if include_usage:
                    yield "data: " + json.dumps({**meta, "object": kind, "choices": [], "usage": usage(prompt, event)})
                    yield "\n\n"
                yield "data: [DONE]\n\n"
                return
    finally:  # the client went away (the response was cancelled), or the answer is complete: stop its row
        job.cancelled = True
