"""`genadapter eval` and `genadapter bench`: the evaluation suites (genadapter/eval/) and the
benchmark (genadapter/bench/), each checking its arguments before the model loads."""

from __future__ import annotations

import argparse

from ..options import Formatter, UsageError, add_model_args, load_model

SUITES_PLACEHOLDER = "{suites}"


class _EvalFormatter(Formatter):
    """Names the evaluation suites in `eval --help`, from eval/limits.py (which imports no torch),
    only when that help is shown."""

    def _expand_help(self, action: argparse.Action) -> str:
        text = super()._expand_help(action)
        if SUITES_PLACEHOLDER in text:
            from ..eval.limits import SUITES

            text = text.replace(SUITES_PLACEHOLDER, ", ".join(SUITES))
        return text


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


def add_eval(sub) -> None:
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


def add_bench(sub) -> None:
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
