"""A minimal streaming chat over a session that absorbed the given files. Reads questions from
standard input until end of input or /quit.

    .venv/bin/python examples/chat_with_document.py examples/data/lighthouse.md
    echo "Who is the chair?" | .venv/bin/python examples/chat_with_document.py FILE
"""

from __future__ import annotations

import argparse
import logging
import sys

import genadapter


def read_pieces(path: str):
    """A file in 64 KiB pieces: absorb takes them as one document, never holding it whole."""
    with open(path, encoding="utf-8") as f:
        while piece := f.read(1 << 16):
            yield piece


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", metavar="FILE")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    model = genadapter.load()
    session = model.session()
    for path in args.files:
        stats = session.absorb(read_pieces(path), progress=True)
        print(f"absorbed {path}: {stats.tokens} tokens, {stats.seconds:.1f} s", file=sys.stderr)

    interactive = sys.stdin.isatty()
    while True:
        try:
            question = input("> " if interactive else "").strip()
        except EOFError:
            break
        if question == "/quit":
            break
        if not question:
            continue
        if not interactive:
            print(f"> {question}")
        for piece in session.chat(question, stream=True, max_new_tokens=args.max_new_tokens):
            print(piece, end="", flush=True)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
