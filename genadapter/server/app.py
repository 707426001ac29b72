"""HTTP API: sessions that absorb documents, and OpenAI-compatible chat completions bound to them.

Handlers never run the model: they validate (validation.py), tokenize, and hand work to the
ModelWorker (worker.py); chat.py turns a job's tokens into the client's answer and errors.py
gives every failure OpenAI's error shape. A session is addressed by its id or its name, in paths
and as a chat request's `model` (vLLM's convention for adapters) or `session_id`.

A session holds both parts of what it absorbed (DESIGN.md): the adapter state its chats run
under, and the context memory they read, laid out as Session.chat_layout lays it out (built in the
model thread: choosing what a turn reads takes a forward of the base). A session's memory holds
at most `session_memory_tokens`; the loaded sessions' memories at most `memory_cap_bytes`
together, idle sessions being spilled (they are in their files) to make room (store.py)."""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, StreamingResponse

from ..memory_read import Layout
from ..model import AdaptedModel
from . import documents
from .chat import Completion, GenerationFailed, stream_events, whole_text
from .errors import ApiError, LimitBody, install_error_handlers
from .grammar import GrammarError, Grammars
from .libraries import library_router
from .library_store import DEFAULT_K, LibraryStore
from .sessions import session_router
from .store import SessionStore, UnknownSession
from .uploads import Uploads
from .validation import ChatRequest
from .worker import ModelWorker

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"


@dataclass
class ServerConfig:
    api_key: str | None = None
    max_document_bytes: int = 4 << 20
    max_document_tokens: int = 1 << 20
    max_batch: int = 32  # chats decoded together in one forward
    max_pending: int = 256  # chats and documents queued or running; beyond that, 503
    # Without max_tokens a chat may fill the window; a number caps that default.
    default_max_tokens: int | None = None
    encode_chunks_per_turn: int = 1  # document chunks encoded between two decode steps
    session_memory_tokens: int | None = 32768  # most memory tokens one session holds
    memory_cap_bytes: int | None = 4 << 30  # most bytes of memory loaded at once, all sessions
    # Browser origins allowed to call the API (CORS; "*": any); none by default.
    cors_origins: tuple[str, ...] = ()


def base_model_ids(name: str) -> set[str]:
    """Lower-cased names that mean the base model: its name and, for a .gguf file, its stem."""
    ids = {name.lower()}
    if name.lower().endswith(".gguf"):
        ids.add(name[: -len(".gguf")].lower())
    return ids


