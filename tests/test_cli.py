"""The command line, run as a user would: a subprocess with piped standard input, or on a
pseudo-terminal for Ctrl+C and Ctrl-D."""

import argparse
import fcntl
import os
import pty
import re
import select
import signal
import subprocess
import sys
import termios
import time

import pytest
import torch

import genadapter
from genadapter.cli import build_parser

from .conftest import DOCUMENT, TEST_CHUNK, make_tiny_base


def run_cli(*args, stdin="", timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "genadapter.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_absorb_command_saves_a_loadable_session(model, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text(DOCUMENT)
    out = run_cli(
        "absorb", str(doc), str(doc), "--out", str(tmp_path / "s"), "--chunk-tokens", "64"
    )
    assert out.returncode == 0, out.stderr
    # No --generator: the warning tells a command-line user how to pass one.
    assert "--generator PATH" in out.stderr and "generator=PATH" not in out.stderr
    loaded = model.load_session(tmp_path / "s")
    direct = model.session()
    direct.absorb(DOCUMENT)
    direct.absorb(DOCUMENT)
    assert loaded.state.tokens == direct.state.tokens and loaded.state.documents == 2
    for name, S in direct.state.sums.items():
        assert torch.allclose(loaded.state.sums[name], S, rtol=1e-5, atol=1e-5)


def test_absorb_command_quantizes_the_base_when_asked(model, tmp_path):
    # --quantize reaches genadapter.load(): the int8 base's state is close to the float one's
    # (tests/test_quantize.py bounds how close) but not identical.
    doc = tmp_path / "doc.txt"
    doc.write_text(DOCUMENT)
    from genadapter import cli

    argv = ["absorb", str(doc), "--out", str(tmp_path / "q"), "--chunk-tokens", "64"]
    assert cli.main([*argv, "--quantize", "int8"]) == 0  # in this process: no 3-4 s of imports
    loaded = model.load_session(tmp_path / "q")
    direct = model.session()
    direct.absorb(DOCUMENT)
    cosines = [
        torch.nn.functional.cosine_similarity(loaded.state.sums[n].flatten(), S.flatten(), dim=0)
        for n, S in direct.state.sums.items()
    ]
    assert 0.9 < sum(cosines) / len(cosines) < 1 - 1e-6


def test_chat_repl_commands(tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text(DOCUMENT)
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\xff\xfe\x00\x01")
    script = "\n".join(
        [
            "/stats",
            "What is the capital of France?",
            f"/absorb {bad}",
            f"/absorb {tmp_path / 'missing.txt'}",
            f"/absorb {tmp_path}",
            "/absorb",
            "/frobnicate",
            f"/save {doc}",
            f"/save {tmp_path / 'saved'}",
            "/reset",
            "/stats",
            f"/load {tmp_path / 'saved'}",
            "/quit",
            "never read",
        ]
    )
    out = run_cli("chat", "--doc", str(doc), "--max-new-tokens", "16", stdin=script)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any("Paris" in line for line in lines)
    stats = [line for line in lines if line.startswith("documents")]
    assert stats[0].startswith("documents 1, tokens") and "tokens 0" not in stats[0]
    # The memory holds the same absorbed tokens as the state, reported apart from it.
    absorbed = re.search(r"tokens (\d+), chunks", stats[0])[1]
    assert re.search(r"; state \d+ KiB, memory (\d+) tokens [1-9]\d* KiB", stats[0])[1] == absorbed
    assert stats[1].startswith("documents 0, tokens 0") and "memory 0 tokens 0 KiB" in stats[1]
    loaded = [line for line in lines if line.startswith("loaded")]
    assert loaded and "documents 1" in loaded[0] and f"memory {absorbed} tokens" in loaded[0]
    assert "not UTF-8" in out.stderr and "no such file" in out.stderr
    # Each mistake is said in words (issue 25, item 7), and none changes anything.
    assert f"error: {tmp_path} is a directory" in out.stderr
    assert "error: /absorb needs FILE" in out.stderr
    assert "error: unknown command /frobnicate; /help lists the commands" in out.stderr
    assert f"error: {doc} is an existing file: /save takes a folder" in out.stderr
    assert "Errno" not in out.stderr and doc.read_text() == DOCUMENT
    assert (tmp_path / "saved" / "state.safetensors").is_file()


def test_describe_reports_the_state_and_the_memory_apart(tmp_path):
    """/stats's line on a tiny random base, with a memory and without one."""
    from genadapter.base import load_tokenizer
    from genadapter.chat import describe

    base = make_tiny_base(tmp_path / "base", load_tokenizer())
    for storage in ("int8", None):
        model = genadapter.load(
            base=base, device="cpu", chunk_tokens=TEST_CHUNK, quantize=None, memory=storage
        )
        session = model.session()
        session.absorb(DOCUMENT)
        line = describe(session)
        state = f"state {session.state.nbytes / 1024:.0f} KiB"
        if storage is None:
            assert f"; {state}, no memory (a KV cache" in line
        else:
            memory = f"memory {session.tokens} tokens {session.memory_bytes / 1024:.0f} KiB"
            assert session.memory_bytes > 0 and f"; {state}, {memory} (a KV cache" in line


def test_library_commands_add_list_and_remove(tmp_path, capsys):
    from genadapter import cli
    from genadapter.library.folder import Library

    doc = tmp_path / "doc.txt"
    doc.write_text(DOCUMENT)
    lib = tmp_path / "lib"
    # Every action in this process (the same main(); a new interpreter each is 3-4 s).
    argv = ["library", "add", str(lib), "rail", str(doc), str(doc), "--chunk-tokens", "64"]
    assert cli.main(argv) == 0
    (entry,) = Library.open(lib).list()
    assert entry.name == "rail" and entry.documents == 2 and entry.tokens > 100
    capsys.readouterr()
    assert cli.main(["library", "list", str(lib)]) == 0
    stdout = capsys.readouterr().out
    assert stdout.startswith(f"rail\t{entry.tokens} tokens")
    assert stdout.splitlines()[-1] == f"1 entries in {lib}"
    argv = ["library", "search", str(lib), "When was the line electrified?", "--k", "3"]
    for kind in ([], ["--kind", "behaviour"]):  # lexical (the default), then another kind
        assert cli.main([*argv, *kind, "--device", "cpu"]) == 0
        (line,) = capsys.readouterr().out.splitlines()  # one entry, however large --k
        assert line.endswith("\trail") and -1 <= float(line.split()[0]) <= 1
    assert cli.main(["library", "rm", str(lib), "nope"]) == 2
    assert "no entry 'nope'" in capsys.readouterr().err
    assert cli.main(["library", "rm", str(lib), "rail"]) == 0 and Library.open(lib).list() == []
    assert cli.main(["library", "list", str(tmp_path / "none")]) == 1
    assert "no library" in capsys.readouterr().err


def test_cli_errors_are_clear(tmp_path, capsys):
    # In this process (the same main() a subprocess runs; a new interpreter each is 3-4 s).
    from genadapter.cli import main

    assert main(["absorb", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "s")]) == 2
    assert "no such file" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert main(["absorb", str(empty), "--out", str(tmp_path / "s")]) == 1
    assert "empty" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


# -- arguments and help, checked before any model loads --------------------------------------------


def test_help_is_quick_lists_every_command_and_imports_no_torch():
    probe = (
        "import sys\n"
        "from genadapter.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "print('heavy:', sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip().endswith("heavy: []")
    for command in ("chat", "absorb", "serve", "eval", "bench", "export", "merge", "library"):
        line = next(x for x in out.stdout.splitlines() if x.strip().startswith(command + " "))
        assert len(line.split()) > 3, line  # the command and what it does
    assert "--version" in out.stdout


def test_version():
    out = run_cli("--version", timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"genadapter {genadapter.__version__}"


def test_every_option_says_its_default():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(commands.choices) == {
        "chat", "absorb", "serve", "eval", "bench", "export", "merge", "library",
    }  # fmt: skip
    for name, sub in commands.choices.items():
        for action in sub._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue  # positionals
            if isinstance(action, argparse._HelpAction) or action.required:
                continue  # -h, and options that must be given (no default to tell)
            assert action.help and "default" in action.help, (name, action.option_strings)


def test_chat_help_lists_the_slash_commands():
    out = run_cli("chat", "--help", timeout=60)
    assert out.returncode == 0
    for command in ("/absorb FILE", "/reset", "/save DIR", "/load DIR", "/stats", "/quit"):
        assert command in out.stdout
    assert "Ctrl+C" in out.stdout and "Ctrl-D" in out.stdout


def test_eval_help_names_every_suite():
    from genadapter.eval.runner import SUITES

    out = run_cli("eval", "--help", timeout=60)
    assert out.returncode == 0 and ", ".join(SUITES) + ", or all" in " ".join(out.stdout.split())


def test_bad_arguments_are_one_line_errors_before_the_model_loads(tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text(DOCUMENT)
    # A device this machine does not have: plain "cuda" on a CPU-only machine.
    missing = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    cases = [
        (["chat", "--device", missing], f"--device {missing}: "),
        (["chat", "--device", "toaster"], "--device toaster: not a device name"),
        (["chat", "--generator", "nope"], "--generator nope: no such folder"),
        (["chat", "--generator", str(tmp_path)], "not a generator folder"),
        (["chat", "--base", str(tmp_path / "nope.gguf")], "no such file or folder"),
        (["chat", "--doc", str(doc), "--doc", str(tmp_path / "missing.txt")], "no such file"),
        (["absorb", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "s")], "no such file"),
        (["absorb", str(tmp_path), "--out", str(tmp_path / "s")], "not a file"),
        (["bench", "--device", missing, "--quick"], "CUDA"),
    ]
    # In this process (main() as `genadapter` runs it); `chat` never reads its input here.
    from genadapter.cli import main

    capsys.readouterr()
    for args, message in cases:
        assert main(args) == 2, (args, capsys.readouterr().err)
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (args, err)
        assert err.startswith(f"genadapter {args[0]}: error: "), err
    assert not (tmp_path / "s").exists()


def test_memory_reading_options_are_checked_by_the_parser(capsys):
    from genadapter.cli import main

    for args, message in (
        (["eval", "--memory-fraction", "1.5"], "--memory-fraction: must be in (0, 1]"),
        (["chat", "--memory-budget", "0"], "--memory-budget: must be at least 1"),
        (["absorb", "x", "--out", "y", "--memory-block", "a"], "expected a whole number"),
    ):
        with pytest.raises(SystemExit) as exit_:
            main(args)
        assert exit_.value.code == 2 and message in capsys.readouterr().err


# -- Ctrl+C in chat --------------------------------------------------------------------------------


def _controlling_terminal() -> None:
    """In the child: make the pty its controlling terminal, and give it the SIGINT disposition a
    user's shell gives (a test run started in the background inherits SIGINT ignored, which
    Python would keep, and Ctrl+C would then do nothing)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminal:
    """The chat command on a pseudo-terminal it controls, as a user runs it: Ctrl+C typed there
    reaches it as SIGINT from the terminal, Ctrl-D as end of input."""

    def __init__(self, args, timeout=300):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "genadapter.cli", *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,  # a session of its own, whose controlling terminal is this
            preexec_fn=_controlling_terminal,
            env={**os.environ, "TERM": "dumb"},
        )
        os.close(slave)
        self.output, self.seen, self.timeout = b"", 0, timeout

    def expect(self, text: str) -> str:
        """Wait for `text` after what was already expected; returns the output up to it."""
        deadline = time.monotonic() + self.timeout
        while (at := self.output.find(text.encode(), self.seen)) < 0:
            ready, _, _ = select.select([self.master], [], [], deadline - time.monotonic())
            assert ready, f"no {text!r} in {self.output[self.seen :].decode(errors='replace')!r}"
            try:
                data = os.read(self.master, 4096)
            except OSError:  # the command exited and closed the terminal
                data = b""
            assert data, f"exited before {text!r}: {self.output.decode(errors='replace')!r}"
            self.output += data
        start, self.seen = self.seen, at + len(text)
        return self.output[start : self.seen].decode(errors="replace")

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def close(self) -> int:
        code = self.proc.wait(timeout=60)
        os.close(self.master)
        return code


def test_ctrl_c_stops_an_answer_and_keeps_the_session(tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text(DOCUMENT)
    term = Terminal(["chat", "--doc", str(doc), "--chunk-tokens", "64", "--max-new-tokens", "400"])
    try:
        term.expect("> ")
        term.type(b"What is the capital of France?\n")
        assert "Paris" in term.expect("> ")
        term.type(b"Write a very long story about a railway, with many chapters.\n")
        term.expect("railway, with many chapters.\r\n")  # the terminal's echo of the line
        term.expect(" ")  # the answer has started streaming
        term.type(b"\x03")  # Ctrl+C
        term.expect("answer stopped")
        term.expect("> ")
        term.type(b"\x03")  # Ctrl+C at the prompt: a fresh prompt, the chat goes on
        term.expect("/quit leaves")
        term.expect("> ")
        term.type(b"/stats\n")
        # The document and the finished turn are kept; the stopped turn is not recorded.
        stats = term.expect("> ")
        assert "documents 1, tokens" in stats and "turns 1;" in stats, stats
        term.type(b"\x04")  # Ctrl-D leaves
        assert term.close() == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
