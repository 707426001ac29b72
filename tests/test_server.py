"""`genadapter serve` against a real uvicorn on loopback, with httpx and the official openai client:
sessions, absorbing, chat (streaming or not) under each session's state and reading its memory,
persistence, concurrency and limits. Answers are compared with the library decoding the same prompt
under the same state and memory."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch
import uvicorn

from genadapter.base import load_base
from genadapter.cli import main
from genadapter.generation import SamplingParams, generate_ids, stream_text
from genadapter.generator import Generator
from genadapter.model import AdaptedModel
from genadapter.server.app import ServerConfig, create_app
from genadapter.server.resident import MemoryCapExceeded, ResidentSessions, memory_nbytes
from genadapter.server.store import SESSION_ID, DocumentInfo, SessionStore
from genadapter.server.worker import Finished, ModelWorker
from genadapter.session import Session
from genadapter.state import AdapterState

from .conftest import DOCUMENT, TEST_CHUNK, make_tiny_base

KEY = "test-key-5d1f0c"
MODEL = "SmolLM2-135M-Instruct"  # the base model's id in /v1/models
AUTH = {"Authorization": f"Bearer {KEY}"}
TIMEOUT = 120  # seconds; every wait below is bounded

DOCS = [
    "Marta Quill keeps bees on the roof of the old library in Tarn. Her hives give 40 jars a year.",
    "The ferry Aurelia crosses the Selk estuary six times a day; the crossing takes 25 minutes.",
    "Orrin's bakery sells rye loaves with caraway seeds, and on Fridays a plum cake with cardamom.",
    "The Glasswater observatory has a 2.1 metre mirror, ground in 1962 by the optician Ilse Brand.",
    "In the game of Fennick, each player starts with seven stones and may move two of them a turn.",
]
QUESTIONS = ["Who is mentioned?", "Give one number.", "Summarize in five words.", "What is it?"]


@contextmanager
def running(app):
    """Serve `app` with uvicorn on a free loopback port in a thread; stop it on exit."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + TIMEOUT
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(TIMEOUT)
        sock.close()
        assert not thread.is_alive(), "uvicorn did not shut down"


@contextmanager
def served(model, store: Path, **options):
    """The tests' server over `store` (small document limits, batches of 8; `options` of
    ServerConfig change those or set others), running, with an HTTP client that sends the key:
    a namespace of url, app, store and http."""
    limits = dict(max_document_bytes=16_000, max_document_tokens=1_000, max_batch=8)
    config = ServerConfig(api_key=KEY, **{**limits, **options})
    app = create_app(model, store, config)
    with running(app) as url, httpx.Client(base_url=url, headers=AUTH, timeout=TIMEOUT) as http:
        yield SimpleNamespace(url=url, app=app, store=store, http=http)


@pytest.fixture(scope="module")
def server(random_model, tmp_path_factory):
    with served(random_model, tmp_path_factory.mktemp("store")) as server:
        url = server.url
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, timeout=TIMEOUT, max_retries=0)
        yield SimpleNamespace(**vars(server), openai=client)


def new_session(server, *documents: str) -> str:
    r = server.http.post("/v1/sessions")
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    for doc in documents:
        r = server.http.post(f"/v1/sessions/{sid}/documents", json={"text": doc})
        assert r.status_code == 201, r.text
    return sid


def saved_session(model, server, sid: str) -> Session:
    """The session (state and memory) as persisted on disk."""
    return model.load_session(server.store / "states" / f"{sid}.safetensors")


def saved_state(model, server, sid: str):
    """The session's state as persisted on disk."""
    return saved_session(model, server, sid).state


def absorbed(model, document: str) -> AdapterState:
    """The state of `document` as a session absorbs it (its chunks encoded after the memory's
    prefix, in the pass that also fills the memory)."""
    return model.encode(document, memory=model.new_memory())[0]


def prompt_ids(model, messages: list[dict]) -> list[int]:
    """The chat template's tokens for `messages`, as the server builds its prompt."""
    ids = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def reference_answer(model, session, messages: list[dict], max_tokens: int) -> str:
    """The same chat decoded alone by the library (greedy), under `session` (a Session: its state,
    reading its memory as Session.chat lays it out; a bare AdapterState; None: the base)."""
    state, prompt = session, prompt_ids(model, messages)
    if isinstance(session, Session):
        state, prompt = session.state, session.chat_layout(messages, max_tokens)
    tokens = generate_ids(model, prompt, state, SamplingParams(max_new_tokens=max_tokens))
    return "".join(stream_text(model.tokenizer, tokens, []))


