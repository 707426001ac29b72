"""The server's failures in the error shape, the context window, clients that leave, sessions as
models (vLLM's convention) and persistence across a restart."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch

from genadapter.base import load_base
from genadapter.generator import Generator
from genadapter.model import AdaptedModel
from genadapter.server.app import create_app
from genadapter.server.store import DocumentInfo, SessionStore

from .conftest import DOCUMENT, TEST_CHUNK, make_tiny_base
from .server_kit import (
    AUTH,
    CHAT,
    DOCS,
    MODEL,
    TIMEOUT,
    ask,
    new_session,
    prompt_ids,
    reference_answer,
    running,
    saved_session,
    served,
)

# -- every failure in the error shape; the window; clients that leave ----------------------------

LIGHTHOUSE = "lighthouse " * 9000  # 9,032 prompt tokens; the window is 8,192


@pytest.fixture
def roomy(random_model, tmp_path):
    """The model served with the default limits (bodies up to 4 MiB), for prompts too long for
    the window: they are refused before the model runs, so this worker never competes with the
    module's server for the model."""
    with running(create_app(random_model, tmp_path)) as url:
        with httpx.Client(base_url=url, timeout=TIMEOUT) as http:
            yield http


@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_beyond_the_window_without_max_tokens_is_a_400(roomy, stream):
    for extra in ({}, {"max_tokens": 16}):
        body = {"messages": ask(LIGHTHOUSE), "stream": stream, **extra}
        r = roomy.post(CHAT, json=body)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "context_length_exceeded"
        assert "9032" in r.json()["error"]["message"]


def test_a_prompt_that_fills_the_window_leaves_no_room_and_is_a_400(roomy, random_model):
    window = random_model.max_positions
    overhead = len(prompt_ids(random_model, ask("lighthouse " * 100))) - 100
    messages = ask("lighthouse " * (window - overhead))
    assert len(prompt_ids(random_model, messages)) == window
    for stream in (False, True):
        r = roomy.post(CHAT, json={"messages": messages, "stream": stream})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "context_length_exceeded"


@pytest.fixture(scope="module")
def tiny_model(random_model, tmp_path_factory):
    """A one-layer random model with a 2,048-token window: fast enough to fill it on a CPU."""
    folder = make_tiny_base(
        tmp_path_factory.mktemp("tiny") / "base", random_model.tokenizer, layers=1, hidden=16
    )
    base = load_base(folder, device="cpu", dtype=torch.float32)
    return AdaptedModel(base, Generator.for_base(base.model), chunk_tokens=TEST_CHUNK)


def test_without_max_tokens_the_answer_may_fill_the_window(tiny_model, tmp_path):
    room = 520  # more than the 512 tokens the server used to stop at
    overhead = len(prompt_ids(tiny_model, ask("lighthouse " * 100))) - 100
    words = tiny_model.max_positions - overhead - room
    messages = ask("lighthouse " * words)
    assert len(prompt_ids(tiny_model, messages)) == tiny_model.max_positions - room
    with running(create_app(tiny_model, tmp_path)) as url:
        r = httpx.post(f"{url}{CHAT}", json={"messages": messages, "temperature": 0}, timeout=300)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == room
    assert r.json()["choices"][0]["finish_reason"] == "length"


def test_library_exceptions_reach_clients_in_the_error_shape(random_model, tiny_model, tmp_path):
    # A session whose saved state belongs to another model, served by this one: a 409.
    store = SessionStore(tmp_path, random_model)
    sid = store.create()
    store.close()
    app = create_app(tiny_model, tmp_path)

    async def fail():  # what a library bug looks like from the app
        raise ValueError("max_new_tokens must be a non-negative int, got -840")

    app.add_api_route("/v1/fail", fail)
    with running(app) as url:
        info = httpx.get(f"{url}/v1/sessions/{sid}")
        chat = httpx.post(f"{url}{CHAT}", json={"messages": ask("hi"), "session_id": sid})
        bug = httpx.get(f"{url}/v1/fail")
        nowhere = httpx.get(f"{url}/v1/nowhere")
    for r, status, code in (
        (info, 409, "incompatible_session"),
        (chat, 409, "incompatible_session"),
        (bug, 500, "internal_error"),
        (nowhere, 404, "not_found"),
    ):
        assert r.status_code == status, r.text
        assert r.headers["content-type"] == "application/json"
        assert r.json()["error"]["code"] == code
    assert "ValueError: max_new_tokens" in bug.json()["error"]["message"]
    assert bug.json()["error"]["type"] == "server_error"


