"""HTTP API for sessions (store.py): create, list, inspect and delete them, and absorb uploaded
documents into them (encoded by the model thread between decode steps, worker.py; an upload is
watched and made idempotent by uploads.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from .store import DocumentInfo, SessionNameTaken, SessionStore
from .uploads import Uploads, replayed
from .validation import SessionBody
from .worker import ModelWorker


def session_router(
    store: SessionStore,
    worker: ModelWorker,
    in_thread: Callable[..., Awaitable],
    check_capacity: Callable[[], None],
    is_base: Callable[[str | None], bool],
    uploads: Uploads,
    read_document: Callable[[Request], Awaitable[tuple[bytes, str | None, bool]]],
    tokenize_document: Callable[[bytes], list[list[int]]],
) -> APIRouter:
    """The /sessions endpoints (include under /v1 with the key check). `is_base` tells a name
    that means the served model (no session may take it); `read_document` gives a request's
    document bytes and name (an ApiError 413 over the byte limit), `tokenize_document` its token
    chunks (a 413 over the token limit)."""
    api = APIRouter()
    model = store.model

    @api.post("/sessions", status_code=201)
    async def create_session(request: Request) -> dict:
        raw = await request.body()
        try:
            body = SessionBody.model_validate_json(raw) if raw.strip() else SessionBody()
        except ValidationError as e:
            raise RequestValidationError(e.errors(include_url=False)) from e
        if body.name is not None and is_base(body.name):
            raise SessionNameTaken(f"{body.name!r} names the served model")
        session_id = await in_thread(store.create, body.name)
        return await in_thread(store.info, session_id)

    @api.get("/sessions")
    async def list_sessions() -> dict:
        sessions = await in_thread(store.summaries)
        return {"object": "list", "data": [s["id"] for s in sessions], "sessions": sessions}

    @api.get("/sessions/{key}")
    async def get_session(key: str) -> dict:
        return await in_thread(store.info, await in_thread(store.find, key))

    @api.delete("/sessions/{key}")
    async def delete_session(key: str) -> dict:
        session_id = await in_thread(store.find, key)
        await in_thread(store.delete, session_id)
        uploads.forget(f"session {session_id}")
        return {"id": session_id, "object": "session.deleted", "deleted": True}

    @api.post("/sessions/{key}/documents", status_code=201)
    async def add_document(key: str, request: Request):
        session_id = await in_thread(store.find, key)
        target = f"session {session_id}"
        async with uploads.once(request, target) as replay:
            if replay.response is not None:
                return replayed(replay.response)
            replay.kept = await absorb_document(session_id, target, request)
        return replay.kept

    async def absorb_document(session_id: str, target: str, request: Request) -> dict:
        """Read, encode and add one uploaded document to the session; its response."""
        data, name, _ = await read_document(request)
        chunks = await in_thread(tokenize_document, data)
        with store.pinned(session_id):
            # Budget and cap first (checked again when it is added): a refused document costs
            # no encoding.
            await in_thread(store.check_room, session_id, [len(c) for c in chunks])
            check_capacity()
            start = time.perf_counter()
            memory = model.new_memory()
            async with uploads.absorbing(request, target, len(chunks)) as upload:
                delta = await asyncio.wrap_future(worker.encode(chunks, memory, upload))
                upload.check()  # its client left while the last chunk ran: not added
            doc = DocumentInfo(name, len(data), delta.tokens, delta.chunks, time.time())
            await in_thread(store.add, session_id, delta, doc, memory)
        return {
            "object": "session.document",
            "session_id": session_id,
            "document": vars(doc),
            "seconds": round(time.perf_counter() - start, 3),
            "session": await in_thread(store.info, session_id),
        }

    return api
