"""Document uploads being absorbed (a session's document, a library entry): what `/health`
shows of them, an upload whose client goes away stopped at the next chunk with nothing committed,
and `Idempotency-Key` so that a retried upload is absorbed once (as payment APIs do: the first
request's response is replayed, marked `Idempotent-Replayed: true`).

Keys are kept per target (a session, a library) in STORE/uploads.sqlite. A retry that arrives
while the first request still runs waits for it: replayed if it succeeded, run anew if it failed
or its client left. A key is recorded just after its document is committed, so a server killed
between the two absorbs a retry again."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request
from fastapi.responses import JSONResponse

log = logging.getLogger(__name__)

KEY_HEADER = "idempotency-key"
REPLAYED_HEADER = "Idempotent-Replayed"
POLL_SECONDS = 0.2  # how often a running upload checks that its client is still there


class UploadAbandoned(Exception):
    """The client of an upload went away before it was absorbed: nothing was committed."""


class BadIdempotencyKey(ValueError):
    """An Idempotency-Key header that is not 1-255 printable characters."""


@dataclass
class Upload:
    """One upload being absorbed: its target, its chunks and how many are done."""

    target: str  # "session ID", "library NAME, entry ENTRY"
    chunks: int
    done: int = 0
    abandoned: bool = False  # set when the client is gone; the encoder then stops
    started: float = field(default_factory=time.time)

    def check(self) -> None:
        """Raise UploadAbandoned when the client is gone (between two chunks)."""
        if self.abandoned:
            raise UploadAbandoned(f"{self.target}: the client left after {self.done} chunks")


class Uploads:
    """The server's running uploads and its idempotency keys."""

    def __init__(self, root: Path):
        self._db = sqlite3.connect(root / "uploads.sqlite", check_same_thread=False)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS idempotency (target TEXT, key TEXT, response TEXT, "
            "created REAL, PRIMARY KEY (target, key))"
        )
        self._db.commit()
        self._db_lock = threading.Lock()
        self.running: list[Upload] = []
        self._in_flight: dict[tuple[str, str], asyncio.Event] = {}

    def close(self) -> None:
        self._db.close()

    def health(self) -> list[dict]:
        """The running uploads, oldest first: target, chunks done and in all, seconds."""
        now = time.time()
        return [
            {"target": u.target, "chunks_done": u.done, "chunks": u.chunks,
             "seconds": round(now - u.started, 1)}
            for u in self.running
        ]  # fmt: skip

    @asynccontextmanager
    async def absorbing(self, request: Request, target: str, chunks: int) -> AsyncIterator[Upload]:
        """An Upload for the block, shown by `health`, marked abandoned when `request`'s client
        disconnects. UploadAbandoned raised in the block is logged as one line and re-raised."""
        upload = Upload(target, chunks)
        self.running.append(upload)

        async def watch() -> None:
            while not await request.is_disconnected():
                await asyncio.sleep(POLL_SECONDS)
            upload.abandoned = True

        watcher = asyncio.create_task(watch())
        try:
            yield upload
        except UploadAbandoned:
            log.warning("upload to %s abandoned by its client after %d of %d chunks: "
                        "nothing absorbed", target, upload.done, chunks)  # fmt: skip
            raise
        finally:
            watcher.cancel()
            self.running.remove(upload)

    @asynccontextmanager
    async def once(self, request: Request, target: str) -> AsyncIterator[Replay]:
        """Run the block once per (target, Idempotency-Key): a Replay whose `response` is the
        first request's (the block should return it as is) or None (absorb, then `keep` the
        response). Without the header, always None. BadIdempotencyKey for a malformed key."""
        key = request.headers.get(KEY_HEADER)
        if key is None:
            yield Replay(None)
            return
        if not 1 <= len(key) <= 255 or not key.isprintable():
            raise BadIdempotencyKey("Idempotency-Key: give 1-255 printable characters")
        slot = (target, key)
        while (running := self._in_flight.get(slot)) is not None:
            await running.wait()  # the same upload is running: its outcome decides
        self._in_flight[slot] = asyncio.Event()
        try:
            replay = Replay(self._recall(target, key))
            yield replay
            if replay.response is None and replay.kept is not None:
                self._remember(target, key, replay.kept)
        finally:
            self._in_flight.pop(slot).set()

    def _recall(self, target: str, key: str) -> dict | None:
        with self._db_lock:
            rows = self._db.execute(
                "SELECT response FROM idempotency WHERE target = ? AND key = ?", (target, key)
            ).fetchall()
        return json.loads(rows[0][0]) if rows else None

    def _remember(self, target: str, key: str, response: dict) -> None:
        with self._db_lock, self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO idempotency VALUES (?, ?, ?, ?)",
                (target, key, json.dumps(response), time.time()),
            )

    def forget(self, target: str) -> None:
        """Drop the keys of a deleted target (a session or library of that name may follow)."""
        with self._db_lock, self._db:
            self._db.execute("DELETE FROM idempotency WHERE target = ?", (target,))


def replayed(response: dict) -> JSONResponse:
    """The first response of an upload retried with its Idempotency-Key, replayed."""
    return JSONResponse(response, status_code=201, headers={REPLAYED_HEADER: "true"})


@dataclass
class Replay:
    """What `Uploads.once` found: the first request's response, or None; `kept` is set by the
    block to the response to replay to later requests with the same key."""

    response: dict | None
    kept: dict | None = None