def test_a_non_streamed_chat_stops_when_its_client_is_gone(server):
    worker = server.app.state.worker
    steps = worker.steps
    body = {"messages": ask("Write a long story."), "max_tokens": 4000, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):  # like `curl -m 2`: the client gives up
        httpx.post(server.url + CHAT, json=body, headers=AUTH, timeout=3)
    deadline = time.monotonic() + 20
    while worker.pending and time.monotonic() < deadline:
        time.sleep(0.1)
    assert worker.pending == 0, "a non-streamed chat kept generating after its client left"
    assert worker.steps > steps  # it had been generating
    steps = worker.steps
    time.sleep(0.5)
    assert worker.steps == steps


# -- sessions as models (vLLM's convention), for clients that send no extra fields ---------------


def test_a_session_is_a_model(server, random_model):
    sid = new_session(server)
    r = server.http.post("/v1/sessions", json={"name": "quill-bees"})
    assert r.status_code == 201 and r.json()["name"] == "quill-bees", r.text
    named = r.json()["id"]
    r = server.http.post("/v1/sessions/quill-bees/documents", json={"text": DOCS[0]})
    assert r.status_code == 201 and r.json()["session_id"] == named
    assert server.http.get("/v1/sessions/quill-bees").json()["id"] == named

    cards = server.openai.models.list().data
    assert cards[0].id == MODEL
    by_id = {c.id: c for c in cards}
    assert by_id["quill-bees"].session_id == named and by_id[sid].session_id == sid
    assert by_id["quill-bees"].parent == MODEL
    assert server.openai.models.retrieve("quill-bees").session_id == named

    messages = ask("Who keeps bees?")
    expected = reference_answer(
        random_model, saved_session(random_model, server, named), messages, 6
    )
    for model in ("quill-bees", named):
        r = server.openai.chat.completions.create(
            model=model, messages=messages, max_tokens=6, temperature=0
        )
        assert (r.choices[0].message.content, r.model) == (expected, model)
    stream = server.openai.chat.completions.create(
        model="quill-bees", messages=messages, max_tokens=6, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected
    # session_id still works, beside the base model's name and its aliases.
    base = reference_answer(random_model, None, messages, 6)
    for model, extra, answer in (
        (MODEL, {"session_id": named}, expected),
        (MODEL.lower(), {}, base),
        (f"HuggingFaceTB/{MODEL}", {}, base),
    ):
        r = server.openai.chat.completions.create(
            model=model, messages=messages, max_tokens=6, temperature=0, extra_body=extra
        )
        assert r.choices[0].message.content == answer


@pytest.mark.parametrize(
    "body, status, code",
    [
        ({"model": "gpt-4o"}, 404, "model_not_found"),
        ({"model": "B" * 32}, 404, "model_not_found"),
        ({"model": "gpt-4o", "stream": True}, 404, "model_not_found"),
        ({"model": "taken-name", "session_id": "other"}, 400, "session_mismatch"),
        ({"session_id": "no-such-name"}, 404, "session_not_found"),
    ],
)
def test_unknown_models_are_404s(server, body, status, code):
    for name in ("taken-name", "other"):
        server.http.post("/v1/sessions", json={"name": name})  # a 409 after the first time
    r = server.http.post(CHAT, json={"messages": ask("hi"), "max_tokens": 2, **body})
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    r = server.http.get("/v1/models/gpt-4o")
    assert (r.status_code, r.json()["error"]["code"]) == (404, "model_not_found")


@pytest.mark.parametrize(
    "body, status, code",
    [
        ({"name": "dup-name"}, 409, "session_name_taken"),  # made once below, then again
        ({"name": MODEL}, 409, "session_name_taken"),
        ({"name": MODEL.upper()}, 409, "session_name_taken"),
        ({"name": "has space"}, 422, "invalid_body"),
        ({"name": "x" * 65}, 422, "invalid_body"),
        ({"name": "A" * 32}, 422, "invalid_body"),  # could be read as a session id
        ({"name": 5}, 422, "invalid_body"),
        ({"nmae": "typo"}, 422, "invalid_body"),
    ],
)
def test_session_names_are_unique_and_cannot_be_a_model_or_an_id(server, body, status, code):
    server.http.post("/v1/sessions", json={"name": "dup-name"})
    before = len(server.http.get("/v1/sessions").json()["data"])
    r = server.http.post("/v1/sessions", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    assert len(server.http.get("/v1/sessions").json()["data"]) == before


def test_a_store_made_before_session_names_opens_and_names_sessions(random_model, tmp_path):
    import sqlite3

    old = sqlite3.connect(tmp_path / "sessions.db")
    old.executescript(
        "CREATE TABLE sessions (id TEXT PRIMARY KEY, created REAL NOT NULL, updated REAL NOT NULL);"
    )
    old.close()
    store = SessionStore(tmp_path, random_model)
    sid = store.create("later")
    assert store.find("later") == sid and store.info(sid)["name"] == "later"
    store.close()


# -- persistence ---------------------------------------------------------------------------------


def test_interrupted_write_leaves_the_previous_state(random_model, tmp_path, monkeypatch):
    store = SessionStore(tmp_path, random_model)
    sid = store.create()
    delta = random_model.encode(DOCS[0])[0]
    store.add(sid, delta, DocumentInfo("a", 1, delta.tokens, delta.chunks, 0.0))
    before = store.state(sid).checksum()

    def crash(fd):  # the machine dies after writing the temp file, before the rename
        raise OSError("simulated power loss")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="power loss"):
        store.add(sid, delta, DocumentInfo("b", 1, delta.tokens, delta.chunks, 0.0))
    monkeypatch.undo()
    assert store.state(sid).checksum() == before
    # A write killed outright leaves a torn temp file; a restart ignores and removes it.
    (tmp_path / "states" / f".{sid}.safetensors.x1y2.tmp").write_bytes(b"torn")
    store.close()
    reopened = SessionStore(tmp_path, random_model)
    assert reopened.state(sid).checksum() == before
    assert [d.name for d in reopened.documents(sid)] == ["a"]
    assert not list((tmp_path / "states").glob(".*"))
    reopened.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_process(store: Path, port: int, log: Path):
    """`genadapter serve` in its own process (default model and generator)."""
    cmd = [sys.executable, "-m", "genadapter.cli", "serve", "--port", str(port)]
    cmd += ["--store", str(store), "--chunk-tokens", str(TEST_CHUNK)]
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    # uvicorn shuts down gracefully, then re-raises the signal it caught.
    assert proc.returncode in (0, -signal.SIGTERM), log.read_text()
    assert "Application shutdown complete" in log.read_text()


def test_sessions_survive_a_restart(model, tmp_path):
    # The first server is a `genadapter serve` process stopped by SIGTERM; the second, over the
    # same store, is the same model in this process (it reads only what the first left on disk).
    port = _free_port()
    messages = ask("Which locomotive is in the museum?")
    store, log = tmp_path / "store", tmp_path / "serve.log"
    with serve_process(store, port, log) as url:
        sid = httpx.post(f"{url}/v1/sessions").json()["id"]
        r = httpx.post(f"{url}/v1/sessions/{sid}/documents", json={"text": DOCUMENT}, timeout=60)
        assert r.status_code == 201
        info = httpx.get(f"{url}/v1/sessions/{sid}").json()
        chat = {"messages": messages, "session_id": sid, "max_tokens": 8, "temperature": 0}
        answer = httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=60).json()
    assert info["tokens"] > 0
    with served(model, store) as again:
        assert again.http.get(f"/v1/sessions/{sid}").json() == info
        second = again.http.post("/v1/chat/completions", json=chat).json()
    assert second["choices"] == answer["choices"]
