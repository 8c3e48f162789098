"""The OpenAI-compatible HTTP front end (FastAPI): /v1/completions, /v1/chat/completions, /v1/models, /health,
/metrics, and /kvxfer/workers (the registry as JSON, for operators and tests).

A request is validated (:mod:`.openai_schema`), tokenized with the model's chat template, handed to the
:class:`~kvxfer.serve.router.Router`, and its tokens come back as SSE chunks or one JSON body. Stop strings are
applied here on the detokenized text (the router then aborts both legs); a client that goes away mid-stream aborts
them too.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..models import Tokenizer
from .metrics import CONTENT_TYPE
from .openai_responses import ChunkWriter, response, usage
from .openai_schema import MAX_BODY_BYTES, ApiError, GenerationParams, parse_generation, parse_json
from .protocol import Sampling
from .router import Router
from .router_flight import Flight, TokensEvent
from .router_text import OutputText

#: Default max_tokens of /v1/completions when the body gives none (OpenAI's default).
COMPLETION_DEFAULT_MAX_TOKENS = 16
DISCONNECT_CHECK_S = 1.0


@dataclass
class ServedModel:
    """The model behind the API: its id, accepted aliases, tokenizer and context length (tokens)."""

    name: str
    tokenizer: Tokenizer
    context_length: int
    aliases: frozenset[str] = field(default_factory=frozenset)
    created: int = field(default_factory=lambda: int(time.time()))


def error_response(error: ApiError) -> JSONResponse:
    headers = {"Retry-After": str(max(1, round(error.retry_after_s)))} if error.retry_after_s else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


async def _read_body(request: Request) -> bytes:
    """The request body, refused (413) as soon as it grows past MAX_BODY_BYTES (declared or streamed)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(
            413, f"request body of {declared} bytes exceeds the limit of {MAX_BODY_BYTES}", code="body_too_large"
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"request body exceeds the limit of {MAX_BODY_BYTES} bytes", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _prompt(served: ServedModel, params: GenerationParams) -> list[int]:
    tokenizer = served.tokenizer
    if params.kind == "chat":
        return tokenizer.encode(tokenizer.apply_chat_template(params.messages), add_special_tokens=False)
    if params.prompt_token_ids is not None:
        return params.prompt_token_ids
    return tokenizer.encode(params.prompt or "")


def _sampling(served: ServedModel, params: GenerationParams, num_prompt: int) -> Sampling:
    room = served.context_length - num_prompt
    if room < 1:
        raise ApiError(
            400,
            f"the prompt has {num_prompt} tokens; this model's context is {served.context_length}",
            param="messages" if params.kind == "chat" else "prompt",
            code="context_length_exceeded",
        )
    max_tokens = params.max_tokens
    if max_tokens is None:
        max_tokens = room if params.kind == "chat" else min(room, COMPLETION_DEFAULT_MAX_TOKENS)
    elif max_tokens > room:
        raise ApiError(
            400,
            f"max_tokens={max_tokens} + {num_prompt} prompt tokens exceed this model's context of "
            f"{served.context_length} tokens",
            param="max_tokens",
            code="context_length_exceeded",
        )
    if params.min_tokens > max_tokens:
        raise ApiError(
            400,
            f"min_tokens={params.min_tokens} exceeds max_tokens={max_tokens}",
            param="min_tokens",
            code="invalid_value",
        )
    seed = None if params.seed is None else params.seed % (1 << 63)
    return Sampling(
        max_tokens=max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        seed=seed,
        stop_token_ids=params.stop_token_ids,
        ignore_eos=params.ignore_eos,
        min_tokens=params.min_tokens,
    )


def _extra(
    params: GenerationParams, timing: dict[str, float | str | bool] | None, out: OutputText
) -> dict[str, object] | None:
    """The response's ``kvxfer`` field: the TTFT breakdown and/or the generated token ids, when asked for."""
    if not params.timing and not params.return_token_ids:
        return None
    extra: dict[str, object] = dict(timing or {}) if params.timing else {}
    if params.return_token_ids:
        extra["token_ids"] = list(out.token_ids)
    return extra


def _cached(timing: dict[str, float | str | bool] | None) -> int:
    value = (timing or {}).get("cached_tokens", 0)
    return int(value) if isinstance(value, (int, float)) else 0


def _finish_reason(event_finish: str | None, stopped: bool) -> str | None:
    if stopped:
        return "stop"
    return event_finish


async def _next_event(flight: Flight) -> TokensEvent:
    """The next event of ``flight``; an ApiError event is raised. The router's deadline sweep guarantees an end."""
    if not flight.events.empty():  # the common case while tokens stream: no timer, no task
        event = flight.events.get_nowait()
    else:
        remaining = flight.deadline_s - time.time() + 5.0
        try:
            event = await asyncio.wait_for(flight.events.get(), timeout=max(remaining, 0.1))
        except asyncio.TimeoutError as error:
            raise ApiError(
                504,
                f"request {flight.rid}: no answer before its deadline",
                code="deadline_exceeded",
                kind="server_error",
            ) from error
    if isinstance(event, ApiError):
        raise event
    return event


def create_app(router: Router, served: ServedModel) -> FastAPI:
    """The FastAPI application serving ``served`` through ``router`` (started and closed by the caller)."""
    app = FastAPI(title="kvxfer", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = router.metrics
    names = {served.name} | set(served.aliases)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(
            ApiError(
                exc.status_code,
                f"{request.method} {request.url.path}: {exc.detail}",
                code="not_found" if exc.status_code == 404 else None,
            )
        )

    async def generate(request: Request, kind: str) -> Response:
        endpoint = "chat" if kind == "chat" else "completions"
        try:
            body = parse_json(await _read_body(request))
            params = parse_generation(body, kind, request.headers, served.tokenizer.vocab_size)  # type: ignore
            if params.model not in names:
                raise ApiError(
                    404,
                    f"The model `{params.model}` does not exist (served: {served.name})",
                    param="model",
                    code="model_not_found",
                )
            prompt = _prompt(served, params)
            sampling = _sampling(served, params, len(prompt))
            flight = router.submit(prompt, sampling, params.priority, params.prefill)
        except ApiError as error:
            outcome = "rejected" if error.status in (429, 503) else "invalid"
            metrics.requests.labels(endpoint, outcome).inc()
            return error_response(error)
        if params.stream:
            return StreamingResponse(
                _stream(flight, params, endpoint),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await _complete(request, flight, params, endpoint)

    def _done(flight: Flight, endpoint: str, outcome: str) -> None:
        metrics.requests.labels(endpoint, outcome).inc()
        metrics.e2e.observe(time.perf_counter() - flight.arrival)

    async def _complete(request: Request, flight: Flight, params: GenerationParams, endpoint: str) -> Response:
        out = OutputText(served.tokenizer, params.stop, params.min_tokens)
        timing, finish, completed = None, None, False
        try:
            while finish is None:
                try:
                    event = await asyncio.wait_for(_next_event(flight), DISCONNECT_CHECK_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        router.abort(flight.rid, "disconnect")
                        _done(flight, endpoint, "abort")
                        return Response(status_code=499)
                    continue
                timing = event.timing or timing
                _text, stopped = out.push(event.token_ids)
                finish = _finish_reason(event.finish, stopped)
                if stopped:
                    router.abort(flight.rid, "stop")
            out.flush()
            completed = True
        except ApiError as error:
            _done(flight, endpoint, "error")
            return error_response(error)
        finally:
            if not completed:
                router.abort(flight.rid, "failure")
        _done(flight, endpoint, finish)
        body = response(
            params.kind,
            flight.rid,
            int(time.time()),
            served.name,
            out.text,
            finish,
            usage(flight.num_prompt_tokens, out.num_tokens, _cached(timing)),
            _extra(params, timing, out),
        )
        return Response(json.dumps(body), media_type="application/json")

    async def _stream(flight: Flight, params: GenerationParams, endpoint: str) -> AsyncIterator[bytes]:
        writer = ChunkWriter(params.kind, flight.rid, int(time.time()), served.name)
        out = OutputText(served.tokenizer, params.stop, params.min_tokens)
        timing, finish, outcome = None, None, "abort"
        try:
            first = writer.start()
            if first is not None:
                yield first
            while finish is None:
                try:
                    event = await _next_event(flight)
                except ApiError as error:
                    outcome = "error"
                    yield writer.error(dict(error.body()))
                    break
                timing = event.timing or timing
                text, stopped = out.push(event.token_ids)
                finish = _finish_reason(event.finish, stopped)
                if stopped:
                    router.abort(flight.rid, "stop")
                if finish is not None:
                    text += out.flush()
                    outcome = finish
                if text or finish is not None:
                    yield writer.text(text, finish, _extra(params, timing, out) if finish is not None else None)
            if finish is not None and params.include_usage:
                yield writer.usage(usage(flight.num_prompt_tokens, out.num_tokens, _cached(timing)))
            yield writer.DONE
        finally:  # also on client disconnect (the generator is cancelled or closed)
            if finish is None:
                router.abort(flight.rid, "disconnect" if outcome == "abort" else "failure")
            _done(flight, endpoint, outcome)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(request, "chat")

    @app.get("/v1/models")
    async def models() -> dict[str, object]:
        return {
            "object": "list",
            "data": [
                {
                    "id": served.name,
                    "object": "model",
                    "created": served.created,
                    "owned_by": "kvxfer",
                    "max_model_len": served.context_length,
                }
            ],
        }

    @app.get("/health")
    async def health() -> JSONResponse:
        ready = router.ready() and not router.draining
        return JSONResponse(
            {
                "status": "ok" if ready else "unavailable",
                "draining": router.draining,
                "workers": {role: router.registry.count(role) for role in ("prefill", "decode", "agg")},
            },
            status_code=200 if ready else 503,
        )

    @app.get("/metrics")
    async def prometheus() -> Response:
        router.refresh_gauges()
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/kvxfer/workers")
    async def workers() -> dict[str, object]:
        return {
            "workers": [w.snapshot() for w in router.registry.workers.values()],
            "queue": {"size": len(router.queue), "tokens": router.queue.queued_tokens},
            "in_flight": len(router.flights),
        }

    return app
