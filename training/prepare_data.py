"""Tokenize the allowed corpora (training/DATA.md) into flat token shards with document boundaries.

    python training/prepare_data.py [--out training/data] [--corpora python-docs,foldoc,...]

Writes, per split (train, dev): {split}.tokens.npy (uint16 token ids of all documents back to
back), {split}.offsets.npy (int64 start of each document, plus the end), {split}.ids.json (the
document ids, in order). The test split (genadapter.eval.corpora.split_of == "test") is never
written: it belongs to evaluation.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
from tqdm import tqdm

from genadapter.base import _converted_default_dir, default_gguf_path
from genadapter.eval import corpora

log = logging.getLogger("prepare_data")


def tokenizer_of(base: str | None):
    from transformers import AutoTokenizer

    folder = base or _converted_default_dir(default_gguf_path())
    return AutoTokenizer.from_pretrained(folder)


def write_split(out: Path, split: str, docs: list[tuple[str, list[int]]]) -> dict:
    """Write one split's shards from (doc_id, token ids) pairs."""
    out.mkdir(parents=True, exist_ok=True)
    lengths = [len(t) for _, t in docs]
    tokens = np.concatenate([np.asarray(t, dtype=np.uint16) for _, t in docs])
    np.save(out / f"{split}.tokens.npy", tokens)
    np.save(
        out / f"{split}.offsets.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    )
    (out / f"{split}.ids.json").write_text(json.dumps([d for d, _ in docs]))
    return {"documents": len(docs), "tokens": int(sum(lengths))}


def prepare(out: Path, names: list[str], base: str | None = None, min_tokens: int = 64) -> dict:
    tok = tokenizer_of(base)
    if len(tok) > np.iinfo(np.uint16).max:
        raise ValueError("vocabulary too large for uint16 shards")
    summary = {}
    for split in ("train", "dev"):
        docs = []
        for name in names:
            for doc_id, text in tqdm(
                list(corpora.documents(name, split=split)), desc=f"{split}:{name}", unit="doc"
            ):
                t = tok.encode(text, add_special_tokens=False)
                if len(t) >= min_tokens:
                    docs.append((doc_id, t))
        summary[split] = write_split(out, split, docs)
        log.info("%s: %d documents, %d tokens", split, len(docs), summary[split]["tokens"])
    (out / "summary.json").write_text(json.dumps({"corpora": names, **summary}, indent=2))
    return summary


def main():
    logging.basicConfig(level=logging.INFO)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="training/data")
    p.add_argument("--corpora", default=",".join(corpora.CORPORA))
    p.add_argument("--base", help="base model folder whose tokenizer to use (default model)")
    args = p.parse_args()
    print(json.dumps(prepare(Path(args.out), args.corpora.split(","), args.base), indent=2))


if __name__ == "__main__":
    main()
