"""Absorb throughput on a local Ray cluster (genadapter.distributed) against a plain
single-process Session.absorb of the same files, side by side in one run.

    .venv/bin/python benchmarks/ray_absorb.py --tokens 8192 --repeats 2

Writes generated English prose (documents about invented entities, as `genadapter bench` uses) into
four files in a temporary folder, then measures tokens/s of: Session.absorb in this process (torch
with its default threads, and with 1 thread), and RayAbsorber with 1 and 2 actors of 1 CPU each.
Times start when the model is loaded (actor start-up is reported separately); best of --repeats.
Checks that every distributed state equals the single-process one (relative error <= 1e-5) and
that its context memory holds the same chunks of the same documents (reporting how many int8 keys
and values differ: 0 expected)."""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import ray
import torch

import genadapter
from genadapter.chat import read_document
from genadapter.distributed import RayAbsorber
from genadapter.eval.fictional import NameMaker, entity_document


def write_corpus(folder: Path, tokenizer, tokens: int, files: int = 4) -> list[str]:
    rng = random.Random("ray-absorb")
    names = NameMaker(rng)
    paths = []
    for i in range(files):
        docs, n = [], 0
        while n < tokens // files:
            docs.append(entity_document(names, rng)[0])
            n += len(tokenizer.encode(docs[-1], add_special_tokens=False))
        path = folder / f"doc{i}.txt"
        path.write_text("\n\n".join(docs), encoding="utf-8")
        paths.append(str(path))
    return paths


def single_process(paths: list[str], threads: int) -> tuple[float, object, object]:
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = genadapter.load(device="cpu", quantize=None)
        session = model.session()
        start = time.perf_counter()
        for p in paths:
            session.absorb(read_document(p))
        return time.perf_counter() - start, session.state, session.memory
    finally:
        torch.set_num_threads(old)


def max_rel_error(got, want) -> float:
    return max(((got.sums[n] - s).norm() / s.norm()).item() for n, s in want.sums.items())


def memory_mismatches(got, want) -> int:
    """int8 keys and values that differ between two memories of the same chunks and documents
    (0: equal bit for bit; the actors encode the same batches as Session.absorb)."""
    assert [(c.document, c.tokens) for c in got.chunks] == [
        (c.document, c.tokens) for c in want.chunks
    ]
    return sum(
        int((a.keys != b.keys).sum() + (a.values != b.values).sum())
        for a, b in zip(got.chunks, want.chunks)
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=None, help="JSON results")
    args = p.parse_args()
    model = genadapter.load(device="cpu", quantize=None)
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_corpus(Path(tmp), model.tokenizer, args.tokens)
        del model
        want = want_memory = None
        for threads in (torch.get_num_threads(), 1):
            runs = [single_process(paths, threads) for _ in range(args.repeats)]
            want, want_memory = (want, want_memory) if want else runs[0][1:]
            best = min(r[0] for r in runs)
            rows[f"single process, {threads} threads"] = {"seconds": best}
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
        try:
            for workers in (1, 2):
                start = time.perf_counter()
                with RayAbsorber({"device": "cpu", "quantize": None}, workers=workers) as pool:
                    pool.pids()  # every actor has loaded the model
                    startup = time.perf_counter() - start
                    runs = []
                    for _ in range(args.repeats):
                        t0 = time.perf_counter()
                        result = pool.absorb_files(paths, task_chunks=2, progress=False)
                        runs.append(time.perf_counter() - t0)
                        err = max_rel_error(result.state, want)
                        assert err <= 1e-5, err
                        mismatches = memory_mismatches(result.memory, want_memory)
                rows[f"Ray, {workers} worker(s) x 1 CPU"] = {
                    "seconds": min(runs),
                    "startup_seconds": startup,
                    "max_rel_error": err,
                    "memory_mismatches": mismatches,
                }
        finally:
            ray.shutdown()
    base = rows[f"single process, {torch.get_num_threads()} threads"]["seconds"]
    for name, row in rows.items():
        row["tokens_per_s"] = want.tokens / row["seconds"]
        row["vs_single_process"] = base / row["seconds"]
        extra = f", start-up {row['startup_seconds']:.1f} s" if "startup_seconds" in row else ""
        print(
            f"{name:<32} {row['tokens_per_s']:7.0f} tok/s  {row['vs_single_process']:.2f}x"
            f"  ({want.tokens} tokens in {row['seconds']:.1f} s{extra})"
        )
    if args.out:
        Path(args.out).write_text(json.dumps({"tokens": want.tokens, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
