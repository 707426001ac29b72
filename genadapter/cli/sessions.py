"""`genadapter chat` and `genadapter absorb`: documents absorbed into a session, then chatted with
in the terminal (chat.py) or saved; `absorb --ray` encodes the chunks on Ray actors
(distributed.py)."""

from __future__ import annotations

import argparse

from ..options import (
    Formatter,
    UsageError,
    add_model_args,
    existing_file,
    load_model,
    model_kwargs,
    non_negative_float,
    positive_int,
)

RAY_LOCAL = "local"  # `--ray` without an address: start a local cluster


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


def add_chat(sub) -> None:
    from ..chat import COMMANDS

    chat = sub.add_parser(
        "chat",
        help="chat with a session that absorbed documents (interactive, streaming)",
        description="Absorb each --doc file, then answer messages read from the terminal.",
        epilog=COMMANDS,
        formatter_class=Formatter,
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


def add_absorb(sub) -> None:
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
