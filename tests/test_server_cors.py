"""Browser clients on another origin (issue 25, item 3): off by default; `--cors-origin` lets the
named origins call the API, preflight included (Starlette's CORSMiddleware)."""

from __future__ import annotations

import pytest

from genadapter.cli import main

from .server_kit import MODEL, ask, served

APP = "http://app.example:5173"
PREFLIGHT = {
    "Origin": APP,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type",
}


def test_cors_is_off_by_default(random_model, tmp_path):
    with served(random_model, tmp_path) as server:
        r = server.http.options("/v1/chat/completions", headers=PREFLIGHT)
        assert r.status_code == 405 and "access-control-allow-origin" not in r.headers
        r = server.http.get("/v1/models", headers={"Origin": APP})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_a_named_origin_may_call_the_api(random_model, tmp_path):
    with served(random_model, tmp_path, cors_origins=(APP,)) as server:
        # The preflight carries no key (browsers never send one with it) and is answered.
        r = server.http.options("/v1/chat/completions", headers={**PREFLIGHT, "Authorization": ""})
        assert r.status_code == 200, r.text
        assert r.headers["access-control-allow-origin"] == APP
        assert "POST" in r.headers["access-control-allow-methods"]
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        chat = {"model": MODEL, "messages": ask("Hi"), "max_tokens": 2}
        r = server.http.post("/v1/chat/completions", json=chat, headers={"Origin": APP})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == APP
        # Errors carry the header too, so the page can read the error's message.
        r = server.http.get("/v1/sessions/nope", headers={"Origin": APP})
        assert r.status_code == 404 and r.headers["access-control-allow-origin"] == APP
        # The key is still required; another origin is not allowed.
        r = server.http.get("/v1/models", headers={"Origin": APP, "Authorization": "Bearer x"})
        assert r.status_code == 401
        other = {**PREFLIGHT, "Origin": "http://evil.example"}
        r = server.http.options("/v1/chat/completions", headers=other)
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers


@pytest.mark.parametrize("origin", ["app.example", "http://app.example/", "https://a.example/x"])
def test_a_malformed_origin_is_refused_before_anything_loads(tmp_path, capsys, origin):
    argv = ["serve", "--store", str(tmp_path / "store"), "--cors-origin", origin]
    assert main(argv) == 1
    assert "--cors-origin" in capsys.readouterr().err
    assert not (tmp_path / "store").exists()
