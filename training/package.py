"""Package a trained generator as the shipped default: its weights in bfloat16 and, in its
config.json, the provenance of every training stage (data, steps, tokens, device, wall time, dev
evaluations) and the figures of a `genadapter eval` run.

    python training/package.py training/runs/smollm2-135m-next/generator \\
        --previous training/runs/smollm2-135m-instruct/generator \\
                   training/runs/smollm2-135m/generator \\
        --eval results/eval/results.json --out genadapter/checkpoints/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from genadapter.generator import CONFIG_NAME, Generator

MAX_BYTES = 64 * 2**20  # the shipped generator's cap (DESIGN.md)


def eval_figures(results: dict) -> dict:
    """Each suite row's metrics per method and the share of prompting's gain on each."""
    rows = {}
    for suite, suite_rows in results["suites"].items():
        for row in suite_rows:
            rows[f"{suite}/{row['name']}" if row["name"] != suite else suite] = {
                "n": row["n"],
                "methods": {
                    m: {k: v[k] for k in row["metrics"] if k in v}
                    for m, v in row["methods"].items()
                },
                "recovered": row.get("recovered", {}),
            }
    return {"limit": results["config"]["limit"], "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("generator", help="the trained generator folder")
    p.add_argument("--previous", nargs="*", default=[], help="earlier stages, newest first")
    p.add_argument("--eval", help="results.json of `genadapter eval` with this generator")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    meta = json.loads((Path(args.generator) / CONFIG_NAME).read_text())
    generator = Generator.from_pretrained(args.generator, None)
    stages = [
        Generator.from_pretrained(folder, None).config.extra for folder in reversed(args.previous)
    ]
    extra = {"stages": [*stages, generator.config.extra]}
    if args.eval:
        extra["eval"] = eval_figures(json.loads(Path(args.eval).read_text()))
    generator.config.extra = extra
    generator.save_pretrained(args.out, meta["base_fingerprint"], dtype=torch.bfloat16)
    size = sum(f.stat().st_size for f in Path(args.out).iterdir())
    if size > MAX_BYTES:
        raise SystemExit(f"{args.out} is {size / 2**20:.1f} MiB, over the 64 MiB limit")
    print(f"wrote {args.out} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
