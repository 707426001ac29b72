"""Uploads whose client leaves, and uploads retried with an Idempotency-Key (issue 25, item 1).
As tests/test_server.py: the default base with a random generator, a store of each test's own,
documents encoded one chunk per worker turn."""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor

from .conftest import DOCUMENT
from .server_kit import AUTH, DOCS, new_session, saved_session, served

LONG = DOCUMENT * 30  # about 100 chunks: seconds of encoding on a CPU
LIMITS = dict(max_document_bytes=64_000, max_document_tokens=8_000)


def _abandon(server, path: str, text: str) -> dict:
    """POST `text` to `path`, and once /health shows it being absorbed, close the connection
    without reading the response. Returns what /health showed."""
    host, port = server.url.removeprefix("http://").split(":")
    body = text.encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: text/plain\r\n"
        f"Authorization: {AUTH['Authorization']}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(head.encode() + body)
        deadline = time.monotonic() + 60
        while not (running := server.http.get("/health").json()["uploads"]):
            assert time.monotonic() < deadline, "the upload never started"
            time.sleep(0.02)
    return running[0]


def _wait_for_no_uploads(server, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while server.http.get("/health").json()["uploads"]:
        assert time.monotonic() < deadline, "an abandoned upload kept running"
        time.sleep(0.1)


def test_an_upload_whose_client_left_is_stopped_and_not_absorbed(random_model, tmp_path, caplog):
    with served(random_model, tmp_path, **LIMITS) as server:
        sid = new_session(server, DOCS[0])
        before = server.http.get(f"/v1/sessions/{sid}").json()
        assert server.http.post("/v1/libraries", json={"name": "notes"}).status_code == 201
        for path in (f"/v1/sessions/{sid}/documents", "/v1/libraries/notes/documents?name=x"):
            shown = _abandon(server, path, LONG)
            assert shown["chunks"] > 50 and shown["chunks_done"] < shown["chunks"], shown
            _wait_for_no_uploads(server)
        # Nothing was added: not to the session (in the API or its file), not to the library.
        assert server.http.get(f"/v1/sessions/{sid}").json() == before
        assert saved_session(random_model, server, sid).tokens == before["tokens"]
        assert server.http.get("/v1/libraries/notes").json()["entries"] == []
    abandoned = [r for r in caplog.records if "abandoned by its client" in r.getMessage()]
    assert len(abandoned) == 2 and not any(r.exc_info for r in abandoned)


def test_a_retried_upload_is_absorbed_once(random_model, tmp_path):
    with served(random_model, tmp_path, **LIMITS) as server:
        sid = new_session(server)
        url = f"/v1/sessions/{sid}/documents"
        key = {"Idempotency-Key": "upload-1"}
        first = server.http.post(url, json={"text": DOCS[1]}, headers=key)
        assert first.status_code == 201 and "Idempotent-Replayed" not in first.headers
        again = server.http.post(url, json={"text": DOCS[1]}, headers=key)
        assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
        assert again.json() == first.json()
        info = server.http.get(f"/v1/sessions/{sid}").json()
        assert info["document_count"] == 1 and info["tokens"] == first.json()["document"]["tokens"]
        # Another key is another upload; keys are per session.
        other = server.http.post(url, json={"text": DOCS[1]}, headers={"Idempotency-Key": "2"})
        assert other.status_code == 201 and other.json()["session"]["document_count"] == 2
        sid2 = new_session(server)
        r = server.http.post(f"/v1/sessions/{sid2}/documents", json={"text": DOCS[2]}, headers=key)
        assert r.status_code == 201 and "Idempotent-Replayed" not in r.headers
        # A retry sent while the first is still encoding waits for it, then is replayed.
        slow = {"Idempotency-Key": "long", "Content-Type": "text/plain"}
        text = (DOCUMENT * 6).encode()  # about 20 chunks: long enough to be caught running
        with ThreadPoolExecutor(1) as pool:
            first_try = pool.submit(server.http.post, url, content=text, headers=slow)
            while not server.http.get("/health").json()["uploads"]:
                time.sleep(0.02)
            r2 = server.http.post(url, content=text, headers=slow)
            r1 = first_try.result()
        assert r1.status_code == 201 and "Idempotent-Replayed" not in r1.headers
        assert r2.status_code == 201 and r2.headers["Idempotent-Replayed"] == "true"
        assert r2.json() == r1.json()
        assert server.http.get(f"/v1/sessions/{sid}").json()["document_count"] == 3
        # Library entries too; a malformed key is refused.
        assert server.http.post("/v1/libraries", json={"name": "lib"}).status_code == 201
        body = {"text": DOCS[3], "name": "e"}
        r = server.http.post("/v1/libraries/lib/documents", json=body, headers=key)
        assert r.status_code == 201
        r = server.http.post("/v1/libraries/lib/documents", json=body, headers=key)
        assert r.status_code == 201 and r.headers["Idempotent-Replayed"] == "true"
        r = server.http.post(url, json={"text": "x"}, headers={"Idempotency-Key": "\x01"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_header"
