"""`genadapter library add|list|rm|search`: manage and search an adapter library folder
(genadapter/library/)."""

from __future__ import annotations

import argparse

from ..options import UsageError, add_model_args, existing_file, load_model, positive_int


def cmd_library(args: argparse.Namespace) -> int:
    """`library add|list|rm|search`: manage and search a library folder (genadapter/library/)."""
    import time
    from pathlib import Path

    from ..library.entry import NoEntryError
    from ..library.folder import Library

    if args.action == "add":
        for doc in args.files:
            existing_file(doc)
        library = Library.open(args.library, load_model(args), create=True)
        stats = library.add(args.name, [Path(f) for f in args.files], progress=True)
        print(
            f"added {args.name}: {stats.tokens} tokens in {stats.chunks} chunks to {args.library}"
        )
    elif args.action == "search":
        library = Library.open(args.library, load_model(args))
        for name, score in library.search(args.question, args.k, kind=args.kind):
            print(f"{score:.4f}\t{name}")
    elif args.action == "rm":
        try:
            Library.open(args.library).remove(args.name)
        except NoEntryError as e:
            raise UsageError(str(e)) from None
        print(f"removed {args.name} from {args.library}")
    else:
        entries = Library.open(args.library).list()
        for e in entries:
            added = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.added))
            print(f"{e.name}\t{e.tokens} tokens\t{e.documents} documents\tadded {added}")
        print(f"{len(entries)} entries in {args.library}")
    return 0


def add_library(sub) -> None:
    p = sub.add_parser(
        "library",
        help="manage an adapter library: documents routed per token (add, list, rm, search)",
        description="A library folder holds documents absorbed with one base and generator; "
        "decoding routes each token to its best-matching documents (docs/LIBRARY.md).",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = actions.add_parser(
        "add",
        help="absorb FILEs as one entry NAME",
        description="Absorb the FILEs as the entry NAME of LIBRARY (created when missing). "
        "Give the --base and --generator the library was made with.",
    )
    add_model_args(add)
    add.add_argument("library", metavar="LIBRARY", help="the library folder")
    add.add_argument("name", metavar="NAME", help="the entry's name: letters, digits, . _ -")
    add.add_argument("files", nargs="+", metavar="FILE", help="UTF-8 text files")
    for action, text in (("list", "list the entries"), ("rm", "remove the entry NAME")):
        q = actions.add_parser(action, help=text, description=text[0].upper() + text[1:] + ".")
        q.add_argument("library", metavar="LIBRARY", help="the library folder")
        if action == "rm":
            q.add_argument("name", metavar="NAME", help="the entry to remove")
    search = actions.add_parser(
        "search",
        help="the entries nearest QUESTION",
        description="Print the k entries of LIBRARY whose embeddings are nearest QUESTION's, "
        "best first, with their scores (cosines in the space of --kind).",
    )
    add_model_args(search)
    search.add_argument("library", metavar="LIBRARY", help="the library folder")
    search.add_argument("question", metavar="QUESTION", help="the text to search for")
    search.add_argument(
        "--k", type=positive_int, default=5, metavar="N", help="entries to print (default: 5)"
    )
    search.add_argument(
        "--kind",
        choices=("lexical", "internal", "behaviour"),  # library.embedding.KINDS, not imported
        default=None,
        help="embedding: the base's surprisal-weighted words (the default; internal while some "
        "entry predates them), its layer inputs, or its behaviour on probe prompts",
    )
    p.set_defaults(run=cmd_library)
