"""HTTP API: sessions that absorb documents, and OpenAI-compatible chat completions bound to them.

Handlers never run the model: they validate, tokenize, and hand work to the ModelWorker. Reading a
chat's tokens, detokenizing and writing to the client happen per request, so a slow client holds
up nobody else."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import queue
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from ..generation import SamplingParams, stream_text
from ..model import AdaptedModel
from ..state import CorruptStateError
from ..text import DocumentError, chunked, token_stream
from .store import DocumentInfo, SessionStore, UnknownSession
from .worker import ChatJob, Finished, ModelWorker

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"


@dataclass
class ServerConfig:
    api_key: str | None = None
    max_document_bytes: int = 4 << 20
    max_document_tokens: int = 1 << 20
    max_batch: int = 32  # chats decoded together in one forward
    max_pending: int = 256  # chats and documents queued or running; beyond that, 503
    default_max_tokens: int = 512
    encode_chunks_per_turn: int = 1  # document chunks encoded between two decode steps


# -- errors: OpenAI's shape, {"error": {"message", "type", "param", "code"}} -------------------


def error_response(status: int, message: str, code: str | None = None, param=None, headers=None):
    kind = "invalid_request_error" if 400 <= status < 500 else "server_error"
    if status == 401:
        kind = "authentication_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class ApiError(HTTPException):
    def __init__(self, status: int, message: str, code: str | None = None, param=None):
        super().__init__(status, message)
        self.code, self.param = code, param


class BodyTooLarge(ApiError):
    def __init__(self, limit: int):
        super().__init__(413, f"request body is larger than {limit} bytes", "body_too_large")


class LimitBody:
    """ASGI middleware: refuse request bodies over `limit` bytes, announced or streamed."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            response = error_response(413, str(BodyTooLarge(self.limit).detail), "body_too_large")
            return await response(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, limited_receive, send)


# -- request bodies ------------------------------------------------------------------------------


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # other OpenAI fields are accepted and unused

    messages: list[Message] = Field(min_length=1)
    model: str | None = None
    session_id: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = Field(None, ge=1, le=1)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop must be up to 4 non-empty strings")
        return stops


class DocumentBody(BaseModel):
    text: str
    name: str | None = Field(None, max_length=256)


# -- chat completion plumbing ---------------------------------------------------------------------


class GenerationFailed(RuntimeError):
    pass


class Completion:
    """Text pieces of one chat job, read from its token queue (in a request thread)."""

    def __init__(self, job: ChatJob, worker: ModelWorker, tokenizer, stop: list[str]):
        self.job, self.worker, self.tokenizer, self.stop = job, worker, tokenizer, stop
        self.finish_reason: str | None = None
        self.completion_tokens = 0

    def _tokens(self) -> Iterator[int]:
        while True:
            try:
                item = self.job.tokens.get(timeout=5)
            except queue.Empty:
                if not self.worker.alive:
                    raise GenerationFailed("the model worker stopped") from None
                continue
            if isinstance(item, Finished):
                if item.reason == "error":
                    raise GenerationFailed(item.error)
                if item.reason == "cancelled" and not self.job.cancelled:
                    raise GenerationFailed("the server is shutting down")
                self.finish_reason = "length" if item.reason == "length" else "stop"
                return
            self.completion_tokens += 1
            yield item

    def pieces(self) -> Iterator[str]:
        yield from stream_text(self.tokenizer, self._tokens(), self.stop)
        if self.finish_reason is None:  # a stop string ended the text; the model may run on
            self.finish_reason = "stop"
            self.job.cancel()


