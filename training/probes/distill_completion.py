"""Completion rows for the LM-head adapter's distillation cache (the row format of
training/probes/distill_cache.py), from the `train` split of the installed Debian corpora
(training/DATA.md).

A row absorbs the first C tokens of a document (C drawn from 256-1,024, in the runtime's chunks of
512) and scores the next T tokens: the student is the base over those T tokens alone, the teacher
the base over the C + T tokens, and the KL between their next-token distributions at every one of
the T - 1 scored positions is the target (`answer_len` = T - 1, so train_head.py weighs them all).
It teaches the head what a long technical document's state looks like, and that there a lookup
should help the base, not drown it (session 5: perplexity 1,282 on the completion suite).

    python training/probes/distill_completion.py --count 150 --out training/cache/completion
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent  # training/probes: the probes, then the recipe
sys.path[:0] = [str(HERE), str(HERE.parent)]
from distill_cache import final_hidden, start, write_shards  # noqa: E402

from genadapter.eval import corpora  # noqa: E402


def train_documents(tokenizer, need: int, seed: int):
    """(doc_id, token ids) of train-split documents with at least `need` tokens, round robin
    over the installed corpora, in a fixed shuffled order."""
    queues = []
    for corpus in corpora.available():
        texts = dict(corpora.documents(corpus, "train"))
        order = sorted(texts)
        random.Random(f"distill-completion:{seed}:{corpus}").shuffle(order)
        queues.append(iter([(d, texts[d]) for d in order]))
    while queues:
        for queue in list(queues):
            for doc_id, text in queue:
                ids = tokenizer.encode(text, add_special_tokens=False)
                if len(ids) >= need:
                    yield doc_id, ids
                    break
            else:
                queues.remove(queue)


@torch.no_grad()
def build(model, ids: list[int], context: int, target: int, chunk: int) -> dict:
    doc_ids, tgt = ids[:context], ids[context : context + target]
    parts = [final_hidden(model, doc_ids[i : i + chunk])[0] for i in range(0, context, chunk)]
    half = lambda t: t.to(torch.float16).contiguous()  # noqa: E731
    return {
        "doc_ids": torch.tensor(doc_ids, dtype=torch.int32),
        "doc_final": half(torch.cat(parts)),
        "doc_layers": torch.empty(0, dtype=torch.float16),  # final-state keys only
        "targets": torch.tensor(tgt[1:], dtype=torch.int32),
        "answer_len": len(tgt) - 1,
        "x_student": half(final_hidden(model, tgt)[0][:-1]),
        "x_teacher": half(final_hidden(model, doc_ids + tgt)[0][context:-1]),
        "answer": "",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--count", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard", type=int, default=25, help="rows per shard file")
    p.add_argument("--target", type=int, default=128, help="tokens scored after the context")
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    model, tok, out, rng = start(args.out, args.seed)
    docs = train_documents(tok, 1024 + args.target, args.seed)

    def make_row(item) -> dict:
        (doc_id, ids), context = item
        row = build(model, ids, context, args.target, args.chunk)
        return {**row, "source": "completion", "doc_id": doc_id, "gold": []}

    def draw():  # the next document, then its context length (a resumed cache replays both)
        return next(docs), rng.randint(256, 1024)

    write_shards(out, args.count, args.shard, draw, make_row)


if __name__ == "__main__":
    main()
