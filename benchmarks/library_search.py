"""Search accuracy of every embedding kind on the `library` suite's own documents and queries,
without the suite's perplexity conditions (which take 20 minutes at N = 128).

The documents are the suite's (eval/library_suite.library_documents: test-split corpus documents
cut to 512 absorbed tokens, every fourth a generated QA document), the queries too (a corpus
document's next sentence(s), a QA document's question), scored by the suite's `retrieval`. The
largest library is built once in --keep (reused when it is there); the smaller sizes are copies
of it with the later entries removed, so every size holds the suite's first N documents.

    OMP_NUM_THREADS=2 python benchmarks/library_search.py \\
        --generator training/checkpoints/smollm2-135m-v0 --out docs/eval/library-search-v0.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

import genadapter
from genadapter.eval.library_suite import library_documents, retrieval
from genadapter.library.folder import Library


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--generator", default=None)
    p.add_argument("--split", default="test", choices=["dev", "test"])
    p.add_argument("--sizes", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--keep", type=Path, default=None, help="folder for the largest library")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    model = genadapter.load(generator=args.generator, device="cpu", dtype=torch.float32)
    n = max(args.sizes)
    docs = library_documents(model.tokenizer, n, 512, 128, 0, args.split)
    with tempfile.TemporaryDirectory() as tmp:
        full = args.keep or Path(tmp) / f"n{n}"
        library = Library.open(full, model, create=True)
        start = time.perf_counter()
        for d in docs:
            if d.name not in library:
                library.add(d.name, d.absorbed)
        print(f"{n} documents in the library ({time.perf_counter() - start:.0f} s to add)")
        results = {}
        for size in sorted(args.sizes):
            folder = Path(tmp) / f"copy{size}"
            shutil.copytree(full, folder)
            sub = Library.open(folder, model)
            for d in docs[size:]:
                sub.remove(d.name)
            results[size] = retrieval(sub, docs[:size])
            for kind, r in results[size].items():
                by = {s: round(x["acc@1"], 2) for s, x in r["by_source"].items()}
                print(f"N={size:4d} {kind:9s} @1 {r['acc@1']:.3f}  @5 {r['acc@5']:.3f}  {by}")
    if args.out:
        config = {
            "generator": args.generator,
            "split": args.split,
            "fingerprint": model.generator_fingerprint,
        }
        args.out.write_text(json.dumps({"config": config, "sizes": results}, indent=1))


if __name__ == "__main__":
    main()
