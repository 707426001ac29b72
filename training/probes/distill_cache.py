"""Cache what context distillation needs, once per example, so training never runs the base again.

For every example (a document and a user message about it) this runs the frozen base three times,
all without gradients:

* the **teacher**: the document in the prompt (`chat_message(question, document)`), greedy-decoding
  its own answer (the target text), then its final normalized hidden state at every position of
  the shared suffix (question tail, chat template, answer);
* the **student's inputs**: the same suffix with no document, the hidden states the adapted model
  sees at those positions (the delta on the LM head changes nothing upstream of it);
* the **document pass**: the document alone in chunks, as `Session.absorb` encodes it, with the
  hidden states that keys may come from.

The teacher's next-token distribution is `lm_head(teacher hidden)`, so storing 576 numbers per
position stands for the 49,152 logits. Shards are `torch.save` files of lists of dicts (float16).

    python training/probes/distill_cache.py --source synth --count 2000 --out training/cache/synth
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent  # training/probes: the probes, then the recipe
sys.path[:0] = [str(HERE), str(HERE.parent)]
import distill_sources  # noqa: E402
from passes import common_suffix  # noqa: E402

from genadapter.base import load_base  # noqa: E402
from genadapter.eval.runner import chat_ids, chat_message  # noqa: E402

KEY_LAYERS = (12, 18, 24)  # residual-stream inputs of these decoder layers are kept as well


@torch.no_grad()
def greedy(model, ids: list[int], max_new_tokens: int, stop: int) -> list[int]:
    out = model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=stop,
        pad_token_id=stop,
    )[0, len(ids) :].tolist()
    if stop not in out:
        out.append(stop)
    return out[: out.index(stop) + 1]


@torch.no_grad()
def final_hidden(model, ids: list[int], layers: tuple[int, ...] = ()) -> list[torch.Tensor]:
    out = model.model(input_ids=torch.tensor([ids]), output_hidden_states=bool(layers))
    extra = [out.hidden_states[i][0] for i in layers]
    return [out.last_hidden_state[0], *extra]


def build(model, tokenizer, document: str, message: str, chunk: int, max_new: int) -> dict:
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    student = chat_ids(tokenizer, message)
    teacher = chat_ids(tokenizer, chat_message(message, document))
    answer = greedy(model, teacher, max_new, stop)
    s_ids, t_ids = student + answer, teacher + answer
    n = min(common_suffix(s_ids, t_ids), len(s_ids) - 1)
    xs = final_hidden(model, s_ids)[0][-n - 1 : -1]
    xt = final_hidden(model, t_ids)[0][-n - 1 : -1]
    doc_ids = tokenizer.encode(document, add_special_tokens=False)
    parts: list[list[torch.Tensor]] = []
    for i in range(0, len(doc_ids), chunk):
        parts.append(final_hidden(model, doc_ids[i : i + chunk], KEY_LAYERS))
    doc = [torch.cat([p[j] for p in parts]) for j in range(1 + len(KEY_LAYERS))]
    half = lambda t: t.to(torch.float16).contiguous()  # noqa: E731
    return {
        "doc_ids": torch.tensor(doc_ids, dtype=torch.int32),
        "doc_final": half(doc[0]),
        "doc_layers": torch.stack([half(t) for t in doc[1:]]),
        "targets": torch.tensor(s_ids[-n:], dtype=torch.int32),
        "answer_len": len(answer),
        "x_student": half(xs),
        "x_teacher": half(xt),
        "answer": tokenizer.decode(answer[:-1]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--source", choices=sorted(distill_sources.SOURCES), required=True)
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard", type=int, default=200, help="examples per shard file")
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    model, tok, out, rng = start(args.out, args.seed)
    source = distill_sources.SOURCES[args.source]

    def make_row(item) -> dict:
        row = build(model, tok, item.document, item.message, args.chunk, args.max_new_tokens)
        return {**row, "source": args.source, "gold": item.answers}

    write_shards(out, args.count, args.shard, lambda: source(rng), make_row)


def start(out: str, seed: int) -> tuple[object, object, Path, random.Random]:
    """What every cache script starts with: the frozen base (bfloat16, CPU, eval mode), its
    tokenizer, the output folder (created) and the random source seeded with `seed`."""
    base = load_base(None, device="cpu", dtype=torch.bfloat16)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    return base.model.eval(), base.tokenizer, folder, random.Random(seed)


def write_shards(out: Path, count: int, size: int, draw, make_row) -> None:
    """Write `count` rows to out/shard-NNNN.pt, `size` per shard, each shard atomically (a
    temporary file renamed). Resumable: the draws of the shards already there are replayed
    (`draw()` advances the random sources) without building their rows.

    draw: () -> item; make_row: item -> dict (the expensive part: the model's passes)."""
    shard = len(list(out.glob("shard-*.pt")))
    done, rows, start = shard * size, [], time.perf_counter()
    for _ in range(done):
        draw()
    while done < count:
        rows.append(make_row(draw()))
        done += 1
        if len(rows) == size or done == count:
            tmp = out / f".shard-{shard:04d}.tmp"
            torch.save(rows, tmp)
            tmp.rename(out / f"shard-{shard:04d}.pt")
            print(f"{done} rows, {done / (time.perf_counter() - start) * 60:.0f}/min", flush=True)
            rows, shard = [], shard + 1


if __name__ == "__main__":
    main()
