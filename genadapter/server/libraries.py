"""HTTP API for adapter libraries (genadapter/library/) kept under the server's store, and the
routes a chat request's `library` runs under.

A library lives in STORE/libraries/NAME/ in the library's own format (atomically written,
checksummed files; a library made with another base or generator is refused with a 409). The
server is its one writer: every change and every load of a library is made under that library's
lock. Whatever may run the model runs in the model thread through `ModelWorker.call`, between
decode steps, because all forwards share the adapted layers' binding: absorbing an entry,
embedding a search query, and building a chat's routes (loading and folding every entry, which
may also run a context pass, e.g. for a centred gate's background). Opening, listing and
removing run in request threads: they only read and write files."""

from __future__ import annotations

import logging
import re
import secrets
import shutil
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..library.embedding import check_kind
from ..library.entry import NAME_RE as ENTRY_NAME
from ..library.entry import EntryDraft, MissingEmbeddingError, NoEntryError
from ..library.folder import MANIFEST, Library
from ..memory_read import Layout
from ..model import AdaptedModel
from ..state import CorruptStateError, IncompatibleStateError
from .documents import entry_name_of_file
from .errors import ApiError
from .uploads import Upload, Uploads, replayed
from .worker import ModelWorker

log = logging.getLogger(__name__)

# A library's name: a folder under STORE/libraries, so nothing else is ever joined to a path.
LIBRARY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
DELETED = ".deleted-"  # a library being deleted is first renamed to this prefix
DEFAULT_K = 2  # documents mixed per token in a routed chat
MAX_K = 64
MAX_SEARCH_K = 100


def unknown_library(name: str) -> ApiError:
    """404 library_not_found for `name`."""
    return ApiError(404, f"no library named {name!r}", "library_not_found", "library")


def empty_library(name: str) -> ApiError:
    """409 library_empty: routing and search need at least one entry."""
    message = f"the library {name!r} has no entries: add a document first"
    return ApiError(409, message, "library_empty", "library")


def check_library_name(name: str) -> str:
    """`name` if it can name a library: 1-64 letters, digits, '.', '_' or '-', starting with a
    letter or digit; ValueError otherwise."""
    if not isinstance(name, str) or not LIBRARY_NAME.fullmatch(name):
        raise ValueError(
            "a library name is 1-64 letters, digits, '.', '_' or '-', starting with a letter or "
            "digit"
        )
    return name


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


