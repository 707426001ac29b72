"""The `genadapter` command: chat, absorb, serve, eval, bench, export, merge and library.

Each command checks its arguments (files, generator folder, device) before the slow model load
and imports torch only then, so `genadapter --help` is quick. Exit status: 0 done, 1 an error while
running, 2 a bad command line, 130 interrupted.

The parser and dispatch are here; each command group's options and code are in its own module:
sessions.py (chat, absorb), measure.py (eval, bench), adapters.py (export, merge), library.py
(library), and server/command.py (serve). Imports go one way: this package -> the command
modules -> options.py; nothing else imports the command line."""

from __future__ import annotations

import argparse
import logging
import sys

from .. import __version__
from ..options import Formatter, UsageError
from .adapters import add_export, add_merge
from .library import add_library
from .measure import add_bench, add_eval
from .sessions import add_absorb, add_chat

DESCRIPTION = """\
genadapter puts documents into a frozen language model's parameters instead of its prompt
(GenerativeAdapter): a session absorbs documents into a small state, and answers as if it had
read them. Run `genadapter COMMAND --help` for a command's options."""


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; building it imports no model code."""
    from ..server import add_serve_parser

    parser = argparse.ArgumentParser(
        prog="genadapter", description=DESCRIPTION, formatter_class=Formatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    add_chat(sub)
    add_absorb(sub)
    add_serve_parser(sub)
    add_eval(sub)
    add_bench(sub)
    add_export(sub)
    add_merge(sub)
    add_library(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except UsageError as e:
        print(f"genadapter {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        print(f"genadapter: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
