"""response_format (issue 25, item 2): JSON mode and JSON schemas by grammar-constrained decoding
(xgrammar), streamed and not; what cannot be compiled is a 400 naming the field."""

from __future__ import annotations

import json

import pytest

from .server_kit import CHAT, ask, new_session, served

SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "enum": ["yes", "no"]},
        "year": {"type": "integer", "minimum": 1800, "maximum": 2000},
    },
    "required": ["answer", "year"],
    "additionalProperties": False,
}
FORMATS = {
    "json_object": {"type": "json_object"},
    "json_schema": {"type": "json_schema", "json_schema": {"name": "reply", "schema": SCHEMA}},
}


def _content(server, body: dict, stream: bool) -> tuple[str, str]:
    if not stream:
        r = server.http.post(CHAT, json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        return choice["message"]["content"], choice["finish_reason"]
    with server.http.stream("POST", CHAT, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        events = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
    return text, events[-1]["choices"][0]["finish_reason"]


@pytest.fixture(scope="module")
def server(random_model, tmp_path_factory):
    with served(random_model, tmp_path_factory.mktemp("store")) as running_server:
        yield running_server


@pytest.mark.parametrize("kind", FORMATS)
@pytest.mark.parametrize("stream", [False, True])
def test_the_answer_follows_the_response_format(server, kind, stream):
    sid = new_session(server, "The Vellmar Rail Company was founded in 1871.")
    message = "Was the company founded before 1900? Reply in JSON with the year."
    body = {"messages": ask(message), "session_id": sid, "max_tokens": 32, "temperature": 0}
    text, finish = _content(server, {**body, "response_format": FORMATS[kind]}, stream)
    assert text.startswith("{"), text
    if kind == "json_schema":  # a finite schema: the grammar ends the answer, not max_tokens
        assert finish == "stop", text
        value = json.loads(text)
        assert set(value) == {"answer", "year"} and value["answer"] in ("yes", "no")
        assert 1800 <= value["year"] <= 2000
    elif finish == "stop":  # JSON mode: any object, which this small model may not close
        assert isinstance(json.loads(text), dict)
    if not stream:  # without a format the same request answers in prose: the format did it
        plain, _ = _content(server, {**body, "max_tokens": 4}, stream)
        assert not plain.startswith("{"), plain


def test_a_schema_that_cannot_be_compiled_is_a_400(server):
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    body = {"messages": ask("hi"), "max_tokens": 2, "response_format": bad}
    r = server.http.post(CHAT, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "response_format" and error["code"] == "invalid_value"
    assert server.app.state.worker.pending == 0
