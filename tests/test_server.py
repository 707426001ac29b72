"""`genadapter serve` against a real uvicorn on loopback, with httpx and the official openai client:
sessions, absorbing, chat (streaming or not) under each session's state, persistence, concurrency
and limits. Answers are compared with the library decoding the same prompt under the same state."""

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

from genadapter.cli import main
from genadapter.generation import SamplingParams, generate_ids, stream_text
from genadapter.server.app import ServerConfig, create_app
from genadapter.server.store import SESSION_ID, DocumentInfo, SessionStore

from .conftest import DOCUMENT, TEST_CHUNK

KEY = "test-key-5d1f0c"
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


@pytest.fixture(scope="module")
def server(random_model, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    config = ServerConfig(
        api_key=KEY, max_document_bytes=16_000, max_document_tokens=1_000, max_batch=8
    )
    app = create_app(random_model, store, config)
    with running(app) as url, httpx.Client(base_url=url, headers=AUTH, timeout=TIMEOUT) as http:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, timeout=TIMEOUT, max_retries=0)
        yield SimpleNamespace(url=url, app=app, store=store, http=http, openai=client)


def new_session(server, *documents: str) -> str:
    r = server.http.post("/v1/sessions")
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    for doc in documents:
        r = server.http.post(f"/v1/sessions/{sid}/documents", json={"text": doc})
        assert r.status_code == 201, r.text
    return sid


def saved_state(model, server, sid: str):
    """The session's state as persisted on disk."""
    return model.load_session(server.store / "states" / f"{sid}.safetensors").state


def reference_answer(model, state, messages: list[dict], max_tokens: int) -> str:
    """The same chat decoded alone by the library (greedy)."""
    ids = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    tokens = generate_ids(model, ids, state, SamplingParams(max_new_tokens=max_tokens))
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
        expected.add_(random_model.encode(doc)[0])
    assert (info["tokens"], info["chunks"], info["document_count"]) == (
        expected.tokens,
        expected.chunks,
        3,
    )
    assert [d["tokens"] for d in info["documents"]] == [
        random_model.encode(d)[0].tokens for d in DOCS[:3]
    ]
    assert_states_close(saved_state(random_model, server, sid), expected)


def test_chat_non_streaming_and_streaming_use_the_session_state(server, random_model):
    sid = new_session(server, DOCUMENT)
    state = saved_state(random_model, server, sid)
    messages = ask("When was the line electrified?")
    expected = reference_answer(random_model, state, messages, 8)
    assert expected != reference_answer(random_model, None, messages, 8)  # the state matters

    r = server.openai.chat.completions.create(
        model="any",
        messages=messages,
        max_tokens=8,
        temperature=0,
        extra_body={"session_id": sid},
    )
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 0

    stream = server.openai.chat.completions.create(
        model="any",
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
        model="any", messages=messages, max_tokens=8, temperature=0
    )
    assert plain.choices[0].message.content == reference_answer(random_model, None, messages, 8)


def test_sse_format_and_stop_strings(server, random_model):
    sid = new_session(server, DOCS[3])
    messages = ask("Tell me about the observatory.")
    full = reference_answer(random_model, saved_state(random_model, server, sid), messages, 12)
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
    expected = random_model.encode(docs[0])[0].add_(random_model.encode(docs[1])[0])
    info = server.http.get(f"/v1/sessions/{sid}").json()
    assert (info["tokens"], info["document_count"]) == (expected.tokens, 2)
    assert_states_close(saved_state(random_model, server, sid), expected)


def test_twenty_concurrent_chats_across_five_sessions(server, random_model):
    sessions = [new_session(server, doc) for doc in DOCS]
    jobs = [(sid, q, i % 2 == 0) for sid in sessions for i, q in enumerate(QUESTIONS)]
    assert len(jobs) == 20
    worker = server.app.state.worker
    worker.max_rows = 0

    def chat(job):
        sid, question, stream = job
        kwargs = dict(model="any", messages=ask(question), max_tokens=8, temperature=0)
        r = server.openai.chat.completions.create(
            **kwargs, stream=stream, extra_body={"session_id": sid}
        )
        if stream:
            return "".join(c.choices[0].delta.content or "" for c in r if c.choices)
        return r.choices[0].message.content

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(chat, jobs))
    states = {sid: saved_state(random_model, server, sid) for sid in sessions}
    expected = [reference_answer(random_model, states[s], ask(q), 8) for s, q, _ in jobs]
    assert answers == expected
    assert len(set(answers)) > len(QUESTIONS)  # sessions answer differently: states were used
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
            model="any", messages=ask("Hi"), max_tokens=4, temperature=0
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
        bad.chat.completions.create(model="any", messages=ask("hi"), max_tokens=2)
    models = server.openai.models.list()
    assert [m.id for m in models.data] == ["SmolLM2-135M-Instruct"]


def test_a_key_is_required_off_loopback(tmp_path, capsys):
    assert main(["serve", "--host", "0.0.0.0", "--store", str(tmp_path)]) == 1
    assert "--api-key" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # refused before loading anything or making the store


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


def test_sessions_survive_a_restart(tmp_path):
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
    with serve_process(store, port, log) as url:
        assert httpx.get(f"{url}/v1/sessions/{sid}").json() == info
        again = httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=60).json()
    assert again["choices"] == answer["choices"]


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
    state = saved_state(random_model, server, got["session"])
    assert got["answer"] == reference_answer(random_model, state, ask(question), 8)
