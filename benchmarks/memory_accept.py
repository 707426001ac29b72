"""Issue 23's acceptance figures when time is short: suites of the test split at `--limit small`'s
sizes with the methods an untrained generator (B = 0) makes identical left out (adapter = base
and memory+adapter = memory bit for bit; tests/test_eval.py checks it) and no SFT baseline. One
JSON per suite, written as soon as it is done.

    .venv/bin/python benchmarks/memory_accept.py qa closedbook --out docs/eval
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import genadapter
from genadapter.eval import runner
from genadapter.eval.limits import LIMITS
from genadapter.session import Session


def memory_only(model, absorbed):
    return {"memory": Session(model, memory=absorbed.memory)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("suites", nargs="+", choices=runner.SUITES)
    p.add_argument("--out", default=".")
    args = p.parse_args()
    model = genadapter.load()
    if any(layer.B.any() for layer in model.generator.layers.values()):
        raise SystemExit("a trained generator: run `genadapter eval`, every method differs")
    runner.absorbed_methods = memory_only
    limits = replace(LIMITS["small"], sft_steps=0)
    for suite in args.suites:
        start = time.perf_counter()
        r = runner.run_suites(model, [suite], limits, 0, "test", progress=False)
        r["config"] |= {"seconds": time.perf_counter() - start, "note": __doc__}
        path = Path(args.out) / f"memory-{suite}.json"
        path.write_text(json.dumps(r, indent=1))
        for row in r["suites"][suite]:
            scores = {m: round(v[row["metric"]], 3) for m, v in row["methods"].items()}
            print(suite, row["name"], row["n"], scores, flush=True)


if __name__ == "__main__":
    main()
