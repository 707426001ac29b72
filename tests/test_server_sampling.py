"""The server's sampling parameters (validated at the boundary; one request's failure is its own)
and its context memory (read as a local session reads it, a budget per session, a cap overall)."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from genadapter.generation import SamplingParams, generate_ids
from genadapter.server.resident import MemoryCapExceeded, ResidentSessions, memory_nbytes
from genadapter.server.worker import ModelWorker
from genadapter.session import Session
from genadapter.state import AdapterState

from .conftest import DOCUMENT
from .server_kit import (
    CHAT,
    DOCS,
    TIMEOUT,
    ask,
    drain,
    new_session,
    prompt_ids,
    reference_answer,
    saved_session,
    served,
)

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