def assert_states_close(a, b) -> None:
    """Sums of K^T V in float32: equal up to the rounding of a different summation order."""
    assert a.sums.keys() == b.sums.keys()
    for name in a.sums:
        scale = b.sums[name].abs().max().item()
        torch.testing.assert_close(a.sums[name], b.sums[name], rtol=1e-5, atol=1e-5 * scale)


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


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

CHAT = "/v1/chat/completions"


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


# -- sampling parameters: validated at the boundary, and one request's failure is its own -------

INT64_MAX = 2**63 - 1


TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
NAMED_TOOL = {"type": "function", "function": {"name": "get_time"}}


@pytest.mark.parametrize(
    "extra, status, param",
    [
        ({"seed": 18446744073709551616, "temperature": 1}, 422, "seed"),  # the input
        ({"seed": 2**63}, 422, "seed"),
        ({"seed": -(2**63) - 1}, 422, "seed"),
        ({"seed": 1.5}, 422, "seed"),
        ({"temperature": 2.5}, 422, "temperature"),
        ({"temperature": -0.1}, 422, "temperature"),
        ({"top_p": 1.5}, 422, "top_p"),
        ({"max_tokens": 0}, 422, "max_tokens"),
        ({"max_tokens": 2.5}, 422, "max_tokens"),
        ({"max_completion_tokens": 0}, 422, "max_completion_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, 422, "stop"),
        ({"presence_penalty": 2.5}, 422, "presence_penalty"),
        ({"frequency_penalty": -3}, 422, "frequency_penalty"),
        ({"logit_bias": {"11426": 101}}, 422, "logit_bias"),
        ({"logit_bias": {"-1": 5}}, 422, "logit_bias"),
        ({"logit_bias": {"99999999": 5}}, 400, "logit_bias"),
        ({"top_logprobs": 21}, 422, "top_logprobs"),
        ({"logprobs": True}, 400, "logprobs"),
        ({"n": 3}, 422, "n"),
        # Issue 25, item 2: what the server does not do is refused, naming the field.
        ({"tools": [TOOL]}, 400, "tools"),
        ({"tools": [TOOL], "tool_choice": "required"}, 400, "tool_choice"),
        ({"tools": [TOOL], "tool_choice": NAMED_TOOL}, 400, "tool_choice"),
        ({"tool_choice": "bogus"}, 400, "tool_choice"),
        ({"functions": [TOOL["function"]]}, 400, "functions"),
        ({"response_format": {"type": "regex"}}, 400, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {}}}, 400, "response_format"),
        ({"reasoning_effort": "high"}, 400, "reasoning_effort"),
        ({"temprature": 0.5}, 400, "temprature"),  # a misspelt field is not silently dropped
    ],
)
def test_sampling_parameters_outside_openai_ranges_are_refused(server, extra, status, param):
    body = {"messages": ask("hi"), "max_tokens": 2, **extra}
    for stream in (False, True):
        r = server.http.post(CHAT, json={**body, "stream": stream})
        assert r.status_code == status, r.text
        assert r.headers["content-type"] == "application/json"
        assert r.json()["error"]["param"].split(".")[0] == param
    assert server.app.state.worker.pending == 0  # nothing reached the model


def test_sampling_parameters_at_the_edges_of_their_ranges_are_served(server, random_model):
    edges = [
        {"seed": INT64_MAX, "temperature": 2, "top_p": 1e-9},
        {"seed": -(2**63), "temperature": 1, "presence_penalty": -2, "frequency_penalty": 2},
        # Fields that ask for nothing this server would do otherwise are accepted.
        {"tools": [TOOL], "tool_choice": "none", "response_format": {"type": "text"}},
        {"user": "u-1", "metadata": {"k": "v"}, "store": False, "parallel_tool_calls": False},
    ]
    for extra in edges:
        r = server.http.post(CHAT, json={"messages": ask("hi"), "max_tokens": 2, **extra})
        assert r.status_code == 200, r.text
    # A temperature too small to divide logits by (1e-45 made them inf, then NaN) is greedy.
    messages = ask("Say something.")
    r = server.http.post(CHAT, json={"messages": messages, "max_tokens": 4, "temperature": 1e-45})
    assert r.status_code == 200, r.text
    expected = reference_answer(random_model, None, messages, 4)
    assert r.json()["choices"][0]["message"]["content"] == expected