def create_app(
    model: AdaptedModel, store_dir: str | Path, config: ServerConfig | None = None
) -> FastAPI:
    """The FastAPI app serving `model`, with sessions kept under `store_dir`."""
    config = config or ServerConfig()
    store = SessionStore(
        store_dir,
        model,
        memory_budget=config.session_memory_tokens,
        memory_cap=config.memory_cap_bytes,
    )
    worker = ModelWorker(model, config.max_batch, config.encode_chunks_per_turn)
    uploads = Uploads(store.root)
    grammars = Grammars(model.tokenizer, worker.vocab_size)
    libraries = LibraryStore(store_dir, model, worker)
    tokenizer = model.tokenizer
    model_name = model.base_name
    base_ids = base_model_ids(model_name)
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
            uploads.close()

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

    def is_base(name: str | None) -> bool:
        """Whether a request's `model` means the base model: none given, its name in any case,
        or that name after an organisation ("HuggingFaceTB/SmolLM2-135M-Instruct")."""
        return not name or name.lower() in base_ids or name.lower().rsplit("/", 1)[-1] in base_ids

    api = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])

    read_document = partial(documents.read_document, max_bytes=config.max_document_bytes)
    tokenize_document = partial(
        documents.tokenize_document, model, limit=config.max_document_tokens
    )
    uploading = (uploads, read_document, tokenize_document)
    api.include_router(
        session_router(store, worker, in_thread, check_capacity, is_base, *uploading)
    )

    # -- chat --

    async def chat_library(body: ChatRequest) -> tuple[str | None, int]:
        """The library a chat is routed over (None: no `library` given) and its k. 400 when the
        request also names a session, 404 for an unknown model."""
        if body.library is None:
            if body.library_k is not None:
                raise ApiError(422, "library_k: needs library", "invalid_body", "library_k")
            return None, 0
        clash = "session_id" if body.session_id is not None else None
        if clash is None and not is_base(body.model):
            try:
                await in_thread(store.find, body.model)
                clash = "model"
            except UnknownSession:
                raise ApiError(
                    404, f"the model {body.model!r} does not exist", "model_not_found", "model"
                ) from None
        if clash is not None:
            message = f"give a library or a session, not both ({clash} names a session)"
            raise ApiError(400, message, "library_and_session", clash)
        return body.library, DEFAULT_K if body.library_k is None else body.library_k

    async def chat_session(body: ChatRequest) -> tuple[str | None, str]:
        """The session a chat runs under (None: the base model), and the model name to echo."""
        session_id = None
        if body.session_id is not None:
            session_id = await in_thread(store.find, body.session_id)
        if is_base(body.model):
            return session_id, model_name
        try:
            named = await in_thread(store.find, body.model)
        except UnknownSession:
            raise ApiError(
                404,
                f"the model {body.model!r} does not exist: GET /v1/models lists the base model "
                "and the sessions",
                "model_not_found",
                "model",
            ) from None
        if session_id is not None and session_id != named:
            raise ApiError(
                400, "model and session_id name different sessions", "session_mismatch", "model"
            )
        return named, body.model

    def answer_length(body: ChatRequest, prompt: list[int]) -> int:
        """max_tokens if the window has room for it; without it, the room the window leaves."""
        room = model.max_positions - len(prompt)
        wanted = body.wanted_tokens()
        if room < 1 or (wanted is not None and wanted > room):
            asked = "" if wanted is None else f" and max_tokens {wanted}"
            raise ApiError(
                400,
                f"the prompt is {len(prompt)} tokens{asked}; the model's window is "
                f"{model.max_positions} tokens, with room for at least one answer token",
                "context_length_exceeded",
                "messages",
            )
        if wanted is None:
            return min(room, config.default_max_tokens or room)
        return wanted

    def answer_reserve(body: ChatRequest, length: int) -> int:
        """Tokens of the window a memory read leaves for the answer: max_tokens; without it,
        the default cap or one token (the answer then gets what the memory leaves)."""
        if body.wanted_tokens() is not None:
            return length
        return min(length, config.default_max_tokens or 1)

    def with_read(layout: Layout | None, body: ChatRequest, ids: list[int], length: int):
        """(prompt, answer length): the Layout of a memory read (None or nothing read: the
        plain ids), the answer without max_tokens getting the room the layout leaves."""
        if layout is None or layout.read is None:
            return ids, length
        if body.wanted_tokens() is None:
            room = model.max_positions - len(layout)
            length = min(room, config.default_max_tokens or room)
        return layout, length

    async def read_memory(session, messages, body: ChatRequest, ids: list[int], length: int):
        """(prompt, answer length) of a chat on a session with a memory: the Layout of what
        its last message reads."""
        if not any(m["role"] == "user" for m in messages):
            return ids, length  # no question to read for, and no user message to lay it out in
        reserve = answer_reserve(body, length)
        check_capacity()
        layout = await asyncio.wrap_future(
            worker.call(lambda: session.chat_layout(messages, reserve))
        )
        return with_read(layout, body, ids, length)

    @api.post("/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        library, k = await chat_library(body)
        session_id, echoed = (None, model_name) if library is not None else await chat_session(body)
        messages = [{"role": m.template_role(), "content": m.text()} for m in body.messages]
        prompt = await in_thread(template, messages)
        params, adjust = body.sampling(answer_length(body, prompt), worker.vocab_size)
        state, routes = None, None
        if library is not None:
            check_capacity()  # before the routes' loads and folds, which run in the model thread
            reserve = answer_reserve(body, params.max_new_tokens)
            routes, layout = await in_thread(libraries.chat, library, k, messages, reserve)
            prompt, params.max_new_tokens = with_read(layout, body, prompt, params.max_new_tokens)
        with store.pinned(session_id):  # not spilled while its memory is being read
            if session_id is not None:
                session = await in_thread(store.session, session_id)
                state = session.state
                if session.memory_tokens:
                    prompt, params.max_new_tokens = await read_memory(
                        session, messages, body, prompt, params.max_new_tokens
                    )
        check_capacity()
        grammar = None
        if body.response_format is not None:  # compiling may take a while: not in the loop
            try:
                grammar = await in_thread(grammars.matcher, body.response_format)
            except GrammarError as e:
                raise ApiError(400, str(e), "invalid_value", "response_format") from e
        job = worker.chat(prompt, state, params, adjust, routes, grammar)
        completion = Completion(job, worker, tokenizer, params.stop)
        meta = {
            "id": f"chatcmpl-{secrets.token_hex(12)}",
            "created": int(time.time()),
            "model": echoed,
        }
        usage = lambda: {  # noqa: E731
            "prompt_tokens": len(prompt),
            "completion_tokens": completion.completion_tokens,
            "total_tokens": len(prompt) + completion.completion_tokens,
        }
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            events = stream_events(completion, meta, usage if include_usage else None, in_thread)
            return StreamingResponse(
                events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        try:
            text = await whole_text(completion, request, in_thread)
        except GenerationFailed as e:
            raise ApiError(500, f"generation failed: {e}", "generation_failed") from e
        return {
            **meta,
            "object": "chat.completion",
            "session_id": session_id,
            **({"library": library} if library else {}),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": completion.finish_reason,
                }
            ],
            "usage": usage(),
        }

    def template(messages: list[dict]) -> list[int]:
        try:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as e:  # the template's own checks (jinja raise_exception)
            raise ApiError(
                422, f"messages do not fit the chat template: {e}", "bad_messages"
            ) from e
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    # -- models: the base model, then every session (by name when it has one) --

    def model_cards() -> list[dict]:
        base = {"id": model_name, "object": "model", "created": 0, "owned_by": "genadapter"}
        cards = [{**base, "root": model_name, "parent": None}]
        for session_id, name, created in store.listing():
            card = {**base, "id": name or session_id, "created": int(created)}
            cards.append({**card, "root": model_name, "parent": model_name})
            cards[-1]["session_id"] = session_id
        return cards

    @api.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": await in_thread(model_cards)}

    @api.get("/models/{name:path}")
    async def get_model(name: str) -> dict:
        for card in await in_thread(model_cards):
            if name in (card["id"], card.get("session_id")) or (
                card["parent"] is None and is_base(name)
            ):
                return card
        raise ApiError(404, f"the model {name!r} does not exist", "model_not_found", "model")

    # -- sessions' memories, loaded and stored --

    @api.get("/stats")
    async def stats() -> dict:
        return {"object": "stats", **await in_thread(store.stats), "pending": worker.pending}

    api.include_router(library_router(libraries, worker, in_thread, check_capacity, *uploading))
    app = FastAPI(title="genadapter", lifespan=lifespan)
    app.include_router(api)
    app.state.store, app.state.worker, app.state.config = store, worker, config

    @app.get("/health")
    async def health() -> dict:
        steps = worker.steps
        batch = {"decode_steps": steps, "rows": worker.step_rows, "max_rows": worker.max_rows}
        batch["mean_rows"] = round(worker.step_rows / steps, 2) if steps else 0.0
        return {
            "status": "ok",
            "model": model_name,
            "pending": worker.pending,
            "batch": batch,
            "uploads": uploads.health(),
        }

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    install_error_handlers(app)
    # Room for a document plus its JSON or multipart framing.
    app.add_middleware(LimitBody, limit=config.max_document_bytes + (64 << 10))
    if config.cors_origins:  # outermost: preflights and every response, errors included
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_origins),
            allow_methods=["*"],
            allow_headers=["*"],
            max_age=600,
        )
    return app
