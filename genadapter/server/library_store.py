"""The adapter libraries (genadapter/library/) the server keeps under its store, opened with the
served model, one lock each; the routes a chat request's `library` runs under. libraries.py is
their HTTP API.

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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..library.entry import MissingEmbeddingError, NoEntryError
from ..library.folder import MANIFEST, Library
from ..memory_read import Layout
from ..model import AdaptedModel
from ..state import IncompatibleStateError
from .errors import ApiError
from .worker import ModelWorker

log = logging.getLogger(__name__)

# A library's name: a folder under STORE/libraries, so nothing else is ever joined to a path.
LIBRARY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
DELETED = ".deleted-"  # a library being deleted is first renamed to this prefix
DEFAULT_K = 2  # documents mixed per token in a routed chat
MAX_K = 64


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


__all__ = ["DEFAULT_K", "MAX_K", "LibraryStore", "check_library_name"]
