"""Every code block of README.md and of the usage pages it links to (docs/API.md, CLI.md,
EXPORT.md, SERVER.md, and LIBRARY.md's usage section), as written: the Python examples and
`make demo` run; the server's curl and openai snippets run against a real `genadapter serve` (on
a free port instead of 8000); `genadapter` command lines that take minutes (eval, bench) are
parsed by the real parser and the paths they name must exist; `make` lines must name real
targets (`make -n`).

A block with a command that none of these covers fails `test_every_block_is_covered`: add a check
when adding a snippet."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from genadapter.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *(f"docs/{p}.md" for p in ("API", "CLI", "EXPORT", "SERVER"))]
_LIBRARY = (ROOT / "docs" / "LIBRARY.md").read_text(encoding="utf-8")
# LIBRARY.md's usage section; the rest of it is the method and its measurements' commands.
README = "\n".join(
    [*((ROOT / page).read_text(encoding="utf-8") for page in PAGES),
     _LIBRARY[_LIBRARY.index("\n## Usage\n") : _LIBRARY.index("\n## Method\n")]]
)  # fmt: skip
VENV = Path(sys.prefix)
# The venv's `genadapter` script first on PATH, as after `make setup` and activating the venv.
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README, re.S | re.M)


def block_with(lang: str, text: str) -> str:
    found = [b for b in blocks(lang) if text in b]
    assert len(found) == 1, f"expected one {lang} block with {text!r}, found {len(found)}"
    return found[0]


def shell_lines(block: str) -> list[str]:
    """The block's lines, backslash continuations joined and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.strip() for line in joined.splitlines() if line.strip()]


def is_server_block(block: str) -> bool:
    return "curl " in block


@pytest.fixture
def workdir(tmp_path):
    """A scratch folder where the README's relative paths (examples/data/...) resolve."""
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    return tmp_path


def run_python(code: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=ENV, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


# -- what a new user runs first --------------------------------------------------------------------


def tours() -> list[str]:
    return [b for b in blocks("python") if "genadapter.load()" in b]


@pytest.mark.parametrize("index", [0, 1], ids=["readme", "api"])
def test_python_tour_runs_as_written(workdir, index):
    tour = tours()[index]
    out = run_python(tour, workdir)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (workdir / "results" / "lighthouse" / "state.safetensors").is_file()
    # Under a git-ignored folder: running the tour in a clone leaves no untracked files.
    ignored = (ROOT / ".gitignore").read_text().split()
    assert "results/" in ignored
    assert out.stdout.strip(), "the tour prints what it does"


def test_make_demo_runs_as_written():
    (line,) = [x for x in shell_lines(block_with("sh", "make demo")) if x == "make demo"]
    # -o: the venv is already set up (the tests run in it); never reinstall from a test.
    cmd = [*shlex.split(line), f"VENV={VENV}", "-o", f"{VENV}/.installed"]
    out = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "KV cache" in out.stdout or "state" in out.stdout, out.stdout[-2000:]


# -- command lines too slow to run here: the real parser, and the paths they name ------------------


def check_genadapter_line(line: str) -> None:
    words = shlex.split(line, comments=True)
    assert words[0] == "genadapter"
    parser = build_parser()
    if "[" in line or "..." in line:  # a synopsis: each option it shows must exist
        sub = parser._subparsers._group_actions[0].choices[words[1]]
        known = {s for action in sub._actions for s in action.option_strings}
        shown = set(re.findall(r"--[a-z][a-z-]*", line))
        assert shown <= known, f"{line}: unknown options {shown - known}"
        return
    if words[1:] == ["--help"]:
        with pytest.raises(SystemExit) as done:
            parser.parse_args(words[1:])
        assert done.value.code == 0
        return
    args = parser.parse_args(words[1:])
    for name in ("generator", "base", "doc", "files"):
        value = getattr(args, name, None)
        for path in [value] if isinstance(value, str) else value or []:
            assert (ROOT / path).exists(), f"{line}: no {path}"


def test_command_lines_parse(capsys):
    lines = [
        line
        for block in blocks("sh")
        if not is_server_block(block)
        for line in shell_lines(block)
        if line.startswith("genadapter ")
    ]
    assert any(line.startswith("genadapter eval") for line in lines)
    assert any(line.startswith("genadapter serve --host") for line in lines)
    for line in lines:
        check_genadapter_line(line)


def test_make_lines_name_real_targets():
    for block in blocks("sh"):
        for line in shell_lines(block):
            if line.startswith("make "):
                target = shlex.split(line, comments=True)[1]
                cmd = ["make", "-n", target, f"VENV={VENV}", "-o", f"{VENV}/.installed"]
                out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
                assert out.returncode == 0, (line, out.stderr)


def test_every_block_is_covered():
    """Each python and sh block is one that a test above runs or checks."""
    python = blocks("python")
    assert len(tours()) == 2  # the README's example, then docs/API.md's tour
    assert len(python) == 3 and sum("from openai import OpenAI" in b for b in python) == 1
    for block in blocks("sh"):
        if is_server_block(block):
            continue  # run by the server tests below
        for line in shell_lines(block):
            first = line.split()[0]
            assert first in ("genadapter", "make"), f"README line not checked by a test: {line}"


# -- the server snippets, against a real server ----------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_port(text: str, port: int) -> str:
    return re.sub(r"(localhost|127\.0\.0\.1):8000\b", rf"\1:{port}", text)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The README's first `genadapter serve` line, run in a scratch folder on a free port."""
    work = tmp_path_factory.mktemp("readme-server")
    (work / "examples").symlink_to(ROOT / "examples")
    line = shell_lines(block_with("sh", "genadapter serve --store"))[0]
    line = shlex.join(shlex.split(line, comments=True))
    port = _free_port()
    log = open(work / "server.log", "w")  # closed below
    env = {k: v for k, v in ENV.items() if k != "GENADAPTER_API_KEY"}  # as the snippets assume
    proc = subprocess.Popen(
        ["bash", "-c", f"exec {line} --port {port}"],
        cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, (work / "server.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not start in 300 s"
                time.sleep(0.5)
        yield work, port
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def test_curl_snippets_run_as_written(server):
    work, port = server
    block = on_port(block_with("sh", "curl -s -X POST"), port)
    out = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block],
        cwd=work, env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert '"tokens"' in out.stdout and "data: " in out.stdout and "[DONE]" in out.stdout
    assert '"error"' not in out.stdout, out.stdout


def test_openai_snippet_runs_as_written(server):
    work, port = server
    snippet = on_port(block_with("python", "from openai import OpenAI"), port)
    out = run_python(snippet, work, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip(), "the snippet prints the answer"