def create_app(
    model: AdaptedModel, store_dir: str | Path, config: ServerConfig | None = None
) -> FastAPI:
    """The FastAPI app serving `model`, with sessions kept under `store_dir`."""
    config = config or ServerConfig()
    store = SessionStore(store_dir, model)
    worker = ModelWorker(model, config.max_batch, config.encode_chunks_per_turn)
    tokenizer = model.tokenizer
    model_name = model.base_name
    threads: dict[str, anyio.CapacityLimiter] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Request threads mostly wait on token queues; allow many so waiting never starves.
        threads["limiter"] = anyio.CapacityLimiter(max(64, 2 * config.max_pending))
        worker.start()
        log.info("serving %s with sessions in %s", model_name, store.root)
        try:
            yield
        finally:
            worker.stop()
            store.close()

    async def in_thread(fn, *args):
        return await anyio.to_thread.run_sync(fn, *args, limiter=threads["limiter"])

    async def require_key(request: Request) -> None:
        if config.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), config.api_key.encode()
        ):
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')")

    def check_capacity() -> None:
        if worker.pending >= config.max_pending:
            raise ApiError(503, "the server is busy; try again shortly", "overloaded")

    api = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])

    # -- sessions --

    @api.post("/sessions", status_code=201)
    async def create_session() -> dict:
        session_id = await in_thread(store.create)
        return await in_thread(store.info, session_id)

    @api.get("/sessions")
    async def list_sessions() -> dict:
        return {"object": "list", "data": await in_thread(store.ids)}

    @api.get("/sessions/{session_id}")
    async def get_session(session_id: str) -> dict:
        return await in_thread(store.info, session_id)

    @api.delete("/sessions/{session_id}")
    async def delete_session(session_id: str) -> dict:
        await in_thread(store.delete, session_id)
        return {"id": session_id, "object": "session.deleted", "deleted": True}

    @api.post("/sessions/{session_id}/documents", status_code=201)
    async def add_document(session_id: str, request: Request) -> dict:
        if not await in_thread(store.exists, session_id):
            raise UnknownSession(session_id)
        data, name = await read_document(request)
        if len(data) > config.max_document_bytes:
            raise ApiError(
                413,
                f"document is {len(data)} bytes; the limit is {config.max_document_bytes}",
                "document_too_large",
            )
        chunks = await in_thread(tokenize_document, data)
        check_capacity()
        start = time.perf_counter()
        delta = await asyncio.wrap_future(worker.encode(chunks))
        doc = DocumentInfo(name, len(data), delta.tokens, delta.chunks, time.time())
        await in_thread(store.add, session_id, delta, doc)
        return {
            "object": "session.document",
            "session_id": session_id,
            "document": vars(doc),
            "seconds": round(time.perf_counter() - start, 3),
            "session": await in_thread(store.info, session_id),
        }

    async def read_document(request: Request) -> tuple[bytes, str | None]:
        kind = request.headers.get("content-type", "text/plain").split(";")[0].strip().lower()
        name = request.query_params.get("name")
        if kind == "application/json":
            try:
                body = DocumentBody.model_validate_json(await request.body())
            except ValidationError as e:
                raise RequestValidationError(e.errors(include_url=False)) from e
            return body.text.encode("utf-8"), body.name or name
        if kind == "multipart/form-data":
            form = await request.form(max_part_size=config.max_document_bytes + 1)
            upload = form.get("file")
            if isinstance(upload, UploadFile):
                return await upload.read(), upload.filename or name
            if isinstance(upload, str):
                return upload.encode("utf-8"), name
            raise ApiError(422, "a multipart upload needs a 'file' field", "missing_file", "file")
        if kind in ("text/plain", "text/markdown", "application/octet-stream"):
            return await request.body(), name
        raise ApiError(
            415,
            f'unsupported content type {kind!r}: send text/plain, JSON {{"text": ...}}, '
            "or a multipart file upload",
            "unsupported_media_type",
        )

    def tokenize_document(data: bytes) -> list[list[int]]:
        limit = config.max_document_tokens
        chunks, tokens = [], 0
        for chunk in chunked(token_stream(tokenizer, data), model.chunk_tokens):
            tokens += len(chunk)
            if tokens > limit:
                raise ApiError(
                    413, f"document is over {limit} tokens, the limit", "document_too_large"
                )
            chunks.append(chunk)
        return chunks

    # -- chat --

    @api.post("/chat/completions")
    async def chat_completions(body: ChatRequest):
        state = None
        if body.session_id is not None:
            state = await in_thread(store.state, body.session_id)
        messages = [{"role": _role(m.role), "content": m.text()} for m in body.messages]
        prompt = await in_thread(template, messages)
        room = model.max_positions - len(prompt)
        wanted = body.max_completion_tokens if body.max_tokens is None else body.max_tokens
        if wanted is None:
            wanted = min(config.default_max_tokens, room)
        if wanted > room:
            raise ApiError(
                400,
                f"the prompt is {len(prompt)} tokens and max_tokens {wanted}; the model's window "
                f"is {model.max_positions} tokens",
                "context_length_exceeded",
                "messages",
            )
        params = SamplingParams(
            max_new_tokens=wanted,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            stop=body.stop or [],
            seed=body.seed,
        )
        check_capacity()
        job = worker.chat(prompt, state, params)
        completion = Completion(job, worker, tokenizer, params.stop)
        meta = {
            "id": f"chatcmpl-{secrets.token_hex(12)}",
            "created": int(time.time()),
            "model": model_name,
        }
        usage = lambda: {  # noqa: E731
            "prompt_tokens": len(prompt),
            "completion_tokens": completion.completion_tokens,
            "total_tokens": len(prompt) + completion.completion_tokens,
        }
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            events = stream_events(completion, meta, usage if include_usage else None)
            return StreamingResponse(
                events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        try:
            text = await in_thread(lambda: "".join(completion.pieces()))
        except GenerationFailed as e:
            raise ApiError(500, f"generation failed: {e}", "generation_failed") from e
        finally:
            job.cancel()
        return {
            **meta,
            "object": "chat.completion",
            "session_id": body.session_id,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": completion.finish_reason,
                }
            ],
            "usage": usage(),
        }

    async def stream_events(completion: Completion, meta: dict, usage) -> AsyncIterator[str]:
        def event(delta: dict, finish: str | None = None, **extra) -> str:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            chunk = {**meta, "object": "chat.completion.chunk", "choices": [choice], **extra}
            return f"data: {json.dumps(chunk)}\n\n"

        pieces = completion.pieces()
        try:
            yield event({"role": "assistant", "content": ""})
            while (piece := await in_thread(next, pieces, None)) is not None:
                yield event({"content": piece})
            yield event({}, completion.finish_reason)
            if usage is not None:
                chunk = {**meta, "object": "chat.completion.chunk", "choices": [], "usage": usage()}
                yield f"data: {json.dumps(chunk)}\n\n"
        except GenerationFailed as e:
            error = {"message": f"generation failed: {e}", "type": "server_error"}
            yield f"data: {json.dumps({'error': error})}\n\n"
        finally:
            completion.job.cancel()  # client gone or done: free the batch row
        yield "data: [DONE]\n\n"

    def template(messages: list[dict]) -> list[int]:
        try:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as e:  # the template's own checks (jinja raise_exception)
            raise ApiError(
                422, f"messages do not fit the chat template: {e}", "bad_messages"
            ) from e
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    # -- the rest --

    @api.get("/models")
    async def models() -> dict:
        card = {"id": model_name, "object": "model", "created": 0, "owned_by": "genadapter"}
        return {"object": "list", "data": [card]}

    app = FastAPI(title="genadapter", lifespan=lifespan)
    app.include_router(api)
    app.state.store, app.state.worker, app.state.config = store, worker, config

    @app.get("/health")
    async def health() -> dict:
        steps = worker.steps
        batch = {"decode_steps": steps, "rows": worker.step_rows, "max_rows": worker.max_rows}
        batch["mean_rows"] = round(worker.step_rows / steps, 2) if steps else 0.0
        return {"status": "ok", "model": model_name, "pending": worker.pending, "batch": batch}

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        code = getattr(e, "code", None)
        headers = {"WWW-Authenticate": "Bearer"} if e.status_code == 401 else None
        return error_response(
            e.status_code, str(e.detail), code, getattr(e, "param", None), headers
        )

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        if first.get("type") == "json_invalid":
            detail = first.get("ctx", {}).get("error", "")
            return error_response(422, f"malformed JSON body: {detail}", "invalid_json")
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg')}" if where else str(first.get("msg", "invalid"))
        return error_response(422, message, "invalid_body", where or None)

    @app.exception_handler(UnknownSession)
    async def unknown_session(request: Request, e: UnknownSession):
        return error_response(404, "no such session", "session_not_found", "session_id")

    @app.exception_handler(DocumentError)
    async def bad_document(request: Request, e: DocumentError):
        return error_response(422, str(e), "invalid_document")

    @app.exception_handler(CorruptStateError)
    async def corrupt_state(request: Request, e: CorruptStateError):
        log.error("%s", e)
        return error_response(500, str(e), "corrupt_state")

    # Room for a document plus its JSON or multipart framing.
    app.add_middleware(LimitBody, limit=config.max_document_bytes + (64 << 10))
    return app


def _role(role: str) -> str:
    return "system" if role == "developer" else role
