"""Where the server keeps sessions: SQLite for metadata, one safetensors file per session state.

A state file is replaced atomically (write a temp file, fsync, rename), so a crash mid-write
leaves the previous state. The state file is the truth for the sums and their counters; the
database lists sessions and their documents. Absorbing adds under the session's lock, so two
documents absorbed at once both count: the state is a sum. A session may have a unique name, so
clients can address it as a `model` (vLLM's convention for adapters)."""

from __future__ import annotations

import logging
import re
import secrets
import sqlite3
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from ..model import AdaptedModel
from ..session import Session
from ..state import AdapterState, CorruptStateError

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
    name TEXT
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

    def __init__(self, root: str | Path, model: AdaptedModel, cache_size: int = 1024):
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
        self._db.execute(NAME_INDEX)
        self._db.commit()
        self._db_lock = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()
        # Loaded states, most recently used last. A state is never changed in place once cached
        # (absorbing swaps in a new object), so a chat may keep using the one it was handed.
        self._cache: OrderedDict[str, AdapterState] = OrderedDict()
        self._cache_size = cache_size
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

    def _cached(self, session_id: str) -> AdapterState | None:
        with self._locks_lock:
            return self._cache.get(session_id)

    def _remember(self, session_id: str, state: AdapterState) -> None:
        with self._locks_lock:
            self._cache[session_id] = state
            self._cache.move_to_end(session_id)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def _write(self, session_id: str, state: AdapterState, created: float) -> None:
        session = Session(self.model, state)
        session.created = created
        session.save(self._path(session_id))

    # -- public API ---------------------------------------------------------------------------

    def create(self, name: str | None = None) -> str:
        """A new empty session, named `name` if given; returns its id. Raises SessionNameTaken
        when another session has the name."""
        if name is not None:
            check_session_name(name)
        session_id = new_session_id()
        now = time.time()
        # The empty state is written first, so every listed session has a state file.
        self._write(session_id, self.model.new_state(), now)
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

    def exists(self, session_id: str) -> bool:
        try:
            self._row(session_id)
        except UnknownSession:
            return False
        return True

    def ids(self) -> list[str]:
        return [r[0] for r in self._query("SELECT id FROM sessions ORDER BY created")]

    def state(self, session_id: str) -> AdapterState:
        """The session's current state. Treat it as read-only: it may be shared."""
        self._row(session_id)
        cached = self._cached(session_id)
        if cached is not None:
            self._remember(session_id, cached)
            return cached
        with self._lock(session_id):
            self._row(session_id)  # deleted meanwhile?
            path = self._path(session_id)
            if not path.is_file():
                raise CorruptStateError(f"the state file of session {session_id} is missing")
            state = self.model.load_session(path).state
            self._remember(session_id, state)
            return state

    def documents(self, session_id: str) -> list[DocumentInfo]:
        rows = self._query(
            "SELECT name, bytes, tokens, chunks, added FROM documents WHERE session_id = ? "
            "ORDER BY rowid",
            (check_session_id(session_id),),
        )
        return [DocumentInfo(*r) for r in rows]

    def info(self, session_id: str) -> dict:
        created, updated, name = self._row(session_id)
        state = self.state(session_id)
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
        }

    def add(self, session_id: str, delta: AdapterState, doc: DocumentInfo) -> AdapterState:
        """Add an absorbed document's state to the session's state and persist both.

        The sum is taken under the session's lock on a copy, written atomically, and only then
        made current, so readers see the old state or the new one."""
        with self._lock(session_id):
            created, _, _ = self._row(session_id)
            current = self._cached(session_id)
            if current is None:
                current = self.model.load_session(self._path(session_id)).state
            new = current.clone().add_(delta)
            self._write(session_id, new, created)
            self._remember(session_id, new)  # the file holds it now, whatever happens next
            with self._db_lock, self._db:
                self._db.execute(
                    "INSERT INTO documents VALUES (?, ?, ?, ?, ?, ?)",
                    (session_id, doc.name, doc.bytes, doc.tokens, doc.chunks, doc.added),
                )
                self._db.execute(
                    "UPDATE sessions SET updated = ? WHERE id = ?", (time.time(), session_id)
                )
            return new

    def delete(self, session_id: str) -> None:
        with self._lock(session_id):
            self._row(session_id)
            with self._db_lock, self._db:
                self._db.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
            self._path(session_id).unlink(missing_ok=True)
            with self._locks_lock:
                self._cache.pop(session_id, None)
                self._locks.pop(session_id, None)
