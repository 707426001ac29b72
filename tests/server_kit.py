"""What the server tests share (test_server*.py): a real uvicorn on loopback serving the tests'
model, an httpx client that sends the key and the official openai client, and references computed
by the library itself."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import torch
import uvicorn

from genadapter.generation import SamplingParams, generate_ids, stream_text
from genadapter.server.app import ServerConfig, create_app
from genadapter.server.worker import Finished
from genadapter.session import Session
from genadapter.state import AdapterState

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


@contextmanager
def openai_server(model, tmp_path_factory):
    """`served` over a fresh store, with the official openai client too (`.openai`): what the
    `server` fixture (conftest.py) yields."""
    with served(model, tmp_path_factory.mktemp("store")) as server:
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


CHAT = "/v1/chat/completions"


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def drain(job, timeout: float = TIMEOUT) -> tuple[list[int], Finished]:
    """A worker job's tokens and how it ended."""
    tokens = []
    while not isinstance(item := job.tokens.get(timeout=timeout), Finished):
        tokens.append(item)
    return tokens, item
