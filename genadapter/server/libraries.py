"""HTTP API for the adapter libraries the server keeps (library_store.py): create, list, show and
delete libraries, add an uploaded document as an entry (absorbed in the model thread a few chunks
per call, between decode steps), remove an entry, and search a library."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..library.embedding import check_kind
from ..library.entry import NAME_RE as ENTRY_NAME
from ..library.entry import EntryDraft
from ..library.folder import Library
from ..state import CorruptStateError, IncompatibleStateError
from .documents import entry_name_of_file
from .errors import ApiError
from .library_store import (
    LibraryStore,
    check_library_name,
    empty_library,
    entry_info,
    library_errors,
)
from .uploads import Upload, Uploads, replayed
from .worker import ModelWorker

MAX_SEARCH_K = 100


class LibraryBody(BaseModel):
    """POST /v1/libraries: the new library's name (unique)."""

    model_config = ConfigDict(extra="forbid")

    name: str

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        return check_library_name(v)


class SearchBody(BaseModel):
    """POST /v1/libraries/{name}/search: a query and how many entries to rank (1-100)."""

    model_config = ConfigDict(extra="forbid")

    query: str = Field(min_length=1, max_length=100_000)
    k: int = Field(5, ge=1, le=MAX_SEARCH_K)
    # The embedding, one of genadapter.library.embedding.KINDS; None: Library.search's default
    # (lexical, or internal while some entry predates lexical embeddings).
    kind: str | None = None

    @field_validator("kind")
    @classmethod
    def _kind(cls, v):
        return None if v is None else check_kind(v)


async def json_body(request: Request, model: type[BaseModel]) -> BaseModel:
    """The request's body as `model`, read as JSON whatever its content type (`curl -d` sends
    form-encoded), as POST /v1/sessions does; a bad body is a 422 in the error shape."""
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False)) from e


def library_router(
    store: LibraryStore,
    worker: ModelWorker,
    in_thread: Callable[..., Awaitable],
    check_capacity: Callable[[], None],
    uploads: Uploads,
    read_document: Callable[[Request], Awaitable[tuple[bytes, str | None, bool]]],
    tokenize_document: Callable[[bytes], list[list[int]]],
) -> APIRouter:
    """The /libraries endpoints (include under /v1 with the key check). Uploads as for sessions
    (sessions.py): `read_document` gives a request's document bytes and name (a 413 over the byte
    limit), `tokenize_document` its token chunks (a 413 over the token limit)."""
    api = APIRouter()
    model = store.model

    @api.post("/libraries", status_code=201)
    async def create_library(request: Request) -> dict:
        body = await json_body(request, LibraryBody)
        await in_thread(store.create, body.name)
        return await in_thread(store.info, body.name)

    @api.get("/libraries")
    async def list_libraries() -> dict:
        def listing() -> list[dict]:
            found = []
            for name in store.names():  # one bad or vanished library does not hide the others
                try:
                    found.append(store.info(name, entries=False))
                except ApiError as e:
                    if e.status_code != 404:
                        found.append({"object": "library", "name": name, "error": e.code})
                except (CorruptStateError, IncompatibleStateError):
                    found.append({"object": "library", "name": name, "error": "corrupt_state"})
            return found

        return {"object": "list", "data": await in_thread(listing)}

    @api.get("/libraries/{name}")
    async def get_library(name: str) -> dict:
        return await in_thread(store.info, name)

    @api.delete("/libraries/{name}")
    async def delete_library(name: str) -> dict:
        await in_thread(store.delete, name)
        uploads.forget(f"library {name}")
        return {"name": name, "object": "library.deleted", "deleted": True}

    @api.post("/libraries/{name}/documents", status_code=201)
    async def add_entry(name: str, request: Request):
        await in_thread(store.get, name)  # 404 before reading a body
        async with uploads.once(request, f"library {name}") as replay:
            if replay.response is not None:
                return replayed(replay.response)
            replay.kept = await add_document(name, request)
        return replay.kept

    async def add_document(name: str, request: Request) -> dict:
        """Read an uploaded document and add it as a new entry of the library; the response."""
        data, entry, from_file = await read_document(request)
        if from_file:  # "my notes.txt" names the entry my-notes.txt
            entry = entry_name_of_file(entry)
        if entry is None or not ENTRY_NAME.fullmatch(entry):
            raise ApiError(
                422,
                f"an entry needs a name (JSON 'name', '?name=', or the upload's file name) of "
                f"1-128 letters, digits, '.', '_' or '-', starting with a letter or digit; got "
                f"{entry!r}",
                "invalid_body",
                "name",
            )
        chunks = await in_thread(tokenize_document, data)
        check_capacity()

        def add(upload: Upload) -> dict:
            with store.locked(name):
                library = store.get(name)  # deleted meanwhile: 404
                if entry in library:
                    raise ApiError(
                        409,
                        f"the library {name!r} has an entry {entry!r}; delete it first",
                        "entry_name_taken",
                        "name",
                    )
                start = time.perf_counter()
                with library_errors(name):
                    absorb(library, entry, chunks, upload)
                seconds = time.perf_counter() - start
                (added,) = [e for e in library.list() if e.name == entry]
            info = {"object": "library.document", "library": name, "entry": entry_info(added)}
            return {**info, "bytes": len(data), "seconds": round(seconds, 3)}

        target = f"library {name}, entry {entry}"
        async with uploads.absorbing(request, target, len(chunks)) as upload:
            return await in_thread(add, upload)

    def absorb(library: Library, entry: str, chunks: list[list[int]], upload: Upload) -> None:
        """Add a document's token chunks as the entry: the model thread absorbs them a few per
        call (the worker's encode_chunks_per_turn, as a session's absorb), so running chats go
        on between the calls, then writes it (Library.commit). Stops, writing nothing, once the
        upload's client is gone (UploadAbandoned)."""
        draft = EntryDraft(model)
        step = max(1, worker.encode_chunks_per_turn)
        for at in range(0, len(chunks), step):
            upload.check()
            worker.call(lambda part=chunks[at : at + step]: draft.encode(part)).result()
            upload.done += len(chunks[at : at + step])
        draft.state.documents = 1
        upload.check()
        worker.call(lambda: library.commit(entry, draft)).result()

    @api.delete("/libraries/{name}/documents/{entry}")
    async def remove_entry(name: str, entry: str) -> dict:
        def remove() -> None:
            with store.locked(name), library_errors(name):
                store.get(name).remove(entry)

        await in_thread(remove)
        return {"library": name, "name": entry, "object": "library.entry.deleted", "deleted": True}

    @api.post("/libraries/{name}/search")
    async def search(name: str, request: Request) -> dict:
        body = await json_body(request, SearchBody)
        check_capacity()

        def ranked() -> list[tuple[str, float]]:
            with store.locked(name):
                library = store.get(name)
                if not len(library):
                    raise empty_library(name)
                call = worker.call(lambda: library.search(body.query, body.k, kind=body.kind))
                try:
                    with library_errors(name):
                        return call.result()
                except (CorruptStateError, IncompatibleStateError, ApiError):
                    raise
                except ValueError as e:  # a query with no tokens
                    raise ApiError(422, str(e), "invalid_body", "query") from e

        hits = await in_thread(ranked)
        data = [{"name": n, "score": s, "rank": i + 1} for i, (n, s) in enumerate(hits)]
        return {"object": "list", "library": name, "query": body.query, "data": data}

    return api


__all__ = ["library_router"]
