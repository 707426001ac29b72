"""`genadapter export` and `genadapter merge`: a saved session written as a PEFT LoRA or a merged
model folder, and sessions or LoRA folders merged into one (genadapter/adapters/)."""

from __future__ import annotations

import argparse

from ..options import UsageError, add_model_args, existing_file, load_model


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


def add_export(sub) -> None:
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


def add_merge(sub) -> None:
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
