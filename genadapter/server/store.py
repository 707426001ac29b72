"""Where the server keeps sessions: SQLite for metadata, one safetensors file per session (its
adapter state and its context memory, under one checksum).

A session file is replaced atomically (write a temp file, fsync, rename), so a crash mid-write
leaves the previous session. The file is the truth for the sums, the memory and their counters;
the database lists sessions and their documents, and each session's memory tokens and bytes (for
listings without loading every file). Absorbing adds under the session's lock, so two documents
absorbed at once both count: the state is a sum, the memory a union. A session's memory may hold
at most `memory_budget` tokens (MemoryBudgetExceeded); loaded sessions are held by
resident.ResidentSessions under the server-wide cap on memory bytes. A session may have a unique
name, so clients can address it as a `model` (vLLM's convention for adapters)."""

from __future__ import annotations

import logging
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from ..memory import ContextMemory
from ..model import AdaptedModel
from ..session import Session
from ..state import AdapterState, CorruptStateError
from .resident import ResidentSessions, memory_nbytes

log = logging.getLogger(__name__)

# secrets.token_urlsafe(24) gives 32 characters of this alphabet; nothing else is a session id,
# and nothing else is ever joined to a path.
SESSION_ID = re.compile(r"[A-Za-z0-9_-]{32}")
# A session's optional name: what OpenAI clients send as `model`. It cannot look like an id.
SESSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    name TEXT,
    memory_tokens INTEGER NOT NULL DEFAULT 0,
    memory_bytes INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS documents (
    session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    name TEXT,
    bytes INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    chunks INTEGER NOT NULL,
    added REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS documents_by_session ON documents(session_id);
"""
# After the migration that gives stores made before names their `name` column.
NAME_INDEX = "CREATE UNIQUE INDEX IF NOT EXISTS sessions_by_name ON sessions(name)"


class UnknownSession(KeyError):
    """No session with this id (or a string that cannot be a session id)."""

    def __str__(self) -> str:
        return "no such session"


class SessionNameTaken(ValueError):
    """Another session, or the served model, already has this name."""


class MemoryBudgetExceeded(ValueError):
    """Absorbing a document would take a session's memory past its budget of tokens."""


def check_session_name(name: str) -> str:
    """`name` if it can name a session: 1-64 of A-Z a-z 0-9 . _ : - (first a letter or digit),
    and not something that could be a session id."""
    if not SESSION_NAME.fullmatch(name) or SESSION_ID.fullmatch(name):
        raise ValueError(
            "a session name is 1-64 letters, digits, '.', '_', ':' or '-', starts with a letter or "
            "digit, and is not 32 characters of a session id's alphabet"
        )
    return name


@dataclass
class DocumentInfo:
    name: str | None
    bytes: int
    tokens: int
    chunks: int
    added: float


def new_session_id() -> str:
    return secrets.token_urlsafe(24)


def check_session_id(session_id: object) -> str:
    if not isinstance(session_id, str) or not SESSION_ID.fullmatch(session_id):
        raise UnknownSession(session_id)
    return session_id


class SessionStore:
    """Sessions of one model under `root`: root/sessions.db and root/states/<id>.safetensors."""

    def __init__(
        self,
        root: str | Path,
        model: AdaptedModel,
        cache_size: int = 1024,
        memory_budget: int | None = None,
        memory_cap: int | None = None,
    ):
        self.root = Path(root)
        self.states_dir = self.root / "states"
        self.states_dir.mkdir(parents=True, exist_ok=True)
        self.model = model
        self._db = sqlite3.connect(self.root / "sessions.db", check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)
        columns = [r[1] for r in self._db.execute("PRAGMA table_info(sessions)")]
        if "name" not in columns:  # a store made before sessions had names
            self._db.execute("ALTER TABLE sessions ADD COLUMN name TEXT")
        for column in ("memory_tokens", "memory_bytes"):  # made before sessions had memories
            if column not in columns:
                self._db.execute(
                    f"ALTER TABLE sessions ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0"
                )
        self._db.execute(NAME_INDEX)
        self._db.commit()
        self._db_lock = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()
        # Loaded sessions. A session is never changed in place once held (absorbing swaps in a
        # new one), so a chat may keep using the state and memory it was handed.
        self.resident = ResidentSessions(cache_size, memory_cap)
        self.memory_budget = memory_budget  # most memory tokens one session holds (None: any)
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        """Temp files of writes cut short by a crash (the state they would have replaced is
        whole), and state files of sessions a crash left half created or half deleted."""
        for tmp in self.states_dir.glob(".*.tmp"):
            log.warning("removing %s, left by an interrupted write", tmp)
            tmp.unlink(missing_ok=True)
        known = set(self.ids())
        for path in self.states_dir.glob("*.safetensors"):
            if path.stem not in known:
                log.warning("removing %s, the state of no listed session", path)
                path.unlink(missing_ok=True)

    def close(self) -> None:
        with self._db_lock:
            self._db.close()

    # -- helpers ------------------------------------------------------------------------------

    def _lock(self, session_id: str) -> threading.Lock:
        with self._locks_lock:
            return self._locks.setdefault(session_id, threading.Lock())

    def _path(self, session_id: str) -> Path:
        return self.states_dir / f"{check_session_id(session_id)}.safetensors"

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._db_lock:
            return self._db.execute(sql, args).fetchall()

    def _row(self, session_id: str) -> tuple[float, float, str | None]:
        rows = self._query(
            "SELECT created, updated, name FROM sessions WHERE id = ?",
            (check_session_id(session_id),),
        )
        if not rows:
            raise UnknownSession(session_id)
        return rows[0]

    def _load(self, session_id: str) -> Session:
        path = self._path(session_id)
        if not path.is_file():
            raise CorruptStateError(f"the state file of session {session_id} is missing")
        return self.model.load_session(path)

    def _peek(self, session_id: str) -> Session:
        """The session, held or read from its file (then not held: no room is made for it)."""
        return self.resident.get(session_id) or self._load(session_id)

    def _write(self, session_id: str, session: Session, created: float) -> None:
        session.created = created
        session.save(self._path(session_id))

    def _joined(self, current: Session, delta: AdapterState, memory: ContextMemory | None):
        """A new session: `current` with a document's state and memory added (current is not
        changed: chats may be using it). Raises MemoryBudgetExceeded past the budget."""
        joined = current.memory
        if memory is not None and not memory.is_empty:
            tokens = current.memory_tokens + memory.tokens
            if self.memory_budget is not None and tokens > self.memory_budget:
                raise MemoryBudgetExceeded(self._over_budget(current.memory_tokens, memory.tokens))
            old = current.memory if current.memory is not None else self.model.new_memory()
            if old.is_empty:  # a session saved empty by another memory setting
                old = self.model.new_memory()
            joined = ContextMemory(old.prefix_len, old.storage, list(old.chunks), old.documents)
            joined.extend(memory)
        return Session(self.model, current.state.clone().add_(delta), memory=joined or False)

    def _over_budget(self, held: int, added: int) -> str:
        return (
            f"the session's memory holds {held} tokens; {added} more would pass its budget "
            f"of {self.memory_budget} tokens (delete it, or absorb into a new session)"
        )

    # -- public API ---------------------------------------------------------------------------

    def create(self, name: str | None = None) -> str:
        """A new empty session, named `name` if given; returns its id. Raises SessionNameTaken
        when another session has the name."""
        if name is not None:
            check_session_name(name)
        session_id = new_session_id()
        now = time.time()
        # The empty session is written first, so every listed session has a state file.
        self._write(session_id, Session(self.model), now)
        try:
            with self._db_lock, self._db:
                self._db.execute(
                    "INSERT INTO sessions (id, created, updated, name) VALUES (?, ?, ?, ?)",
                    (session_id, now, now, name),
                )
        except sqlite3.IntegrityError:
            self._path(session_id).unlink(missing_ok=True)
            raise SessionNameTaken(f"a session named {name!r} exists already") from None
        return session_id

    def find(self, key: str) -> str:
        """The id of the session whose id or name is `key`; UnknownSession if there is none."""
        if SESSION_ID.fullmatch(key) and self.exists(key):
            return key
        rows = self._query("SELECT id FROM sessions WHERE name = ?", (key,))
        if not rows:
            raise UnknownSession(key)
        return rows[0][0]

    def listing(self) -> list[tuple[str, str | None, float]]:
        """(id, name, created) of every session, oldest first."""
        return self._query("SELECT id, name, created FROM sessions ORDER BY created")

    def summaries(self) -> list[dict]:
        """Every session's id, name, memory tokens and bytes, oldest first."""
        rows = self._query(
            "SELECT id, name, memory_tokens, memory_bytes FROM sessions ORDER BY created"
        )
        keys = ("id", "name", "memory_tokens", "memory_bytes")
        return [dict(zip(keys, r)) for r in rows]

    def stats(self) -> dict:
        """Sessions and their memories: all stored, those loaded, the budget and the cap."""
        ((count, tokens, nbytes),) = self._query(
            "SELECT COUNT(*), COALESCE(SUM(memory_tokens), 0), COALESCE(SUM(memory_bytes), 0) "
            "FROM sessions"
        )
        return {
            "sessions": count,
            "memory_tokens": tokens,
            "memory_bytes": nbytes,
            **self.resident.stats(),
            "session_memory_tokens": self.memory_budget,
        }

    def pinned(self, session_id: str | None) -> AbstractContextManager:
        """While inside, the session is in use: it is not spilled to make room for memory."""
        return self.resident.pinned(session_id)

    def check_room(self, session_id: str, chunk_lengths: Sequence[int]) -> None:
        """Before absorbing a document of these chunk lengths: MemoryBudgetExceeded when it
        would pass the session's budget, MemoryCapExceeded when no room could be made for it
        (the same checks are made again when it is added)."""
        if self.model.memory_storage is None:
            return
        ((held, nbytes),) = self._query(
            "SELECT memory_tokens, memory_bytes FROM sessions WHERE id = ?",
            (check_session_id(session_id),),
        ) or [(0, 0)]
        added = sum(chunk_lengths)
        if self.memory_budget is not None and held + added > self.memory_budget:
            raise MemoryBudgetExceeded(self._over_budget(held, added))
        self.resident.make_room(session_id, nbytes + memory_nbytes(self.model, chunk_lengths))

    def exists(self, session_id: str) -> bool:
        try:
            self._row(session_id)
        except UnknownSession:
            return False
        return True

    def ids(self) -> list[str]:
        return [r[0] for r in self._query("SELECT id FROM sessions ORDER BY created")]

    def session(self, session_id: str) -> Session:
        """The session (its state and memory), loaded and held. Treat it as read-only: it may
        be shared. Raises MemoryCapExceeded when no room can be made for its memory."""
        self._row(session_id)
        held = self.resident.get(session_id)
        if held is not None:
            return held
        with self._lock(session_id):
            self._row(session_id)  # deleted meanwhile?
            held = self.resident.get(session_id)  # loaded meanwhile?
            if held is not None:
                return held
            session = self._load(session_id)
            self.resident.put(session_id, session)
            return session

    def state(self, session_id: str) -> AdapterState:
        """The session's current state. Treat it as read-only: it may be shared."""
        return self.session(session_id).state

    def documents(self, session_id: str) -> list[DocumentInfo]:
        rows = self._query(
            "SELECT name, bytes, tokens, chunks, added FROM documents WHERE session_id = ? "
            "ORDER BY rowid",
            (check_session_id(session_id),),
        )
        return [DocumentInfo(*r) for r in rows]

    def info(self, session_id: str) -> dict:
        created, updated, name = self._row(session_id)
        session = self._peek(session_id)
        state = session.state
        return {
            "id": session_id,
            "object": "session",
            "name": name,
            "created": created,
            "updated": updated,
            "tokens": state.tokens,
            "chunks": state.chunks,
            "document_count": state.documents,
            "documents": [vars(d) for d in self.documents(session_id)],
            "state_bytes": state.nbytes,
            "state_checksum": state.checksum(),
            "memory_tokens": session.memory_tokens,
            "memory_bytes": session.memory_bytes,
        }

    def add(
        self,
        session_id: str,
        delta: AdapterState,
        doc: DocumentInfo,
        memory: ContextMemory | None = None,
    ) -> AdapterState:
        """Add an absorbed document's state (and its memory: one document) to the session's
        and persist them.

        The sum and union are taken under the session's lock on copies, written atomically, and
        only then made current, so readers see the old session or the new one. Raises, changing
        nothing, MemoryBudgetExceeded past the session's budget and MemoryCapExceeded when no
        room can be made for its memory."""
        with self._lock(session_id):
            created, _, _ = self._row(session_id)
            new = self._joined(self._peek(session_id), delta, memory)
            self.resident.make_room(session_id, new.memory_bytes)
            self._write(session_id, new, created)
            # The file holds it now, whatever happens next; held if room is left for it.
            self.resident.put(session_id, new, required=False)
            with self._db_lock, self._db:
                self._db.execute(
                    "INSERT INTO documents VALUES (?, ?, ?, ?, ?, ?)",
                    (session_id, doc.name, doc.bytes, doc.tokens, doc.chunks, doc.added),
                )
                self._db.execute(
                    "UPDATE sessions SET updated = ?, memory_tokens = ?, memory_bytes = ? "
                    "WHERE id = ?",
                    (time.time(), new.memory_tokens, new.memory_bytes, session_id),
                )
            return new.state

    def delete(self, session_id: str) -> None:
        with self._lock(session_id):
            self._row(session_id)
            with self._db_lock, self._db:
                self._db.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
            self._path(session_id).unlink(missing_ok=True)
            self.resident.pop(session_id)
            with self._locks_lock:
                self._locks.pop(session_id, None)
