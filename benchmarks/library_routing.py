"""How well a library routes and searches (issue 14): held-out corpus documents (the completion
suite's test split), each absorbed as one library entry; for the first --queries of them, the
perplexity of their held-out continuation with no context, under the summed state of all N,
routed (k = 1, 2, 4) and under their own state alone (the oracle); and search accuracy@1/@5 of
the internal and behaviour embeddings with the continuation as the query (the lexical one:
benchmarks/library_search.py).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/library_routing.py \
        --generator training/checkpoints/smollm2-135m-v0 --sizes 8 32 --search-sizes 8 32 128

The library of the largest size is built once under --work (reused when it is there); smaller
libraries are its first N entries (copied folders). Recovered = (ppl none - ppl routed) /
(ppl none - ppl oracle)."""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import torch

import genadapter
from genadapter.eval.completion import completion_documents
from genadapter.layers import bound
from genadapter.library import search as library_search
from genadapter.library.folder import MANIFEST, Library
from genadapter.library.gates import train_gates
from genadapter.library.routing import Routes, standardize


def subset(lib: Library, names: list[str], path: Path) -> Library:
    """A library at `path` holding `lib`'s entries `names` (their folders copied)."""
    if path.exists():
        shutil.rmtree(path)
    for name in names:
        shutil.copytree(lib.path / "entries" / name, path / "entries" / name)
    manifest = dict(lib._manifest, entries={n: lib._manifest["entries"][n] for n in names})
    path.mkdir(parents=True, exist_ok=True)
    (path / MANIFEST).write_text(json.dumps(manifest))
    return Library.open(path, lib.model)


@torch.no_grad()
def nll(model, ids: list[int], state=None, routes=None) -> float:
    """Summed NLL of ids[1:] (the first token has nothing to be predicted from)."""
    x = torch.tensor([ids])
    with bound(model.binding, routes=routes):
        logits = model.logits(x, [state])[0]
    return torch.nn.functional.cross_entropy(logits[:-1], x[0, 1:], reduction="sum").item()


def trained_routes(model, sub: Library, names, texts, k: int, steps: int, cache: dict):
    """Routes whose gates are PHATGOOSE's trained sigmoid gates (gates.train_gates)."""
    for name, text in zip(names, texts):
        if name not in cache:
            start = time.perf_counter()
            cache[name] = train_gates(model, sub.load(name)[0].state, text, steps=steps)
            cache.setdefault("_seconds", []).append(time.perf_counter() - start)
    closed = sub.routes(k, "closed")
    return {
        n: Routes(standardize(torch.stack([cache[m][n] for m in names])), r.downs, k)
        for n, r in closed.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--generator", default="training/checkpoints/smollm2-135m-v0")
    ap.add_argument("--sizes", type=int, nargs="*", default=[8, 32])
    ap.add_argument("--search-sizes", type=int, nargs="*", default=[8, 32, 128])
    ap.add_argument("--queries", type=int, default=16, help="documents scored per size")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--target", type=int, default=128)
    ap.add_argument("--ks", type=int, nargs="*", default=[1, 2, 4])
    ap.add_argument("--gates", nargs="*", default=["closed", "centred"])
    ap.add_argument("--trained-steps", type=int, default=10)
    # "internal" as the library is set (library.INTERNAL_CENTRED), "-centred" / "-raw" forced.
    ap.add_argument("--kinds", nargs="*", default=["internal", "internal-centred", "behaviour"])
    ap.add_argument("--work", default="/tmp/library-routing")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = genadapter.load(generator=args.generator)
    biggest = max(args.sizes + args.search_sizes)
    docs = completion_documents(model.tokenizer, biggest, args.context, args.target, seed=0)
    names = [f"d{i:03d}" for i in range(len(docs))]
    work = Path(args.work)
    lib = Library.open(work / "all", model, create=True)
    start, added = time.perf_counter(), 0
    for name, doc in zip(names, docs):
        if name not in lib:
            lib.add(name, model.tokenizer.decode(doc.context_ids))
            added += 1
    if added:
        print(f"added {added} documents: {(time.perf_counter() - start) / added:.2f} s each")
    tok = model.tokenizer
    default_centred = library_search.INTERNAL_CENTRED
    results: dict = {"generator": args.generator, "context": args.context, "target": args.target}
    for n in sorted(set(args.sizes + args.search_sizes)):
        sub = subset(lib, names[:n], work / f"n{n}")
        row: dict = {"n": n}
        if n in args.search_sizes:
            for kind in args.kinds:
                hits1 = hits5 = 0
                start = time.perf_counter()
                library_search.INTERNAL_CENTRED = {
                    "internal-centred": True,
                    "internal-raw": False,
                }.get(kind, default_centred)
                sub._routes = {}
                for name, doc in zip(names[:n], docs):
                    query = tok.decode(doc.target_ids)
                    found = [f for f, _ in sub.search(query, 5, kind=kind.split("-")[0])]
                    hits1 += found[0] == name
                    hits5 += name in found
                row[f"search_{kind}"] = {
                    "at1": hits1 / n,
                    "at5": hits5 / n,
                    "seconds_per_query": (time.perf_counter() - start) / n,
                }
        if n in args.sizes:
            summed = model.new_state()
            states = {}
            for name in names[:n]:
                states[name] = sub.load(name)[0].state
                summed.add_(states[name])
            routed = {}
            trained: dict = {}
            for gates in args.gates:
                for k in args.ks:
                    if gates == "trained":
                        texts = [tok.decode(d.context_ids) for d in docs[:n]]
                        r = trained_routes(
                            model, sub, names[:n], texts, k, args.trained_steps, trained
                        )
                    else:
                        r = sub.routes(k, gates)
                    routed[f"routed_{gates}_k{k}"] = r
            if trained:
                row["trained_seconds_per_document"] = sum(trained["_seconds"]) / n
            totals: dict[str, float] = {}
            count = 0
            for name, doc in list(zip(names, docs))[: min(args.queries, n)]:
                ids = doc.target_ids
                count += len(ids) - 1
                parts = {
                    "none": nll(model, ids),
                    "oracle": nll(model, ids, states[name]),
                    "summed": nll(model, ids, summed),
                }
                for key, r in routed.items():
                    parts[key] = nll(model, ids, routes=r)
                for key, v in parts.items():
                    totals[key] = totals.get(key, 0.0) + v
            ppl = {key: math.exp(v / count) for key, v in totals.items()}
            gain = ppl["none"] - ppl["oracle"]
            row["perplexity"] = ppl
            row["recovered"] = {
                key: (ppl["none"] - v) / gain for key, v in ppl.items() if key != "none"
            }
            row["queries"] = min(args.queries, n)
        results[f"n{n}"] = row
        print(json.dumps(row, indent=1), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
