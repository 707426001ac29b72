"""The interactive loop of `genadapter chat`: messages are answered with streaming, lines starting
with "/" are commands, Ctrl+C stops an answer and Ctrl-D or /quit leaves."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

COMMANDS = """chat commands (typed at the prompt):
  /absorb FILE   absorb a document into this session
  /reset         forget absorbed documents and the conversation
  /save DIR      save the session (state and conversation) to DIR/state.safetensors
  /load DIR      load a saved session
  /stats         tokens absorbed, state and memory sizes, KV cache the same context would need
  /help          this list
  /quit          leave (also Ctrl-D)
Ctrl+C stops an answer (the turn is not kept) or an /absorb, and returns to the prompt."""


NEEDS_ARGUMENT = {"/absorb": "FILE", "/save": "DIR", "/load": "DIR"}


def read_document(path: str, piece_chars: int = 1 << 16) -> Iterator[str]:
    """Yield a file's text in pieces so a huge file is never held whole."""
    with open(path, encoding="utf-8", errors="strict") as f:
        while piece := f.read(piece_chars):
            yield piece


def absorb_file(session, path: str) -> None:
    """Absorb one UTF-8 file into the session as one document, and say how it went."""
    from tqdm.auto import tqdm

    if Path(path).is_dir():
        raise ValueError(f"{path} is a directory: absorb one file at a time")
    if not Path(path).is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        stats = session.absorb(read_document(path), progress=True)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason})") from e
    tqdm.write(
        f"absorbed {path}: {stats.tokens} tokens in {stats.chunks} chunks, {stats.seconds:.1f} s"
    )


def describe(session) -> str:
    """One line: what the session holds (the adapter state and the context memory, apart) and
    what the same context would cost in a KV cache."""
    s = session.state
    kv = session.model.kv_cache_bytes(s.tokens)
    if session.memory is None:
        memory = "no memory"
    else:
        memory = f"memory {session.memory_tokens} tokens {session.memory_bytes / 1024:.0f} KiB"
    return (
        f"documents {s.documents}, tokens {s.tokens}, chunks {s.chunks}, "
        f"turns {len(session.messages) // 2}; state {s.nbytes / 1024:.0f} KiB, {memory} "
        f"(a KV cache for the same context: {kv / 1024:.0f} KiB)"
    )


def run_command(session, line: str):
    """Run one /command; returns the (possibly new) session, or None to quit."""
    cmd, _, arg = line.partition(" ")
    arg = arg.strip()
    if cmd in ("/quit", "/exit"):
        return None
    if cmd in NEEDS_ARGUMENT and not arg:
        raise ValueError(f"{cmd} needs {NEEDS_ARGUMENT[cmd]}, as in: {cmd} {NEEDS_ARGUMENT[cmd]}")
    if cmd == "/absorb":
        absorb_file(session, arg)
    elif cmd == "/reset":
        session.reset()
        print("session reset")
    elif cmd == "/save":
        target = Path(arg)
        if target.is_file() and target.suffix != ".safetensors":
            raise ValueError(
                f"{arg} is an existing file: /save takes a folder (it writes "
                "FOLDER/state.safetensors) or a path ending in .safetensors"
            )
        print(f"saved to {session.save(arg)}")
    elif cmd == "/load":
        session = session.model.load_session(arg)
        print(f"loaded {arg}: {describe(session)}")
    elif cmd == "/stats":
        print(describe(session))
    elif cmd == "/help":
        print(COMMANDS)
    else:
        raise ValueError(f"unknown command {cmd}; /help lists the commands")
    return session


@contextlib.contextmanager
def _ctrl_c_stops_at_a_token() -> Iterator[Callable[[], bool]]:
    """Within the block, a first Ctrl+C only marks a request to stop (the caller checks it between
    tokens, so generation ends cleanly); a second one interrupts at once (KeyboardInterrupt).
    Outside the main thread, or when SIGINT is ignored, Ctrl+C keeps its usual effect."""
    pressed: list[bool] = []

    def handler(signum, frame):
        if pressed:
            raise KeyboardInterrupt
        pressed.append(True)

    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    ):
        yield lambda: False
        return
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(pressed)
    finally:
        signal.signal(signal.SIGINT, previous)


def answer(session, message: str, max_new_tokens: int, temperature: float) -> bool:
    """Stream the answer to one message; False when Ctrl+C stopped it (the turn is then not
    recorded: the session's conversation is as it was before the message)."""
    with _ctrl_c_stops_at_a_token() as stop_requested:
        pieces = session.chat(
            message, stream=True, max_new_tokens=max_new_tokens, temperature=temperature
        )
        stopped = False
        try:
            for piece in pieces:
                if stop_requested():
                    stopped = True
                    break
                print(piece, end="", flush=True)
        finally:
            pieces.close()  # a stream closed before its end records no turn
    print()
    return not stopped


def read_line(prompt: str) -> str:
    """input(prompt); on a terminal, Ctrl+C interrupts the wait (KeyboardInterrupt) even though
    torch's threads are running. (A signal may reach any thread; the main thread, blocked in its
    read, would only notice it after the next Enter. Here it waits in select() on the terminal and
    on signal.set_wakeup_fd's pipe, so any signal with a Python handler wakes it.)"""
    if (
        not sys.stdin.isatty()  # a pipe may hold lines already buffered: plain input()
        or os.name != "posix"
        or threading.current_thread() is not threading.main_thread()
    ):
        return input(prompt)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    previous = signal.set_wakeup_fd(wake_w)
    try:
        print(prompt, end="", flush=True)
        while sys.stdin not in select.select([sys.stdin, wake_r], [], [])[0]:
            os.read(wake_r, 64)  # a signal came: its handler runs now (Ctrl+C raises here)
    finally:
        signal.set_wakeup_fd(previous)
        os.close(wake_r)
        os.close(wake_w)
    return input()


def interact(session, max_new_tokens: int, temperature: float) -> None:
    """Read messages and commands from standard input until /quit or end of input."""
    interactive = sys.stdin.isatty()
    if interactive:
        print("Type a message, or /help for commands. Ctrl+C stops an answer; Ctrl-D leaves.")
    while True:
        try:
            line = read_line("> " if interactive else "").strip()
        except EOFError:
            break
        except KeyboardInterrupt:  # at the prompt: drop the line, as a shell does
            print("\n(Ctrl-D or /quit leaves)", file=sys.stderr)
            continue
        if not line:
            continue
        try:
            if line.startswith("/"):
                session = run_command(session, line)
                if session is None:
                    break
            elif not answer(session, line, max_new_tokens, temperature):
                print("(answer stopped; the turn is not kept)", file=sys.stderr)
        except KeyboardInterrupt:  # an /absorb or /load: the session stays as it was
            print("\n(interrupted)", file=sys.stderr)
        except (OSError, ValueError) as e:  # bad file, bad state, bad input: report, keep going
            print(f"error: {e}", file=sys.stderr)