def test_a_bad_seed_is_refused_while_another_users_stream_runs_on(server, random_model):
    sid = new_session(server, DOCS[1])
    messages = ask("Describe the ferry.")
    expected = reference_answer(
        random_model, saved_session(random_model, server, sid), messages, 12
    )
    body = {"messages": messages, "session_id": sid, "max_tokens": 12, "temperature": 0}
    with server.http.stream("POST", CHAT, json={**body, "stream": True}) as r:
        lines = r.iter_lines()
        first = next(lines)  # the first user's answer is under way
        bad = server.http.post(
            CHAT, json={"messages": ask("hi"), "seed": 18446744073709551616, "temperature": 1}
        )
        rest = [line for line in lines if line]
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "seed", bad.text
    events = [json.loads(line[6:]) for line in [first, *rest[:-1]]]
    assert not [e for e in events if "error" in e]
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == expected


def drain(job, timeout: float = TIMEOUT) -> tuple[list[int], Finished]:
    """A worker job's tokens and how it ended."""
    tokens = []
    while not isinstance(item := job.tokens.get(timeout=timeout), Finished):
        tokens.append(item)
    return tokens, item


def broken(state: AdapterState) -> AdapterState:
    """`state` with sums of the wrong shape for the model: any forward under it fails."""
    shapes = {name: torch.ones(3, 3) for name in state.sums}
    state.sums = shapes
    state.add_(AdapterState({name: torch.zeros(3, 3) for name in shapes}))  # drops the cache
    return state


def test_the_worker_fails_only_the_row_whose_computation_failed(random_model):
    """Bad requests sent straight to the model worker, as if validation were bypassed, while
    another user's chat generates: each fails alone, with its own error, at whichever stage it
    fails (its seed, sampling, the batched prefill, a decode step); every other chat ends exactly
    as it would alone."""
    state = random_model.encode(DOCS[0])[0]
    prompt = prompt_ids(random_model, ask("Write a long story."))
    expected = list(generate_ids(random_model, prompt, state, SamplingParams(max_new_tokens=16)))
    assert len(expected) == 16  # no end of sequence: every chat below is cut by its length
    bad_seed = SamplingParams(max_new_tokens=8, temperature=1.0)
    bad_seed.seed = 18446744073709551616  # torch: "Overflow when unpacking long long"
    bad_temperature = SamplingParams(max_new_tokens=8, temperature=1.0)
    bad_temperature.temperature = float("nan")  # sampling: "probability tensor contains nan"
    worker = ModelWorker(random_model, max_batch=8).start()
    try:
        running = worker.chat(prompt, state, SamplingParams(max_new_tokens=16))
        first = running.tokens.get(timeout=TIMEOUT)  # under way
        victim_state = state.clone()
        victim = worker.chat(prompt, victim_state, SamplingParams(max_new_tokens=16))
        victim_first = victim.tokens.get(timeout=TIMEOUT)
        bad = {
            "seed": worker.chat(prompt, None, bad_seed),
            "temperature": worker.chat(prompt, None, bad_temperature),
            "state": worker.chat(prompt, broken(state.clone()), SamplingParams(max_new_tokens=8)),
        }
        neighbour = worker.chat(prompt, state, SamplingParams(max_new_tokens=8))  # same turn
        broken(victim_state)  # fails in its next decode step, in the middle of the batch
        ends = {name: drain(job)[1] for name, job in bad.items()}
        victim_tokens, victim_end = drain(victim)
        running_tokens, running_end = drain(running)
        neighbour_tokens, neighbour_end = drain(neighbour)
        assert worker.alive
    finally:
        worker.stop()
    assert {name: end.reason for name, end in ends.items()} == dict.fromkeys(bad, "error")
    assert "Overflow" in ends["seed"].error
    assert "nan" in ends["temperature"].error
    assert ends["state"].error.startswith("RuntimeError")
    assert victim_end.reason == "error"
    assert [victim_first, *victim_tokens] == expected[: 1 + len(victim_tokens)]
    assert ([first, *running_tokens], running_end.reason) == (expected, "length")
    assert (neighbour_tokens, neighbour_end.reason) == (expected[:8], "length")
    assert worker.pending == 0


