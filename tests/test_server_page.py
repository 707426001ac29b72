"""The server's chat page, driven in headless chromium."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from genadapter.server.store import SESSION_ID

from .server_kit import (
    DOCS,
    KEY,
    TIMEOUT,
    ask,
    reference_answer,
    saved_session,
)

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
