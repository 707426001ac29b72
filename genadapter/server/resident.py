"""The sessions a server holds loaded, and the server-wide cap on their memories' bytes.

A session's context memory (memory.py) grows with what it absorbed, unlike its fixed-size state,
so the store keeps its loaded sessions here: most recently used last, at most `size` of them,
and their memories at most `cap` bytes together. Every session held here is also in its file (the
store writes a session before it holds it), so dropping one (spilling it) loses nothing: its next
request loads it again. Sessions in use (pinned: a chat reading its memory, a document being
absorbed into it) are never spilled; when the idle ones cannot make room, MemoryCapExceeded, and
nothing is spilled for it."""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from ..session import Session


class MemoryCapExceeded(RuntimeError):
    """Loading or growing a session would take the loaded memories past the server's cap, and
    spilling every idle session would not make room."""


def memory_nbytes(model, chunk_lengths: Sequence[int]) -> int:
    """Bytes of the memory that absorbing chunks of these lengths adds (memory.py's storage):
    int8 keys and values, a float16 scale per key channel and chunk and one per value token."""
    if model.memory_storage is None:
        return 0
    layers, heads, dim = model.memory_shape
    tokens = sum(chunk_lengths)
    if model.memory_storage == "int8":
        return 2 * layers * heads * (dim * tokens + dim * len(chunk_lengths) + tokens)
    return 2 * layers * heads * dim * tokens * model.base.dtype.itemsize


class ResidentSessions:
    """Loaded sessions by id, least recently used first, under a cap on their memories' bytes
    (None: no cap)."""

    def __init__(self, size: int = 1024, cap: int | None = None):
        self.size, self.cap = size, cap
        self._lock = threading.Lock()
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._pins: Counter[str] = Counter()
        self.spilled = 0  # sessions dropped to make room for memory

    def get(self, session_id: str) -> Session | None:
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None:
                self._sessions.move_to_end(session_id)
            return session

    def pop(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(session_id, None)

    @contextmanager
    def pinned(self, session_id: str | None) -> Iterator[None]:
        """While inside, the session is in use and is not spilled (None: nothing pinned)."""
        if session_id is None:
            yield
            return
        with self._lock:
            self._pins[session_id] += 1
        try:
            yield
        finally:
            with self._lock:
                self._pins[session_id] -= 1
                if not self._pins[session_id]:
                    del self._pins[session_id]

    def make_room(self, session_id: str, nbytes: int) -> None:
        """Spill idle sessions until `session_id`, holding `nbytes` of memory, fits the cap.
        Raises MemoryCapExceeded (spilling nothing) when the idle sessions cannot make room."""
        with self._lock:
            self._make_room(session_id, nbytes)

    def put(self, session_id: str, session: Session, required: bool = True) -> None:
        """Hold `session` (it is in its file), spilling idle sessions for its memory. When that
        cannot make room: MemoryCapExceeded if `required`, else `session_id` is not held."""
        with self._lock:
            try:
                self._make_room(session_id, session.memory_bytes)
            except MemoryCapExceeded:
                self._sessions.pop(session_id, None)
                if required:
                    raise
                return
            self._sessions[session_id] = session
            self._sessions.move_to_end(session_id)
            idle = [s for s in self._sessions if s != session_id and not self._pins[s]]
            for other in idle[: max(0, len(self._sessions) - self.size)]:
                del self._sessions[other]

    def _make_room(self, session_id: str, nbytes: int) -> None:
        if self.cap is None:
            return
        others = {s: v.memory_bytes for s, v in self._sessions.items() if s != session_id}
        over = sum(others.values()) + nbytes - self.cap
        if over <= 0:
            return
        idle = [s for s, n in others.items() if n and not self._pins[s]]  # oldest first
        if sum(others[s] for s in idle) < over:
            busy = sum(others.values()) - sum(others[s] for s in idle)
            raise MemoryCapExceeded(
                f"the server holds at most {self.cap} bytes of session memory; this needs "
                f"{nbytes}, and sessions in use hold {busy}: try again when they are done"
            )
        for other in idle:
            over -= self._sessions.pop(other).memory_bytes
            self.spilled += 1
            if over <= 0:
                return

    def stats(self) -> dict:
        with self._lock:
            sessions = list(self._sessions.values())
        return {
            "loaded_sessions": len(sessions),
            "loaded_memory_tokens": sum(s.memory_tokens for s in sessions),
            "loaded_memory_bytes": sum(s.memory_bytes for s in sessions),
            "memory_cap_bytes": self.cap,
            "spilled_sessions": self.spilled,
        }