def test_logit_bias_and_penalties_are_applied(server, random_model):
    token = random_model.tokenizer.encode(" bee", add_special_tokens=False)[0]
    body = {"messages": ask("Say something."), "max_tokens": 4, "temperature": 0}
    r = server.http.post(CHAT, json={**body, "logit_bias": {str(token): 100}})
    assert r.json()["choices"][0]["message"]["content"] == random_model.tokenizer.decode(
        [token] * 4
    )

    # OpenAI's formula, decoded here token by token without a KV cache.
    messages = ask("Write a long story.")
    presence, frequency, steps = 0.5, 1.5, 10
    ids = prompt_ids(random_model, messages)
    answer, counts = [], None
    for _ in range(steps):
        logits = random_model.logits(torch.tensor([ids + answer]))[0, -1]
        counts = torch.zeros_like(logits) if counts is None else counts
        logits = logits - frequency * counts - presence * (counts > 0).float()
        answer.append(int(logits.argmax()))
        counts[answer[-1]] += 1
    expected = random_model.tokenizer.decode(answer)
    assert expected != reference_answer(random_model, None, messages, steps)  # they mattered
    penalties = {"presence_penalty": presence, "frequency_penalty": frequency}
    r = server.http.post(
        CHAT, json={**body, "messages": messages, "max_tokens": steps, **penalties}
    )
    assert r.json()["choices"][0]["message"]["content"] == expected


# -- the context memory: read as a local session reads it, a budget per session, a cap overall --


