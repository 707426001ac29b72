"""The server's adapter-library endpoints (genadapter/server/libraries.py, library_store.py) and
chats routed over a library (routed.py), on the default base with a random generator, as
tests/test_server.py. Tiny documents and short answers: these tests must stay fast."""

from __future__ import annotations

import json
import shutil
import time

import httpx
import pytest
import torch

from genadapter.generation import SamplingParams
from genadapter.library.folder import Library
from genadapter.server.worker import ModelWorker
from genadapter.session import Session

from .library_kit import DOCS, QUESTIONS
from .server_kit import (
    CHAT,
    TIMEOUT,
    ask,
    drain,
    new_session,
    prompt_ids,
    reference_answer,
    saved_session,
    served,
)

LIB = "/v1/libraries"


@pytest.fixture(scope="module")
def server(random_model, tmp_path_factory):
    """A server of this module's own, with its own store."""
    with served(random_model, tmp_path_factory.mktemp("store")) as running_server:
        yield running_server


@pytest.fixture(scope="module")
def one(server, random_model) -> Library:
    """The server's library "one", with one entry ("bees"), opened here as well (read only)."""
    new_library(server, "one", bees=DOCS["bees"])
    return Library.open(server.store / "libraries" / "one", random_model)


def new_library(server, name: str, **entries: str) -> None:
    r = server.http.post(LIB, json={"name": name})
    assert r.status_code == 201, r.text
    for entry, text in entries.items():
        r = server.http.post(f"{LIB}/{name}/documents", json={"text": text, "name": entry})
        assert r.status_code == 201, r.text


def assert_error(r: httpx.Response, status: int, code: str, param: str | None = None) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert error["code"] == code and error["message"], error
    if param is not None:
        assert error["param"] == param, error


def test_library_create_add_list_search_remove_round_trip(server):
    r = server.http.post(LIB, json={"name": "manuals"})
    assert r.status_code == 201, r.text
    assert r.json() == {
        "object": "library",
        "name": "manuals",
        "entry_count": 0,
        "tokens": 0,
        "memory_tokens": 0,
        "memory_bytes": 0,
        "entries": [],
    }
    r = server.http.post(f"{LIB}/manuals/documents", json={"text": DOCS["bees"], "name": "bees"})
    assert r.status_code == 201, r.text
    entry = r.json()["entry"]
    assert entry["name"] == "bees" and entry["tokens"] > 10
    # The entry keeps the context memory of what it absorbed (one memory token per token).
    assert entry["memory_tokens"] == entry["tokens"] and entry["memory_bytes"] > 0
    r = server.http.post(  # text/plain, the entry's name in the query
        f"{LIB}/manuals/documents?name=ocean",
        content=DOCS["ocean"].encode(),
        headers={"Content-Type": "text/plain"},
    )
    assert r.status_code == 201, r.text
    listed = server.http.get(LIB).json()["data"]
    (manuals,) = [d for d in listed if d["name"] == "manuals"]
    assert manuals["entry_count"] == 2 and "entries" not in manuals
    info = server.http.get(f"{LIB}/manuals").json()
    assert [e["name"] for e in info["entries"]] == ["bees", "ocean"]
    assert info["tokens"] == sum(e["tokens"] for e in info["entries"])
    assert info["memory_bytes"] == sum(e["memory_bytes"] for e in info["entries"]) > 0
    for entry, other in (("bees", "ocean"), ("ocean", "bees")):
        r = server.http.post(f"{LIB}/manuals/search", json={"query": QUESTIONS[entry], "k": 2})
        assert r.status_code == 200, r.text
        hits = r.json()["data"]
        assert [h["name"] for h in hits] == [entry, other]
        assert [h["rank"] for h in hits] == [1, 2] and hits[0]["score"] >= hits[1]["score"]
    r = server.http.post(f"{LIB}/manuals/documents", json={"text": "again", "name": "bees"})
    assert_error(r, 409, "entry_name_taken", "name")
    r = server.http.delete(f"{LIB}/manuals/documents/ocean")
    assert r.status_code == 200 and r.json()["deleted"], r.text
    assert [e["name"] for e in server.http.get(f"{LIB}/manuals").json()["entries"]] == ["bees"]
    assert_error(server.http.delete(f"{LIB}/manuals/documents/ocean"), 404, "entry_not_found")
    assert_error(server.http.post(LIB, json={"name": "manuals"}), 409, "library_name_taken")
    r = server.http.delete(f"{LIB}/manuals")
    assert r.status_code == 200 and r.json()["deleted"], r.text
    assert_error(server.http.get(f"{LIB}/manuals"), 404, "library_not_found")
    assert "manuals" not in [d["name"] for d in server.http.get(LIB).json()["data"]]
    assert not list((server.store / "libraries").iterdir())  # nothing left behind