class LibraryStore:
    """The libraries under `root`/libraries, opened with `model` and cached, one lock each."""

    def __init__(self, root: str | Path, model: AdaptedModel, worker: ModelWorker):
        self.root = Path(root) / "libraries"
        self.root.mkdir(parents=True, exist_ok=True)
        self.model = model
        self.worker = worker
        self._open: dict[str, Library] = {}
        self._locks: dict[str, threading.RLock] = {}
        self._guard = threading.Lock()
        for left in self.root.glob(f"{DELETED}*"):  # a deletion a crash cut short
            log.warning("removing %s, left by an interrupted delete", left)
            shutil.rmtree(left, ignore_errors=True)

    @contextmanager
    def locked(self, name: str) -> Iterator[None]:
        """Hold the library `name`'s lock (re-entrant) for a change or a load. ApiError 404 for
        a name no library can have (so junk names never get a lock)."""
        self._path(name)
        with self._guard:
            lock = self._locks.setdefault(name, threading.RLock())
        with lock:
            yield

    def _path(self, name: str) -> Path:
        """The folder of the library `name`. ApiError 404 for a name no library can have, 501
        when the served generator has an LM-head adapter (which libraries cannot route)."""
        if self.model.generator.head is not None:
            message = "adapter libraries do not route a generator's LM-head adapter yet"
            raise ApiError(501, message, "library_not_supported")
        if not isinstance(name, str) or not LIBRARY_NAME.fullmatch(name):
            raise unknown_library(name)
        return self.root / name

    def names(self) -> list[str]:
        """The libraries' names, sorted."""
        found = (p.parent.name for p in self.root.glob(f"*/{MANIFEST}"))
        return sorted(n for n in found if LIBRARY_NAME.fullmatch(n))

    def create(self, name: str) -> Library:
        """A new, empty library. ApiError 409 when the name is taken, 501 when the served
        generator cannot be routed."""
        path = self._path(check_library_name(name))
        with self.locked(name):
            if (path / MANIFEST).exists():
                raise ApiError(
                    409, f"a library named {name!r} exists", "library_name_taken", "name"
                )
            with library_errors(name):
                library = Library.create(path, self.model)
            self._open[name] = library
            return library

    def get(self, name: str) -> Library:
        """The library `name`, opened with the served model (cached). ApiError 404 when there is
        none, 409 when it was made with another base or generator; CorruptStateError (500) for a
        damaged manifest. Runs no forward."""
        path = self._path(name)
        with self.locked(name):
            if name in self._open:
                return self._open[name]
            if not (path / MANIFEST).is_file():
                raise unknown_library(name)
            with library_errors(name):
                library = Library.open(path, self.model)
            self._open[name] = library
            return library

    def delete(self, name: str) -> None:
        """Delete the library: renamed aside first (atomic: it is gone for every reader), then
        its files removed. ApiError 404 when there is none."""
        path = self._path(name)
        with self.locked(name):
            if not (path / MANIFEST).is_file():
                raise unknown_library(name)
            aside = self.root / f"{DELETED}{name}-{secrets.token_hex(4)}"
            path.rename(aside)
            self._open.pop(name, None)
        shutil.rmtree(aside, ignore_errors=True)

    def info(self, name: str, entries: bool = True) -> dict:
        """The library's name, counts and (with `entries`) each entry's name and counts."""
        with self.locked(name):
            listed = self.get(name).list()
        info = {
            "object": "library",
            "name": name,
            "entry_count": len(listed),
            "tokens": sum(e.tokens for e in listed),
            "memory_tokens": sum(e.memory_tokens for e in listed),
            "memory_bytes": sum(e.memory_bytes for e in listed),
        }
        if entries:
            info["entries"] = [entry_info(e) for e in listed]
        return info

    def chat(
        self, name: str, k: int, messages: list[dict], reserve: int
    ) -> tuple[dict, Layout | None]:
        """(routes, layout) of a chat over the library `name` with top-k mixing: layer name ->
        Routes, and the Layout of what the chat's last message reads of the entries' context
        memories (library/memory.py, as Library.session's chat_layout lays it out, `reserve`
        tokens of the window kept for the answer), or None when it reads nothing. ApiError 404
        (no library), 409 (no entries, or made with another model); CorruptStateError for a
        damaged entry."""
        with self.locked(name):
            library = self.get(name)
            if not len(library):
                raise empty_library(name)

            def build() -> tuple[dict, Layout | None]:
                routes = library.routes(k)
                if not any(m["role"] == "user" for m in messages):
                    return routes, None  # no question to read for
                layout = library.session(k).chat_layout(messages, reserve)
                return routes, layout if layout.read is not None else None

            with library_errors(name):
                return self.worker.call(build).result()


def entry_info(entry) -> dict:
    """An Entry as the API shows it (memory_tokens and memory_bytes: its context memory's, 0 for
    an entry added before entries kept one)."""
    keys = ("name", "tokens", "chunks", "documents", "added", "memory_tokens", "memory_bytes")
    return {"object": "library.entry", **{k: getattr(entry, k) for k in keys}}


@contextmanager
def library_errors(name: str) -> Iterator[None]:
    """Library exceptions as API errors (CorruptStateError keeps its handler: a 500)."""
    try:
        yield
    except MissingEmbeddingError as e:
        raise ApiError(409, str(e), "embedding_missing", "kind") from e
    except IncompatibleStateError as e:
        message = f"the library {name!r} does not fit the model this server runs: {e}"
        raise ApiError(409, message, "incompatible_library", "library") from e
    except NoEntryError as e:
        raise ApiError(404, str(e), "entry_not_found", "entry") from e


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


__all__ = ["DEFAULT_K", "MAX_K", "LibraryStore", "check_library_name", "library_router"]
