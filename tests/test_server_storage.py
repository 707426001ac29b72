"""What the server writes to its store: files any user's umask allows others to read, and a full
disk reported as such, with nothing lost (issue 25, items 4 and 5). As tests/test_server.py: the
default base with a random generator, a store of each test's own."""

from __future__ import annotations

import errno
import os

import pytest

from .conftest import DOCUMENT, assert_umask_modes, usual_umask
from .server_kit import DOCS, ask, new_session, saved_session, served


def test_the_store_gets_the_modes_the_umask_gives(random_model, tmp_path):
    with usual_umask(), served(random_model, tmp_path / "store") as server:
        sid = new_session(server, DOCS[0])
        r = server.http.post("/v1/libraries", json={"name": "notes"})
        assert r.status_code == 201, r.text
        r = server.http.post("/v1/libraries/notes/documents", json={"text": DOCS[1], "name": "a"})
        assert r.status_code == 201, r.text
        assert server.http.get(f"/v1/sessions/{sid}").json()["document_count"] == 1
    assert_umask_modes(tmp_path / "store")


def _disk_full(fd: int) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["session", "library"])
def test_a_full_disk_is_a_507_and_loses_nothing(random_model, tmp_path, monkeypatch, where):
    # Every write of the store is atomic (temp file, fsync, rename): a disk that fills up fails
    # the fsync, the way ENOSPC reaches a write that the page cache first accepted.
    with served(random_model, tmp_path / "store") as server:
        sid = new_session(server, DOCS[0])
        before = server.http.get(f"/v1/sessions/{sid}").json()
        assert server.http.post("/v1/libraries", json={"name": "notes"}).status_code == 201
        if where == "session":
            url, body = f"/v1/sessions/{sid}/documents", {"text": DOCUMENT}
        else:
            url, body = "/v1/libraries/notes/documents", {"text": DOCUMENT, "name": "rail"}
        with monkeypatch.context() as patch:
            patch.setattr(os, "fsync", _disk_full)
            r = server.http.post(url, json=body)
        assert r.status_code == 507, r.text
        error = r.json()["error"]
        assert (error["code"], error["type"]) == ("insufficient_storage", "server_error")
        assert "No space left on device" in error["message"]
        # Nothing changed, in the API or on disk, and the same request succeeds once there is room.
        assert server.http.get(f"/v1/sessions/{sid}").json() == before
        assert saved_session(random_model, server, sid).tokens == before["tokens"]
        assert server.http.get("/v1/libraries/notes").json()["entries"] == []
        chat = {"messages": ask("What is it?"), "session_id": sid, "max_tokens": 2}
        assert server.http.post("/v1/chat/completions", json=chat).status_code == 200
        assert server.http.post(url, json=body).status_code == 201
        assert not [p for p in (tmp_path / "store").rglob("*") if p.name.endswith(".tmp")]
