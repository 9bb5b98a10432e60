"""`offspec serve`: an OpenAI-compatible HTTP server (Starlette on uvicorn) over the batched engine.

POST /v1/chat/completions and /v1/completions (streamed as server-sent events or not), GET /v1/models and
/health. Each request is checked (`openai_api`), tokenized and handed to the `Scheduler`, whose thread runs the
passes that every active request shares; events come back to the request's asyncio queue. A client that goes
away cancels its request (its slot is free at the next pass); Ctrl-C cancels what runs and stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from offspec import __version__
from offspec.chat import encode_prompt
from offspec.errors import OffspecError, format_error
from offspec.generate import GenerationConfig, TextEvent
from offspec.openai_api import (
    APIError, Completion, chat_logprobs, completion_logprobs, parse_chat, parse_completion, usage,
)
from offspec.scheduler import QueueFull, Scheduler, ShuttingDown, Ticket

DISCONNECT_POLL_S = 0.25  # how often a non-streamed request checks that its client is still there


@dataclass
class ServeState:
    """What the routes need: the scheduler, the tokenizer, the served model's names and the request defaults."""

    scheduler: Scheduler
    tokenizer: object
    model_id: str
    context_tokens: int
    defaults: GenerationConfig = field(default_factory=GenerationConfig)
    aliases: tuple[str, ...] = ()  # other names a request may use for the model (the --model argument as given)
    api_key: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    on_request: Callable[[dict], None] | None = None  # one record per finished request (the log line)

    @property
    def fingerprint(self) -> str:
        return f"offspec-{__version__}"


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def create_app(state: ServeState) -> Starlette:
    """The ASGI app over a started Scheduler."""

    def check_key(request: Request) -> None:
        if state.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
            raise APIError(401, "Incorrect API key provided: pass it as 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    async def body_of(request: Request) -> object:
        try:
            return json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError(400, "We could not parse the JSON body of your request: it must be a JSON object",
                           code="invalid_json") from None

    def check_model(name: str) -> None:
        if name != state.model_id and name not in state.aliases:
            raise APIError(404, f"The model '{name}' does not exist: this server serves '{state.model_id}' "
                                "(GET /v1/models)", param="model", code="model_not_found")

    async def completions(request: Request, chat: bool) -> Response:
        try:
            check_key(request)
            body = await body_of(request)
            req = parse_chat(body) if chat else parse_completion(body)
            check_model(req.model)
            prompt_ids = tokenize(req)
            room = state.context_tokens - 1 - len(prompt_ids)
            if room < 1:
                raise APIError(400, f"This model's maximum context length is {state.context_tokens} tokens; "
                                    f"your {'messages' if chat else 'prompt'} resulted in {len(prompt_ids)} tokens "
                                    "(the server's --ctx-size sets the limit)",
                               param="messages" if chat else "prompt", code="context_length_exceeded")
            try:
                cfg = req.config(state.defaults, room)
            except OffspecError as exc:  # a value the sampler refuses that the field checks let through
                raise APIError(400, str(exc)) from None
            queue: asyncio.Queue = asyncio.Queue()
            loop = asyncio.get_running_loop()
            try:
                ticket = state.scheduler.submit(prompt_ids, cfg, lambda ev: loop.call_soon_threadsafe(
                    queue.put_nowait, ev))
            except QueueFull as exc:
                raise APIError(429, str(exc), type_="rate_limit_error", code="rate_limit_exceeded") from None
            except ShuttingDown as exc:
                raise APIError(503, str(exc), type_="server_error", code="shutting_down") from None
        except APIError as err:
            return error_response(err)
        out = Completion(chat, state.model_id, state.fingerprint)
        if req.stream:
            return StreamingResponse(stream(request, ticket, queue, out, req, len(prompt_ids)),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await whole(request, ticket, queue, out, req, len(prompt_ids))

    def tokenize(req) -> list[int]:
        tok = state.tokenizer
        if req.messages is not None:
            return encode_prompt(tok, req.messages)
        if isinstance(req.prompt, list):
            vocab = len(tok) if tok is not None else None
            if vocab is not None and any(not 0 <= t < vocab for t in req.prompt):
                raise APIError(400, f"'prompt' holds token ids outside the vocabulary (0..{vocab - 1})",
                               param="prompt", code="invalid_value")
            return list(req.prompt)
        return list(tok.encode(req.prompt))

    async def next_event(request: Request, ticket: Ticket, queue: asyncio.Queue, poll: bool):
        """The request's next event; None if its client went away (then the request is cancelled)."""
        while True:
            try:
                return await (asyncio.wait_for(queue.get(), DISCONNECT_POLL_S) if poll else queue.get())
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    state.scheduler.cancel(ticket)
                    return None

    def failure(ev: Exception) -> APIError:
        if isinstance(ev, ShuttingDown):
            return APIError(503, str(ev), type_="server_error", code="shutting_down")
        return APIError(500, format_error(ev).removeprefix("error: "), type_="server_error")

    def logprobs_of(out: Completion, req, lps, offset: int = 0) -> dict | None:
        if req.logprobs is None:
            return None
        if out.chat:
            return chat_logprobs(state.tokenizer, lps, req.logprobs)
        return completion_logprobs(state.tokenizer, lps, req.logprobs, offset)

    async def whole(request: Request, ticket: Ticket, queue: asyncio.Queue, out: Completion, req,
                    n_prompt: int) -> Response:
        parts: list[str] = []
        while True:
            ev = await next_event(request, ticket, queue, poll=True)
            if ev is None:
                return Response(status_code=499)  # nobody reads it
            if isinstance(ev, Exception):
                return error_response(failure(ev))
            parts.append(ev.text)
            if ev.step.finish:
                break
        seq = ticket.seq
        record(ticket, "ok")
        return JSONResponse(out.response("".join(parts), seq.stats.finish, usage(n_prompt, len(seq.token_ids)),
                                         logprobs_of(out, req, seq.logprobs)))

    async def stream(request: Request, ticket: Ticket, queue: asyncio.Queue, out: Completion, req,
                     n_prompt: int) -> AsyncIterator[str]:
        ended, offset = False, 0
        try:
            if out.chat:
                yield sse(out.chunk("", first=True))
            while True:
                ev: TextEvent | Exception = await queue.get()
                if isinstance(ev, Exception):
                    ended = True
                    record(ticket, "failed")
                    yield sse(failure(ev).body())
                    return
                lp = logprobs_of(out, req, ev.step.logprobs, offset)
                offset += len(ev.text)
                finish = ev.step.finish
                if ev.text or lp or finish:
                    use = usage(n_prompt, len(ticket.seq.token_ids)) if finish and not req.include_usage else None
                    yield sse(out.chunk(ev.text, finish, lp, use))
                if finish:
                    ended = True
                    if req.include_usage:
                        yield sse(out.chunk(None, use=usage(n_prompt, len(ticket.seq.token_ids))))
                    yield "data: [DONE]\n\n"
                    record(ticket, "ok")
                    return
        finally:
            if not ended:  # the client went away (the response task was cancelled): free the slot
                state.scheduler.cancel(ticket)
                record(ticket, "cancelled")

    def record(ticket: Ticket, status: str) -> None:
        if state.on_request is None:
            return
        seq, now = ticket.seq, time.perf_counter()
        state.on_request({"status": status, "prompt_tokens": len(ticket.prompt_ids),
                          "completion_tokens": len(seq.token_ids) if seq else 0,
                          "latency_s": now - ticket.submitted_s,
                          "queued_s": (ticket.admitted_s or now) - ticket.submitted_s,
                          "passes": seq.stats.passes if seq else 0})

    async def chat_route(request: Request) -> Response:
        return await completions(request, chat=True)

    async def completion_route(request: Request) -> Response:
        return await completions(request, chat=False)

    def model_object() -> dict:
        return {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "offspec",
                "context_length": state.context_tokens}

    async def models(request: Request) -> Response:
        try:
            check_key(request)
        except APIError as err:
            return error_response(err)
        return JSONResponse({"object": "list", "data": [model_object()]})

    async def one_model(request: Request) -> Response:
        try:
            check_key(request)
            check_model(request.path_params["name"])
        except APIError as err:
            return error_response(err)
        return JSONResponse(model_object())

    async def health(request: Request) -> Response:
        s = state.scheduler
        return JSONResponse({"status": "ok", "slots": len(s.batch.slots), "slots_busy": s.running,
                             "queued": s.waiting, "passes": s.batch.passes})

    async def http_error(request: Request, exc: HTTPException) -> Response:
        code = "not_found" if exc.status_code == 404 else None
        return error_response(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                       code=code))

    routes = [
        Route("/v1/chat/completions", chat_route, methods=["POST"]),
        Route("/v1/completions", completion_route, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{name:path}", one_model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})


def sse(obj: dict) -> str:
    """One server-sent event carrying a JSON object."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def make_server(app: Starlette, host: str, port: int, on_exit: Callable[[], None]):
    """A uvicorn server for app; Ctrl-C (or SIGTERM) first calls on_exit, so running requests end at once."""
    import uvicorn

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            on_exit()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=10,
                            lifespan="off")
    return _Server(config)


@contextlib.contextmanager
def serving(state: ServeState):
    """Start the scheduler's thread for the block; stop it (cancelling what runs) after."""
    state.scheduler.start()
    try:
        yield create_app(state)
    finally:
        state.scheduler.stop()
