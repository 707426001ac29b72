"""Command line: `genadapter chat` (interactive, streaming) and `genadapter absorb`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tqdm.auto import tqdm

HELP = """commands:
  /absorb FILE   absorb a document into this session
  /reset         forget absorbed documents and the conversation
  /save DIR      save the session (state and conversation)
  /load DIR      load a saved session
  /stats         tokens absorbed, state size, KV cache the same context would need
  /quit          leave (also Ctrl-D)"""


def _load_model(args):
    import genadapter

    return genadapter.load(
        base=args.base,
        generator=args.generator,
        device=args.device,
        chunk_tokens=args.chunk_tokens,
        quantize=quantize_arg(args.quantize),
    )


def quantize_arg(value: str) -> str | None:
    """--quantize's value as genadapter.load() takes it ("none" -> None)."""
    return None if value == "none" else value


def _read_document(path: str):
    """Yield a file's text in pieces so a huge file is never held whole."""
    with open(path, encoding="utf-8", errors="strict") as f:
        while piece := f.read(1 << 16):
            yield piece


def _absorb_file(session, path: str) -> None:
    if not Path(path).is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        stats = session.absorb(_read_document(path), progress=True)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason})") from e
    tqdm.write(
        f"absorbed {path}: {stats.tokens} tokens in {stats.chunks} chunks, {stats.seconds:.1f} s"
    )


def _stats(session) -> str:
    s = session.state
    kv = session.model.kv_cache_bytes(s.tokens)
    return (
        f"documents {s.documents}, tokens {s.tokens}, chunks {s.chunks}, "
        f"turns {len(session.messages) // 2}; state {session.nbytes / 1024:.0f} KiB "
        f"(a KV cache for the same context: {kv / 1024:.0f} KiB)"
    )


def _command(session, line: str):
    """Run one /command; returns the (possibly new) session, or None to quit."""
    cmd, _, arg = line.partition(" ")
    arg = arg.strip()
    if cmd in ("/quit", "/exit"):
        return None
    if cmd == "/absorb" and arg:
        _absorb_file(session, arg)
    elif cmd == "/reset":
        session.reset()
        print("session reset")
    elif cmd == "/save" and arg:
        print(f"saved to {session.save(arg)}")
    elif cmd == "/load" and arg:
        session = session.model.load_session(arg)
        print(f"loaded {arg}: {_stats(session)}")
    elif cmd == "/stats":
        print(_stats(session))
    else:
        print(HELP)
    return session


def cmd_chat(args) -> int:
    model = _load_model(args)
    session = model.session()
    for doc in args.doc:
        _absorb_file(session, doc)
    interactive = sys.stdin.isatty()
    if interactive:
        print("Type a message, or /help for commands.")
    while True:
        try:
            line = input("> " if interactive else "").strip()
        except EOFError:
            break
        if not line:
            continue
        try:
            if line.startswith("/"):
                session = _command(session, line)
                if session is None:
                    break
                continue
            for piece in session.chat(
                line, stream=True, max_new_tokens=args.max_new_tokens, temperature=args.temperature
            ):
                print(piece, end="", flush=True)
            print()
        except (OSError, ValueError) as e:  # bad file, bad state, bad input: report, keep going
            print(f"error: {e}", file=sys.stderr)
    return 0


def cmd_absorb(args) -> int:
    model = _load_model(args)
    session = model.session()
    for doc in args.files:
        _absorb_file(session, doc)
    path = session.save(args.out)
    print(f"saved {session.state.tokens} tokens of context as {session.nbytes} bytes to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genadapter", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p):
        p.add_argument(
            "--base",
            help="local Hugging Face folder or .gguf file (default: "
            "the embedded SmolLM2-135M-Instruct)",
        )
        p.add_argument("--generator", help="trained generator folder")
        p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when present)")
        p.add_argument("--chunk-tokens", type=int, help="context chunk length in tokens")
        p.add_argument(
            "--quantize",
            choices=["auto", "nf4", "int8", "none"],
            default="auto",
            help="base weights through bitsandbytes (default auto: nf4 on CUDA, none on CPU)",
        )

    chat = sub.add_parser("chat", help="chat with a session that absorbed documents")
    model_args(chat)
    chat.add_argument(
        "--doc", action="append", default=[], metavar="FILE", help="absorb FILE first (repeatable)"
    )
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.set_defaults(run=cmd_chat)

    absorb = sub.add_parser("absorb", help="absorb files into a new session and save it")
    model_args(absorb)
    absorb.add_argument("files", nargs="+", metavar="FILE")
    absorb.add_argument("--out", required=True, metavar="DIR", help="where to save the session")
    absorb.set_defaults(run=cmd_absorb)

    from .server import add_serve_parser

    add_serve_parser(sub, model_args)

    from .bench import add_bench_parser
    from .eval.runner import add_eval_parser

    add_eval_parser(sub, model_args)
    add_bench_parser(sub, model_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (OSError, ValueError) as e:
        print(f"genadapter: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