def test_routed_chat_over_one_entry_is_that_entrys_session(server, random_model, one):
    # Its state, and its context memory read as the entry's own session reads it.
    messages = ask("What do the workers do?")
    session, _ = one.load("bees")
    assert session.chat_layout(messages, 4).read is not None  # the question reads the memory
    expected = reference_answer(random_model, session, messages, 4)
    assert expected != reference_answer(random_model, session.state, messages, 4)
    body = {"messages": messages, "library": "one", "max_tokens": 4, "temperature": 0}
    r = server.http.post(CHAT, json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == expected
    assert r.json()["library"] == "one" and r.json()["session_id"] is None
    with server.http.stream("POST", CHAT, json={**body, "stream": True, "library_k": 1}) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert not [e for e in events if "error" in e]
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == expected


def test_an_upload_named_by_an_ordinary_file_name_gets_an_entry_name_from_it(server):
    # Issue 25, item 6: "my notes.txt" is what a user's file is called, not a bad request.
    assert server.http.post(LIB, json={"name": "uploads"}).status_code == 201
    names = {"my notes.txt": "my-notes.txt", "C:\\docs\\ü bees!.md": "bees-.md"}
    for filename, expected in names.items():
        files = {"file": (filename, DOCS["bees"].encode(), "text/plain")}
        r = server.http.post(f"{LIB}/uploads/documents", files=files)
        assert r.status_code == 201, r.text
        assert r.json()["entry"]["name"] == expected
    # A name given explicitly is used as given (and checked), before the file's.
    files = {"file": ("my notes.txt", DOCS["ocean"].encode(), "text/plain")}
    r = server.http.post(f"{LIB}/uploads/documents?name=ocean", files=files)
    assert r.status_code == 201 and r.json()["entry"]["name"] == "ocean", r.text
    r = server.http.post(f"{LIB}/uploads/documents?name=my%20notes", files=files)
    assert_error(r, 422, "invalid_body", "name")
    files = {"file": ("!!!", b"text", "text/plain")}
    r = server.http.post(f"{LIB}/uploads/documents", files=files)
    assert_error(r, 422, "invalid_body", "name")
    assert server.http.delete(f"{LIB}/uploads").status_code == 200


@pytest.mark.parametrize(
    "method, path, body, status, code, param",
    [
        ("post", LIB, {"name": "-dash"}, 422, "invalid_body", "name"),
        ("post", LIB, {"name": "a/b"}, 422, "invalid_body", "name"),
        ("post", LIB, {"name": "x" * 65}, 422, "invalid_body", "name"),
        ("post", LIB, {}, 422, "invalid_body", "name"),
        ("get", f"{LIB}/nowhere", None, 404, "library_not_found", "library"),
        ("get", f"{LIB}/%2E%2E", None, 404, "library_not_found", "library"),
        ("post", f"{LIB}/empty/search", {"query": "q", "kind": "x"}, 422, "invalid_body", "kind"),
        ("delete", f"{LIB}/nowhere", None, 404, "library_not_found", "library"),
        ("post", f"{LIB}/nowhere/search", {"query": "q"}, 404, "library_not_found", "library"),
        ("post", f"{LIB}/empty/search", {"query": "q"}, 409, "library_empty", "library"),
        ("post", f"{LIB}/empty/search", {"query": "q", "k": 0}, 422, "invalid_body", "k"),
        ("post", f"{LIB}/empty/search", {"query": ""}, 422, "invalid_body", "query"),
        ("post", f"{LIB}/empty/documents", {"text": "hi"}, 422, "invalid_body", "name"),
        ("post", f"{LIB}/empty/documents", {"text": "hi", "name": "../x"}, 422, None, "name"),
        ("post", f"{LIB}/empty/documents", {"text": "", "name": "e"}, 422, None, None),
        ("delete", f"{LIB}/empty/documents/nothing", None, 404, "entry_not_found", None),
        ("chat", {"library": "nowhere"}, None, 404, "library_not_found", "library"),
        ("chat", {"library": "../store"}, None, 404, "library_not_found", "library"),
        ("chat", {"library": "empty"}, None, 409, "library_empty", "library"),
        ("chat", {"library": "empty", "library_k": 0}, None, 422, "invalid_body", "library_k"),
        ("chat", {"library": "empty", "library_k": 65}, None, 422, "invalid_body", "library_k"),
        ("chat", {"library_k": 2}, None, 422, "invalid_body", "library_k"),
        ("chat", {"library": "empty", "model": "nope"}, None, 404, "model_not_found", "model"),
        ("chat", {"library": "empty", "session_id": "SID"}, None, 400, "library_and_session", None),
        ("chat", {"library": "empty", "model": "SID"}, None, 400, "library_and_session", "model"),
    ],
)
def test_bad_library_requests_get_the_error_shape(server, method, path, body, status, code, param):
    if server.http.get(f"{LIB}/empty").status_code == 404:
        assert server.http.post(LIB, json={"name": "empty"}).status_code == 201
    if method == "chat":  # `path` holds the chat's extra fields
        fields = dict(path)
        for key in ("session_id", "model"):
            if fields.get(key) == "SID":
                fields[key] = new_session(server)
        r = server.http.post(CHAT, json={"messages": ask("hi"), "max_tokens": 2, **fields})
    else:
        r = server.http.request(method.upper(), path, json=body)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert error["message"] and (code is None or error["code"] == code), error
    assert param is None or error["param"] == param, error


def test_adding_a_long_document_does_not_hold_up_a_chat(server, random_model):
    """The model thread absorbs a library document a chunk per turn: a chat sent while a long
    document is being added is answered before the add ends (it waited for all of it before)."""
    from concurrent.futures import ThreadPoolExecutor

    text = " ".join([DOCS["bees"]] * 10)  # about half the test server's 1,000-token limit
    assert len(random_model.tokenizer.encode(text)) > 7 * random_model.chunk_tokens
    new_library(server, "long")
    with ThreadPoolExecutor(1) as pool:
        body = {"text": text, "name": "bees"}
        add = pool.submit(server.http.post, f"{LIB}/long/documents", json=body)
        # Under way by then (absorbing its 8 chunks takes seconds); were it not, the chat would
        # still come first, so the wait cannot fail the test, only let it miss the old behaviour.
        time.sleep(0.3)
        r = server.http.post(CHAT, json={"messages": ask("Hi"), "max_tokens": 4})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"], r.text
        assert not add.done(), "the chat waited for the whole document"
        assert add.result().status_code == 201, add.result().text
    # Absorbed a chunk at a time, the entry is the document's: the state and the memory a
    # session makes (one document, its chunks' blocks in order).
    stored = Library.open(server.store / "libraries" / "long", random_model).load("bees")[0]
    direct = Session(random_model)
    direct.absorb(text)
    assert stored.state.tokens == direct.state.tokens and stored.state.documents == 1
    for n, s in direct.state.sums.items():
        assert torch.allclose(stored.state.sums[n], s, rtol=1e-4, atol=1e-4), n
    assert stored.memory.tokens == direct.memory.tokens and stored.memory.documents == 1
    blocks = [(c.document, c.offset, c.tokens) for c in stored.memory.chunks]
    assert blocks == [(c.document, c.offset, c.tokens) for c in direct.memory.chunks]


def test_a_bad_library_request_leaves_another_users_chat_alone(server, random_model, one):
    """A chat over a library whose entry is damaged fails with the error shape (a 500
    corrupt_state, from the request's own thread) while another user's streamed answer goes on."""
    damaged = server.store / "libraries" / "damaged"
    shutil.copytree(one.path, damaged)
    state = damaged / "entries" / "bees" / "state.safetensors"
    data = bytearray(state.read_bytes())
    data[-1] ^= 0xFF
    state.write_bytes(bytes(data))
    sid = new_session(server, DOCS["ocean"])
    messages = ask("Describe the ocean.")
    expected = reference_answer(random_model, saved_session(random_model, server, sid), messages, 4)
    body = {"messages": messages, "session_id": sid, "max_tokens": 4, "temperature": 0}
    with server.http.stream("POST", CHAT, json={**body, "stream": True}) as r:
        lines = r.iter_lines()
        first = next(lines)  # under way
        bad = server.http.post(CHAT, json={"messages": ask("hi"), "library": "damaged"})
        rest = [line for line in lines if line]
    assert_error(bad, 500, "corrupt_state")
    # The internal embedding reads the entries' states (lexical search reads its own files).
    search = server.http.post(f"{LIB}/damaged/search", json={"query": "bees", "kind": "internal"})
    assert_error(search, 500, "corrupt_state")  # not a 422 on the query
    # An entry added before lexical embeddings existed: the default search falls back to the
    # internal embedding; a lexical one is refused with the error shape.
    shutil.copytree(one.path, server.store / "libraries" / "old")
    (server.store / "libraries" / "old" / "entries" / "bees" / "lexical.safetensors").unlink()
    r = server.http.post(f"{LIB}/old/search", json={"query": "bees"})
    assert r.status_code == 200 and r.json()["data"][0]["name"] == "bees", r.text
    r = server.http.post(f"{LIB}/old/search", json={"query": "bees", "kind": "lexical"})
    assert_error(r, 409, "embedding_missing", "kind")
    listing = server.http.get(LIB).json()["data"]  # the damaged one does not hide the others
    assert {"one", "damaged"} <= {row["name"] for row in listing}
    events = [json.loads(line[6:]) for line in [first, *rest[:-1]]]
    assert not [e for e in events if "error" in e]
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == expected


def test_the_worker_fails_only_the_routed_chat_that_failed(random_model, one):
    """Routed chats run as rows of their own: broken routes fail that chat alone, in its
    prefill or in a decode step, while a batched chat and a good routed chat go on."""
    routes = one.routes(2)
    prompt = prompt_ids(random_model, ask("Tell me about bees."))
    params = SamplingParams(max_new_tokens=3)
    session, _ = one.load("bees")
    worker = ModelWorker(random_model, max_batch=4).start()
    try:
        batched = worker.chat(prompt, session.state, params)
        good = worker.chat(prompt, None, params, routes=routes)
        at_prefill = worker.chat(prompt, None, params, routes={})  # no layer's routes
        later = dict(routes)
        long = SamplingParams(max_new_tokens=200)
        at_step = worker.chat(prompt, None, long, routes=later)
        at_step.tokens.get(timeout=TIMEOUT)  # prefilled; its next step fails
        later.clear()
        ends = [drain(job) for job in (batched, good, at_prefill, at_step)]
        assert worker.alive
    finally:
        worker.stop()
    (batched_tokens, batched_end), (good_tokens, good_end), prefill, step = ends
    assert (len(good_tokens), good_end.reason) == (3, "length")
    assert (batched_tokens, batched_end.reason) == (good_tokens, "length")  # one entry: the same
    assert prefill[1].reason == "error" and prefill[1].error.startswith("KeyError")
    assert step[1].reason == "error" and step[1].error.startswith("KeyError")
    assert worker.pending == 0