def test_a_chat_reads_the_memory_of_its_session_as_a_local_session_does(server, random_model):
    local = random_model.session()
    local.absorb(DOCUMENT)
    sid = new_session(server, DOCUMENT)
    info = server.http.get(f"/v1/sessions/{sid}").json()
    assert local.memory_tokens > 0 and info["memory_tokens"] == local.memory_tokens
    assert info["memory_bytes"] == local.memory_bytes
    question = "When was the line electrified?"
    expected = local.chat(question, max_new_tokens=12)
    # The memory matters: the same state without it answers otherwise.
    assert expected != Session(random_model, local.state, memory=False).chat(question, 12)
    body = {"messages": ask(question), "session_id": sid, "max_tokens": 12, "temperature": 0}
    r = server.http.post(CHAT, json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == expected
    # The prompt counts what was read: the conversation and the memory laid out in it.
    layout = local.chat_layout(ask(question), 12)
    assert layout.read is not None and r.json()["usage"]["prompt_tokens"] == len(layout)
    stream = server.openai.chat.completions.create(
        model=sid, messages=ask(question), max_tokens=12, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected
    # Without max_tokens the memory is still read (the answer may fill what it leaves of the
    # window): the same answer, cut here by a stop string.
    stop = expected.strip()[-3:]
    assert stop, expected
    r = server.http.post(CHAT, json={**body, "max_tokens": None, "stop": stop})
    assert r.json()["choices"][0]["message"]["content"] == expected[: expected.index(stop)]
    # A conversation without a user message reads nothing (no question, nowhere to lay it out).
    system = [{"role": "system", "content": "Be brief."}]
    r = server.http.post(CHAT, json={**body, "messages": system, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(
        prompt_ids(random_model, system)
    ), r.text


def test_rows_reading_different_memories_share_a_prefill_and_each_reads_its_own(random_model):
    """Chats queued before the worker starts are admitted in one batched prefill: two sessions
    with different memories and one without any; each decodes what it decodes alone."""
    sessions = [random_model.session() for _ in range(3)]
    sessions[0].absorb(DOCS[0])
    sessions[1].absorb(DOCUMENT)
    questions = ["Who keeps bees?", "Who designed the brake?", "Who keeps bees?"]
    params = SamplingParams(max_new_tokens=10)
    prompts = [s.chat_layout(ask(q), 10) for s, q in zip(sessions, questions)]
    assert [p.read is not None for p in prompts] == [True, True, False]
    expected = [
        list(generate_ids(random_model, p, s.state, params)) for p, s in zip(prompts, sessions)
    ]
    assert expected[0] != expected[2]  # the memory was read
    worker = ModelWorker(random_model, max_batch=8)
    jobs = [worker.chat(p, s.state, params) for p, s in zip(prompts, sessions)]
    worker.start()
    try:
        got = [drain(job) for job in jobs]
    finally:
        worker.stop()
    assert [tokens for tokens, _ in got] == expected
    assert worker.max_rows == 3  # decoded together, from one prefill


def test_a_document_past_the_session_memory_budget_is_refused_and_changes_nothing(
    random_model, tmp_path
):
    budget = 100
    with served(random_model, tmp_path, session_memory_tokens=budget) as server:
        sid = new_session(server, DOCS[0])
        before = server.http.get(f"/v1/sessions/{sid}").json()
        assert 0 < before["memory_tokens"] < budget
        r = server.http.post(f"/v1/sessions/{sid}/documents", json={"text": DOCUMENT})
        assert r.status_code == 413, r.text
        error = r.json()["error"]
        assert (
            error["code"] == "memory_budget_exceeded" and error["type"] == "invalid_request_error"
        )
        assert str(budget) in error["message"]
        assert server.http.get(f"/v1/sessions/{sid}").json() == before
        assert saved_session(random_model, server, sid).memory_tokens == before["memory_tokens"]
        # What fits is still absorbed.
        r = server.http.post(f"/v1/sessions/{sid}/documents", json={"text": DOCS[1]})
        assert r.status_code == 201 and r.json()["session"]["document_count"] == 2, r.text


def test_the_memory_cap_spills_idle_sessions_and_refuses_what_cannot_fit(random_model, tmp_path):
    def nbytes(text: str) -> int:
        return memory_nbytes(random_model, [len(c) for c in random_model.chunks(text)])

    cap = nbytes(DOCS[0]) + nbytes(DOCS[1]) // 2  # one of the two fits, not both
    with served(random_model, tmp_path, memory_cap_bytes=cap) as server:
        first = new_session(server, DOCS[0])
        assert server.http.get(f"/v1/sessions/{first}").json()["memory_bytes"] == nbytes(DOCS[0])
        second = new_session(server, DOCS[1])  # the first is spilled to make room
        stats = server.http.get("/v1/stats").json()
        assert stats["spilled_sessions"] == 1 and stats["loaded_memory_bytes"] == nbytes(DOCS[1])
        assert stats["memory_bytes"] == nbytes(DOCS[0]) + nbytes(DOCS[1]) > cap
        # A spilled session lost nothing: it loads again (spilling the other) and reads its memory.
        question = ask("Who keeps bees?")
        expected = reference_answer(
            random_model, saved_session(random_model, server, first), question, 8
        )
        body = {"messages": question, "session_id": first, "max_tokens": 8, "temperature": 0}
        r = server.http.post(CHAT, json=body)
        assert r.json()["choices"][0]["message"]["content"] == expected, r.text
        assert server.http.get("/v1/stats").json()["spilled_sessions"] == 2
        # A document whose memory could never fit the cap: a 429, and the session is unchanged.
        before = server.http.get(f"/v1/sessions/{second}").json()
        r = server.http.post(f"/v1/sessions/{second}/documents", json={"text": DOCUMENT})
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "memory_cap_exceeded"
        assert server.http.get(f"/v1/sessions/{second}").json() == before


def test_sessions_in_use_are_not_spilled(random_model):
    sessions = [random_model.session() for _ in range(3)]
    for s, doc in zip(sessions, DOCS):
        s.absorb(doc)
    sessions.sort(key=lambda s: -s.memory_bytes)  # the third fits where the second was
    held = ResidentSessions(cap=sessions[0].memory_bytes + sessions[1].memory_bytes)
    held.put("a", sessions[0])
    held.put("b", sessions[1])
    with held.pinned("a"), held.pinned("b"):
        with pytest.raises(MemoryCapExceeded):
            held.put("c", sessions[2])
        assert held.get("a") is sessions[0] and held.get("b") is sessions[1]  # nothing spilled
    with held.pinned("a"):
        held.put("c", sessions[2])  # b, idle now, makes room
    assert (held.get("a"), held.get("b"), held.get("c")) == (sessions[0], None, sessions[2])


def test_stats_and_listings_report_memory(server, random_model):
    sid = new_session(server, DOCS[2])
    empty = new_session(server)
    local = random_model.session()
    local.absorb(DOCS[2])
    listed = {s["id"]: s for s in server.http.get("/v1/sessions").json()["sessions"]}
    assert (listed[sid]["memory_tokens"], listed[sid]["memory_bytes"]) == (
        local.memory_tokens,
        local.memory_bytes,
    )
    assert (listed[empty]["memory_tokens"], listed[empty]["memory_bytes"]) == (0, 0)
    stats = server.http.get("/v1/stats").json()
    assert stats["object"] == "stats" and stats["sessions"] == len(listed)
    assert stats["memory_tokens"] == sum(s["memory_tokens"] for s in listed.values())
    assert stats["memory_bytes"] == sum(s["memory_bytes"] for s in listed.values())
    assert stats["loaded_memory_bytes"] <= stats["memory_bytes"]
    assert stats["session_memory_tokens"] == 32768 and stats["memory_cap_bytes"] == 4 << 30
    assert httpx.get(f"{server.url}/v1/stats").status_code == 401  # the key is needed


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


# -- the chat page -------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _high_fd(fd: int) -> int:
    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (fds 3 and 4)."""

    def __init__(self, profile: Path):
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # Move the child's ends above 9, so redirecting them to 3 and 4 cannot clobber either.
        to_browser_r, from_browser_w = (_high_fd(fd) for fd in (to_browser_r, from_browser_w))
        args = "--headless --no-sandbox --disable-gpu --remote-debugging-pipe"
        self.proc = subprocess.Popen(
            [
                "bash",
                "-c",
                f'exec "$0" {args} --user-data-dir="$1" 3<&{to_browser_r} 4>&{from_browser_w}',
                CHROMIUM,
                str(profile),
            ],
            pass_fds=(to_browser_r, from_browser_w),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.session = None

    def call(self, method: str, timeout: float = TIMEOUT, **params):
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self._buffer:
                assert time.monotonic() < deadline, f"no answer to {method}"
                chunk = os.read(self._from_browser, 1 << 16)
                assert chunk, "chromium exited"
                self._buffer += chunk
            raw, _, self._buffer = self._buffer.partition(b"\0")
            reply = json.loads(raw)
            if reply.get("id") == self._next_id:
                assert "error" not in reply, reply["error"]
                return reply["result"]

    def open(self, url: str, ready: str) -> None:
        """Open `url` in a new tab; return once the JS expression `ready` is true there."""
        target = self.call("Target.createTarget", url=url)["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        deadline = time.monotonic() + TIMEOUT
        while not self.run(ready):
            assert time.monotonic() < deadline, f"{url} did not load"
            time.sleep(0.05)

    def run(self, script: str):
        result = self.call(
            "Runtime.evaluate", expression=script, awaitPromise=True, returnByValue=True
        )
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"]["value"]

    def close(self) -> None:
        os.close(self._to_browser)
        os.close(self._from_browser)
        self.proc.kill()
        self.proc.wait()


PAGE_SCRIPT = """(async () => {
  const $ = (id) => document.getElementById(id);
  const until = async (ok, what) => {
    const start = Date.now();
    while (!ok()) {
      if (Date.now() - start > 100000) throw new Error("timed out waiting for " + what);
      await new Promise((r) => setTimeout(r, 50));
    }
  };
  $("api-key").value = %(key)s;
  $("api-key").dispatchEvent(new Event("change"));
  $("new-session").click();
  await until(() => $("session-id").textContent !== "none", "a session");
  $("doc-text").value = %(document)s;
  $("absorb-text").click();
  await until(() => $("status").textContent.startsWith("absorbed"), "absorbing");
  $("max-tokens").value = "8";
  $("chat-input").value = %(question)s;
  $("send").click();
  await until(() => $("status").textContent === ""
                    && document.querySelector(".msg.assistant")
                    && document.querySelector(".msg.assistant").textContent, "an answer");
  await new Promise((r) => setTimeout(r, 300));
  return {
    session: $("session-id").textContent,
    info: $("session-info").textContent,
    answer: document.querySelector(".msg.assistant").textContent,
    status: $("status").textContent,
  };
})()"""


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian package chromium)")
def test_chat_page_in_headless_chromium(server, random_model, tmp_path):
    question = "Who ground the mirror?"
    browser = Browser(tmp_path / "profile")
    try:
        browser.open(server.url + "/", "document.readyState === 'complete' && !!window.send")
        script = PAGE_SCRIPT % {
            "key": json.dumps(KEY),
            "document": json.dumps(DOCS[3]),
            "question": json.dumps(question),
        }
        got = browser.run(script)
    finally:
        browser.close()
    assert SESSION_ID.fullmatch(got["session"]), got
    info = server.http.get(f"/v1/sessions/{got['session']}").json()
    assert info["document_count"] == 1 and f"{info['tokens']} tokens" in got["info"]
    session = saved_session(random_model, server, got["session"])
    assert got["answer"] == reference_answer(random_model, session, ask(question), 8)
