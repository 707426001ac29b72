"""Issue 23, item 3: what int4 keys and values would cost the context memory, against int8 and
float, on the dev split's qa documents (greedy answers, contains-match and token F1).

int4 is simulated on a float memory: every block's keys are rounded to 4-bit levels (-7..7)
with one scale per channel over the block's tokens and its values with one scale per token and
head (the int8 storage's split, memory.quantize_chunk), then read as floats. int8 is measured
the same way, so the three rows differ only in the rounding. Bytes per token are computed, not
measured: int4 packs two values in a byte, plus the same float16 scales as int8.

    .venv/bin/python benchmarks/memory_int4.py --out docs/eval/memory-int4-dev.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import genadapter
from genadapter.eval.answering import Scorer, respond, score
from genadapter.eval.fictional import qa_examples
from genadapter.eval.metrics import contains_match, token_f1
from genadapter.eval.prompts import QA_INSTRUCTION, chat_message, split_seed
from genadapter.session import Session


def rounded(x: torch.Tensor, dim: int, levels: int) -> torch.Tensor:
    """x rounded to `levels` signed levels per slice along `dim` (one absmax scale each)."""
    scale = (x.float().abs().amax(dim=dim, keepdim=True) / levels).clamp_min(1e-8).half().float()
    return ((x.float() / scale).round().clamp(-levels, levels) * scale).to(x.dtype)


def with_levels(memory, levels: int | None):
    """A copy of a float memory whose blocks are rounded to `levels` (None: unchanged)."""
    out = type(memory)(memory.prefix_len, memory.storage, documents=memory.documents)
    for c in memory.chunks:
        keys = c.keys if levels is None else rounded(c.keys, 2, levels)
        values = c.values if levels is None else rounded(c.values, 3, levels)
        out.chunks.append(
            type(c)(
                keys, values, None, None, c.lexical_ids, c.lexical_weights, c.document, c.offset
            )
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--documents", type=int, default=16)
    p.add_argument("--questions", type=int, default=3)
    p.add_argument("--out", default="memory-int4.json")
    args = p.parse_args()
    model = genadapter.load(device="cpu", memory="float")
    scorer = Scorer({"f1": token_f1, "contains": contains_match}, QA_INSTRUCTION, 24)
    conditions = {"float": None, "int8": 127, "int4": 7}
    totals = {c: {"f1": 0.0, "contains": 0.0} for c in conditions}
    records, n, start = [], 0, time.perf_counter()
    for e in qa_examples(args.documents, args.questions, split_seed(0, "dev")):
        absorbed = Session(model)
        absorbed.absorb(e.context)
        sessions = {
            c: Session(model, memory=with_levels(absorbed.memory, lv))
            for c, lv in conditions.items()
        }
        for q in e.questions:
            message = chat_message(q.text, None, QA_INSTRUCTION)
            record = {"question": q.text, "answers": q.answers}
            for c, session in sessions.items():
                text, _ = respond(model, session, message, q, scorer)
                s = score(scorer, text, q.answers)
                for k, v in s.items():
                    totals[c][k] += v
                record[c] = {"answer": text, **s}
            records.append(record)
            n += 1
            print(n, {c: round(t["contains"] / n, 3) for c, t in totals.items()}, flush=True)
    layers, heads, dim = model.memory_shape
    per_token = {"float32": 2 * layers * heads * dim * 4, "bfloat16": 2 * layers * heads * dim * 2}
    block = model.memory_block
    scales = layers * heads * (2 * dim / block + 2)  # float16 key scales per block, value per token
    per_token["int8"] = 2 * layers * heads * dim + scales
    per_token["int4"] = layers * heads * dim + scales
    result = {
        "questions": n,
        "split": "dev",
        "scores": {c: {k: v / n for k, v in t.items()} for c, t in totals.items()},
        "bytes_per_token": per_token,
        "int4_over_bf16": per_token["int4"] / per_token["bfloat16"],
        "seconds": time.perf_counter() - start,
        "records": records,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: result[k] for k in ("questions", "scores", "int4_over_bf16")}, indent=1))


if __name__ == "__main__":
    main()
