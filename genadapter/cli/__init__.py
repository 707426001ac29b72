"""The `genadapter` command: chat, absorb, serve, eval, bench, export, merge and library.

Each command checks its arguments (files, generator folder, device) before the slow model load
and imports torch only then, so `genadapter --help` is quick. Exit status: 0 done, 1 an error while
running, 2 a bad command line, 130 interrupted."""

from __future__ import annotations

import argparse
import logging
import sys

from .. import __version__
from ..options import (
    UsageError,
    add_model_args,
    existing_file,
    load_model,
    model_kwargs,
    non_negative_float,
    positive_int,
)

DESCRIPTION = """\
genadapter puts documents into a frozen language model's parameters instead of its prompt
(GenerativeAdapter): a session absorbs documents into a small state, and answers as if it had
read them. Run `genadapter COMMAND --help` for a command's options."""

SUITES_PLACEHOLDER = "{suites}"
RAY_LOCAL = "local"  # `--ray` without an address: start a local cluster


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the line breaks of descriptions and epilogs (the chat commands' table)."""


class _EvalFormatter(_Formatter):
    """Names the evaluation suites in `eval --help`, from eval/limits.py (which imports no torch),
    only when that help is shown."""

    def _expand_help(self, action: argparse.Action) -> str:
        text = super()._expand_help(action)
        if SUITES_PLACEHOLDER in text:
            from ..eval.limits import SUITES

            text = text.replace(SUITES_PLACEHOLDER, ", ".join(SUITES))
        return text


def cmd_chat(args: argparse.Namespace) -> int:
    from ..chat import absorb_file, interact

    for doc in args.doc:
        existing_file(doc, "--doc")
    model = load_model(args)
    session = model.session()
    for doc in args.doc:
        absorb_file(session, doc)
    interact(session, args.max_new_tokens, args.temperature)
    return 0


def cmd_absorb(args: argparse.Namespace) -> int:
    from ..chat import absorb_file

    for doc in args.files:
        existing_file(doc)
    if args.ray is not None:
        return absorb_on_ray(args)
    if args.workers is not None or args.worker_cpus is not None:
        raise UsageError("--workers and --worker-cpus need --ray")
    model = load_model(args)
    session = model.session()
    for doc in args.files:
        absorb_file(session, doc)
    path = session.save(args.out)
    print(f"saved {session.state.tokens} tokens of context as {session.nbytes} bytes to {path}")
    return 0


def absorb_on_ray(args: argparse.Namespace) -> int:
    """`absorb --ray [ADDRESS]`: the files' chunks encoded by Ray actors (genadapter.distributed),
    the partial states added, the sum saved as a session."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise UsageError("--ray needs the ray package: pip install 'genadapter[ray]'")
    from ..distributed import RayAbsorber
    from ..session import Session

    kwargs = model_kwargs(args)
    gpus = 1 if (args.device or "").startswith("cuda") else 0
    address = None if args.ray == RAY_LOCAL else args.ray
    cpus = args.worker_cpus or 1
    with RayAbsorber(kwargs, args.workers, address, cpus, gpus) as pool:
        workers = len(pool.actors)
        result = pool.absorb_files(args.files)
        session = Session(pool.model, result.state, memory=result.memory)
    path = session.save(args.out)
    print(
        f"saved {session.state.tokens} tokens ({session.state.chunks} chunks, {workers} Ray "
        f"workers) as {session.nbytes} bytes to {path}"
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from ..eval.limits import SUITES, resolve_limits

    asked = args.suite or ["all"]
    for suite in asked:
        if suite != "all" and suite not in SUITES:
            raise UsageError(f"--suite {suite}: unknown suite; known: {', '.join(SUITES)}, all")
    suites = SUITES if "all" in asked else tuple(dict.fromkeys(asked))
    try:
        limits = resolve_limits(args.limit)
    except ValueError as e:
        raise UsageError(f"--limit {args.limit}: {e}") from None
    from ..eval.report import format_table, write_charts, write_json  # torch: after the checks
    from ..eval.runner import run_suites

    model = load_model(args)
    start = time.perf_counter()
    results = run_suites(model, suites, limits, args.seed, args.split)
    results["config"]["limit"] = args.limit
    results["config"]["seconds"] = time.perf_counter() - start
    out = Path(args.out)
    saved = write_json(results, out / "results.json")  # first: nothing computed is lost
    print(format_table(results))
    paths = [saved, *write_charts(results, out)]
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ..adapters.export import export_session, memory_note
    from ..session import _state_path

    if not args.peft and not args.merged:
        raise UsageError("give --peft OUT, --merged OUT, or both")
    existing_file(str(_state_path(args.session)), "SESSION")
    model = load_model(args)
    session = model.load_session(args.session)
    for out, merged in ((args.peft, False), (args.merged, True)):
        if out:
            path = export_session(session, out, merged=merged, warn=False)
            what = "model folder with the delta merged" if merged else "PEFT LoRA adapter"
            print(f"wrote a {what} for {session.tokens} absorbed tokens to {path}")
    if note := memory_note(session.memory):
        print(f"note: {note}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..adapters.export import CONFIG_FILE
    from ..adapters.merging import merge, merge_session_files
    from ..session import _state_path

    loras = [(Path(p) / CONFIG_FILE).is_file() for p in args.inputs]
    if any(loras) and not all(loras):
        raise UsageError("merge session folders with session folders, PEFT folders with PEFT ones")
    if args.weights is not None and len(args.weights) != len(args.inputs):
        raise UsageError(f"--weights: give {len(args.inputs)} numbers, one per input")
    options = dict(method=args.method, weights=args.weights, density=args.density, seed=args.seed)
    if all(loras):
        merge(args.inputs, **options).save(args.out)
        print(f"wrote the {args.method} merge of {len(args.inputs)} LoRAs to {args.out}")
        return 0
    for p in args.inputs:
        existing_file(str(_state_path(p)))
    path = merge_session_files(args.inputs, args.out, **options)
    print(f"wrote the {args.method} merge of {len(args.inputs)} sessions to {path}")
    return 0


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


def cmd_bench(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from ..bench.run import format_report, run_bench
    from ..state import atomic_write

    if args.library and args.memory:
        raise UsageError("--library and --memory each run one part alone: give one of them")
    model = load_model(args, dtype=args.dtype)
    size = "quick" if args.quick else "default"
    if args.library or args.memory:  # part 5 (an adapter library) or 6 (context memory) alone
        from ..bench import library, memory
        from ..bench.run import SIZES

        part = library if args.library else memory
        results = part.run(model, SIZES[size])
        print(part.format_report(results))
    else:
        results = run_bench(model, size)
        print(format_report(results))
    out = Path(args.out)
    atomic_write(out, json.dumps(results, indent=1).encode())
    print(f"wrote {out}")
    return 0


def _add_chat(sub) -> None:
    from ..chat import COMMANDS

    chat = sub.add_parser(
        "chat",
        help="chat with a session that absorbed documents (interactive, streaming)",
        description="Absorb each --doc file, then answer messages read from the terminal.",
        epilog=COMMANDS,
        formatter_class=_Formatter,
    )
    add_model_args(chat)
    chat.add_argument(
        "--doc",
        action="append",
        default=[],
        metavar="FILE",
        help="absorb FILE first; repeatable (default: none, an empty session)",
    )
    chat.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=256,
        metavar="N",
        help="longest answer in tokens (default: 256)",
    )
    chat.add_argument(
        "--temperature",
        type=non_negative_float,
        default=0.0,
        metavar="T",
        help="sampling temperature; 0 is greedy (default: 0)",
    )
    chat.set_defaults(run=cmd_chat)


def _add_absorb(sub) -> None:
    absorb = sub.add_parser(
        "absorb",
        help="absorb files into a new session and save it",
        description="Absorb each FILE as one document into a new session; save it to DIR.",
    )
    add_model_args(absorb)
    absorb.add_argument("files", nargs="+", metavar="FILE", help="UTF-8 text files")
    absorb.add_argument(
        "--out", required=True, metavar="DIR", help="save the session as DIR/state.safetensors"
    )
    ray = absorb.add_argument_group("Ray (pip install 'genadapter[ray]')")
    ray.add_argument(
        "--ray",
        nargs="?",
        const=RAY_LOCAL,
        metavar="ADDRESS",
        help="encode the chunks on Ray actors, each loading the model once: a new local cluster "
        "without ADDRESS, else an existing one (auto, HOST:6379, ray://HOST:10001) "
        "(default: off, this process)",
    )
    ray.add_argument(
        "--workers",
        type=positive_int,
        metavar="N",
        help="Ray actors (default: as many as the cluster's CPUs allow)",
    )
    ray.add_argument(
        "--worker-cpus",
        type=positive_int,
        metavar="N",
        help="CPUs (torch threads) per actor (default: 1)",
    )
    absorb.set_defaults(run=cmd_absorb)


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="compare base, prompting and absorbed context (and SFT) on evaluation suites",
        description="Evaluation suites of docs/EVAL.md: a table, results.json and charts.",
        formatter_class=_EvalFormatter,
    )
    add_model_args(p)
    p.add_argument(
        "--suite",
        action="append",
        metavar="SUITE",
        help=f"{SUITES_PLACEHOLDER}, or all; repeatable (default: all)",
    )
    p.add_argument(
        "--limit",
        default="small",
        help="tiny, small, full, or a number of examples (default: small)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the generated suites (default: 0)")
    p.add_argument(
        "--split", choices=["test", "dev"], default="test", help="documents' split (default: test)"
    )
    p.add_argument(
        "--out",
        default="eval-results",
        metavar="DIR",
        help="JSON and charts (default: eval-results)",
    )
    p.set_defaults(run=cmd_eval)


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a saved session as a PEFT LoRA adapter or a merged model folder",
        description="Write SESSION's delta as a PEFT LoRA folder (transformers + PEFT, vLLM) "
        "and/or a full transformers model folder with the delta merged into the base's weights. "
        "Give the --base and --generator the session was made with.",
    )
    add_model_args(p)
    p.add_argument("session", metavar="SESSION", help="a saved session (DIR or .safetensors)")
    p.add_argument(
        "--peft", metavar="OUT", help="write the PEFT adapter folder OUT (default: not written)"
    )
    p.add_argument(
        "--merged", metavar="OUT", help="write the merged model folder OUT (default: not written)"
    )
    p.set_defaults(run=cmd_export)


# adapters/merging.py's METHODS, spelled out: building the parser must not import torch (tests
# check both).
MERGE_METHODS = (
    "sum", "mean", "task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune",
)  # fmt: skip


def _add_merge(sub) -> None:
    p = sub.add_parser(
        "merge",
        help="merge saved sessions, or PEFT LoRA folders, into one",
        description="Merge saved sessions into a session (their states by --method, their "
        "memories joined), or PEFT LoRA folders (e.g. from `genadapter export --peft`) into a "
        "LoRA folder. `sum` of sessions is exactly one session that absorbed all their documents. "
        "Cost, two rank-32 SmolLM2-135M LoRAs on a quiet 2-core CPU: sum 2 s, ties 14 s (about 6 s "
        "of imports, then PEFT's magnitude pruning of the dense deltas and an SVD per layer); "
        "sessions: sum 2 s, ties 6 s. No model is loaded.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="session or PEFT LoRA folders")
    p.add_argument("--method", choices=MERGE_METHODS, default="sum", help="(default: sum)")
    p.add_argument(
        "--weights", type=float, nargs="+", metavar="W", help="one per input (default: 1 each)"
    )
    p.add_argument(
        "--density",
        type=float,
        default=0.5,
        help="share of entries TIES / DARE / magnitude pruning keep (default: 0.5)",
    )
    p.add_argument("--seed", type=int, default=0, help="DARE's random drops (default: 0)")
    p.add_argument("--out", required=True, metavar="DIR", help="the merged session or LoRA folder")
    p.set_defaults(run=cmd_merge)


def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="speed and memory of absorbed context against prompting",
        description="Absorb, decode and time-to-first-token measurements (docs/BENCHMARKS.md).",
    )
    add_model_args(p)
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes, for tests: about 20 s on a quiet 2-core CPU, minutes on a loaded one "
        "(default: off; the full run takes about 8 minutes there)",
    )
    p.add_argument(
        "--library",
        action="store_true",
        help="only part 5: decode with top-2 routing over 128 stored states against one state "
        "(default: off, all parts)",
    )
    p.add_argument(
        "--memory",
        action="store_true",
        help="only part 6: context memory bytes per token, decode and time to first token with "
        "512 / 2K / 8K / 32K memory tokens against prompting (default: off, all parts)",
    )
    p.add_argument(
        "--out",
        default="bench-results.json",
        metavar="FILE",
        help="JSON results (default: bench-results.json)",
    )
    p.add_argument(
        "--dtype", help="float32, bfloat16, ... (default: bfloat16 on CUDA, float32 on the CPU)"
    )
    p.set_defaults(run=cmd_bench)


def _add_library(sub) -> None:
    p = sub.add_parser(
        "library",
        help="manage an adapter library: documents routed per token (add, list, rm, search)",
        description="A library folder holds documents absorbed with one base and generator; "
        "decoding routes each token to its best-matching documents (README: Adapter library).",
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
        choices=("lexical", "internal", "behaviour"),  # embedding.KINDS (not imported here)
        default=None,
        help="embedding: the base's surprisal-weighted words (the default; internal while some "
        "entry predates them), its layer inputs, or its behaviour on probe prompts",
    )
    p.set_defaults(run=cmd_library)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; building it imports no model code."""
    from ..server import add_serve_parser

    parser = argparse.ArgumentParser(
        prog="genadapter", description=DESCRIPTION, formatter_class=_Formatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    _add_chat(sub)
    _add_absorb(sub)
    add_serve_parser(sub)
    _add_eval(sub)
    _add_bench(sub)
    _add_export(sub)
    _add_merge(sub)
    _add_library(sub)
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
