"""`genadapter serve` against a real uvicorn on loopback (tests/server_kit.py), with httpx and the
official openai client: sessions, absorbing, chat (streaming or not) under each session's state,
concurrency, errors and limits. Answers are compared with the library decoding the same prompt
under the same state."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from genadapter.cli import main
from genadapter.server.store import SESSION_ID

from .conftest import DOCUMENT
from .server_kit import (
    CHAT,
    DOCS,
    KEY,
    MODEL,
    QUESTIONS,
    absorbed,
    ask,
    assert_states_close,
    new_session,
    reference_answer,
    saved_session,
    saved_state,
)

# -- sessions and documents ----------------------------------------------------------------------


def test_session_lifecycle(server, random_model):
    ids = [new_session(server) for _ in range(2)]
    assert ids[0] != ids[1] and all(SESSION_ID.fullmatch(i) for i in ids)
    info = server.http.get(f"/v1/sessions/{ids[0]}").json()
    assert (info["tokens"], info["document_count"], info["documents"]) == (0, 0, [])
    assert info["state_bytes"] == random_model.new_state().nbytes
    assert set(ids) <= set(server.http.get("/v1/sessions").json()["data"])
    r = server.http.delete(f"/v1/sessions/{ids[0]}")
    assert r.status_code == 200 and r.json()["deleted"] is True
    assert not (server.store / "states" / f"{ids[0]}.safetensors").exists()
    assert server.http.get(f"/v1/sessions/{ids[0]}").status_code == 404
    assert server.http.delete(f"/v1/sessions/{ids[0]}").status_code == 404
    assert server.http.get(f"/v1/sessions/{ids[1]}").status_code == 200


def test_absorb_plain_json_and_upload_sum_to_the_library_state(server, random_model):
    sid = new_session(server)
    url = f"/v1/sessions/{sid}/documents"
    sent = [
        server.http.post(url, content=DOCS[0].encode(), headers={"Content-Type": "text/plain"}),
        server.http.post(url, json={"text": DOCS[1], "name": "ferry.txt"}),
        server.http.post(url, files={"file": ("bakery.txt", DOCS[2].encode(), "text/plain")}),
    ]
    assert [r.status_code for r in sent] == [201] * 3, [r.text for r in sent]
    info = sent[-1].json()["session"]
    assert [d["name"] for d in info["documents"]] == [None, "ferry.txt", "bakery.txt"]
    expected = random_model.new_state()
    for doc in DOCS[:3]:
        expected.add_(absorbed(random_model, doc))
    assert (info["tokens"], info["chunks"], info["document_count"]) == (
        expected.tokens,
        expected.chunks,
        3,
    )
    assert [d["tokens"] for d in info["documents"]] == [
        absorbed(random_model, d).tokens for d in DOCS[:3]
    ]
    assert_states_close(saved_state(random_model, server, sid), expected)


def test_chat_non_streaming_and_streaming_use_the_session_state(server, random_model):
    sid = new_session(server, DOCUMENT)
    state = saved_session(random_model, server, sid)
    messages = ask("When was the line electrified?")
    expected = reference_answer(random_model, state, messages, 8)
    assert expected != reference_answer(random_model, None, messages, 8)  # the state matters

    r = server.openai.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=8,
        temperature=0,
        extra_body={"session_id": sid},
    )
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 0

    stream = server.openai.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"session_id": sid},
    )
    chunks = list(stream)
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == expected
    assert sum(1 for d in deltas if d) > 1  # it really streamed, piece by piece
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens

    # Without session_id the request is the base model's (an empty session).
    plain = server.openai.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, temperature=0
    )
    assert plain.choices[0].message.content == reference_answer(random_model, None, messages, 8)


def test_sse_format_and_stop_strings(server, random_model):
    sid = new_session(server, DOCS[3])
    messages = ask("Tell me about the observatory.")
    full = reference_answer(random_model, saved_session(random_model, server, sid), messages, 12)
    words = full.split()
    assert len(words) >= 3, full
    stop = " " + words[2]
    body = {"messages": messages, "session_id": sid, "max_tokens": 12, "temperature": 0}
    with server.http.stream(
        "POST", "/v1/chat/completions", json={**body, "stream": True, "stop": [stop]}
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert {e["object"] for e in events} == {"chat.completion.chunk"}
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
    assert text == full[: full.index(stop)]
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    r = server.http.post("/v1/chat/completions", json={**body, "stop": stop})
    assert r.json()["choices"][0]["message"]["content"] == text


def test_concurrent_absorbs_into_one_session_both_count(server, random_model):
    sid = new_session(server)
    docs = [DOCUMENT, " ".join(DOCS)]  # several chunks each, so the two encodings interleave
    with ThreadPoolExecutor(2) as pool:
        replies = list(
            pool.map(
                lambda d: server.http.post(f"/v1/sessions/{sid}/documents", json={"text": d}),
                docs,
            )
        )
    assert [r.status_code for r in replies] == [201, 201]
    expected = absorbed(random_model, docs[0]).add_(absorbed(random_model, docs[1]))
    info = server.http.get(f"/v1/sessions/{sid}").json()
    assert (info["tokens"], info["document_count"]) == (expected.tokens, 2)
    assert_states_close(saved_state(random_model, server, sid), expected)


def test_six_concurrent_chats_across_three_sessions(server, random_model):
    sessions = [new_session(server, doc) for doc in DOCS[:3]]
    jobs = [(sid, q, i % 2 == 0) for sid in sessions for i, q in enumerate(QUESTIONS[:2])]
    assert len(jobs) == 6
    worker = server.app.state.worker
    worker.max_rows = 0

    def chat(job):
        sid, question, stream = job
        kwargs = dict(model=MODEL, messages=ask(question), max_tokens=4, temperature=0)
        r = server.openai.chat.completions.create(
            **kwargs, stream=stream, extra_body={"session_id": sid}
        )
        if stream:
            return "".join(c.choices[0].delta.content or "" for c in r if c.choices)
        return r.choices[0].message.content

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(chat, jobs))
    states = {sid: saved_session(random_model, server, sid) for sid in sessions}
    expected = [reference_answer(random_model, states[s], ask(q), 4) for s, q, _ in jobs]
    assert answers == expected
    assert len(set(answers)) > 2  # sessions answer differently: their states were used
    # Decode steps of different sessions ran in one forward.
    assert worker.max_rows >= 2


def test_slow_reader_holds_up_nobody_and_disconnect_frees_its_row(server):
    sid = new_session(server, DOCS[4])
    worker = server.app.state.worker
    long = {"messages": ask("Write a long story."), "session_id": sid, "max_tokens": 4000}
    long["temperature"] = 0  # greedy: this answer runs on for far longer than the test
    with server.http.stream("POST", "/v1/chat/completions", json={**long, "stream": True}) as r:
        lines = r.iter_lines()  # kept: dropping the iterator would close the connection
        assert next(lines).startswith("data: ")
        # The slow stream is unread; another chat still completes.
        quick = server.openai.chat.completions.create(
            model=MODEL, messages=ask("Hi"), max_tokens=4, temperature=0
        )
        assert quick.choices[0].message.content
        assert worker.pending >= 1  # the long one is still being generated
    deadline = time.monotonic() + 60
    while worker.pending and time.monotonic() < deadline:
        time.sleep(0.1)
    assert worker.pending == 0, "a closed stream kept generating"


# -- errors and limits ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, path, kwargs, status",
    [
        (
            "POST",
            CHAT,
            {"content": b"{not json", "headers": {"Content-Type": "application/json"}},
            422,
        ),
        ("POST", CHAT, {"json": {"messages": []}}, 422),
        ("POST", CHAT, {"json": {"max_tokens": 4}}, 422),
        ("POST", CHAT, {"json": {"messages": [{"role": "wizard", "content": "hi"}]}}, 422),
        ("POST", CHAT, {"json": {"messages": ask("hi"), "max_tokens": -1}}, 422),
        ("POST", CHAT, {"json": {"messages": ask("hi"), "temperature": "hot"}}, 422),
        ("POST", CHAT, {"json": {"messages": ask("hi"), "top_p": 0}}, 422),
        ("POST", CHAT, {"json": {"messages": ask("hi"), "stop": [""]}}, 422),
        ("POST", CHAT, {"json": {"messages": ask("hi"), "n": 2}}, 422),
        ("POST", CHAT, {"json": {"messages": ask("hi"), "max_tokens": 9000}}, 400),
        ("POST", CHAT, {"json": {"messages": ask("hi"), "session_id": "../../etc/passwd"}}, 404),
        ("POST", CHAT, {"json": {"messages": ask("hi"), "session_id": "A" * 32}}, 404),
        ("GET", "/v1/sessions/..%2F..%2Fsessions.db", {}, 404),
        ("GET", "/v1/sessions/" + "B" * 32, {}, 404),
        ("POST", "/v1/sessions/" + "C" * 32 + "/documents", {"json": {"text": "hi"}}, 404),
    ],
)
def test_bad_requests_get_the_right_status(server, method, path, kwargs, status):
    r = server.http.request(method, path, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"]


@pytest.mark.parametrize(
    "kwargs, status",
    [
        ({"content": b"x" * 17_000, "headers": {"Content-Type": "text/plain"}}, 413),  # bytes
        ({"content": b"x" * 200_000, "headers": {"Content-Type": "text/plain"}}, 413),  # body
        ({"content": ("word " * 1_500).encode(), "headers": {"Content-Type": "text/plain"}}, 413),
        ({"files": {"file": ("big.txt", b"y" * 17_000)}}, 413),
        ({"content": b"\xff\xfe not utf-8", "headers": {"Content-Type": "text/plain"}}, 422),
        ({"content": b"  \n ", "headers": {"Content-Type": "text/plain"}}, 422),
        ({"content": b"nul\x00byte", "headers": {"Content-Type": "text/plain"}}, 422),
        ({"content": b"{bad", "headers": {"Content-Type": "application/json"}}, 422),
        ({"json": {"txt": "typo"}}, 422),
        ({"json": {"text": 5}}, 422),
        ({"files": {"other": ("a.txt", b"hello")}}, 422),
        ({"content": b"\x89PNG", "headers": {"Content-Type": "image/png"}}, 415),
    ],
)
def test_bad_documents_change_nothing(server, kwargs, status):
    sid = new_session(server, DOCS[0])
    before = server.http.get(f"/v1/sessions/{sid}").json()
    r = server.http.post(f"/v1/sessions/{sid}/documents", **kwargs)
    assert r.status_code == status, r.text
    assert server.http.get(f"/v1/sessions/{sid}").json() == before


def test_api_key_is_required(server):
    url = server.url
    assert httpx.get(f"{url}/health").status_code == 200  # health stays open
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/sessions"), ("POST", CHAT)):
            r = httpx.request(method, url + path, headers=headers, json={"messages": ask("hi")})
            assert r.status_code == 401, (headers, path)
    bad = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=MODEL, messages=ask("hi"), max_tokens=2)
    models = server.openai.models.list()
    assert models.data[0].id == MODEL


def test_a_key_is_required_off_loopback(tmp_path, capsys):
    assert main(["serve", "--host", "0.0.0.0", "--store", str(tmp_path)]) == 1
    assert "--api-key" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # refused before loading anything or making the store
