"""Can the generator learn to *read* a fact out of its state? A minimal probe.

Every example is one short synthetic document about a festival (training/synth_qa.py) and the
question "In which month does it take place?": ten possible answers, so an answer guessed from the
prior costs ln(10) = 2.30 nats, and a loss well below that can only come from the absorbed
document. Trains a copy of a generator for --steps on fresh examples and logs, on 32 fixed held-out
examples, the answer's loss with no context, with the document in the prompt, and absorbed.

    python training/read_probe.py --generator training/checkpoints/smollm2-135m-v0 --steps 200
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synth_qa import Example, _festival  # noqa: E402
from train import Sample, adapter_loss, answer_sample, target_loss  # noqa: E402

import genadapter  # noqa: E402


def month_example(rng: random.Random) -> Example:
    facts = _festival(rng)
    head, rest = facts[0][0], [s for s, _, _ in facts[1:]]
    rng.shuffle(rest)
    _, question, answer = facts[1]  # "In which month does ... take place?"
    return Example(" ".join([head, *rest]), question, answer)


def samples(model, ex: Example) -> dict[str, Sample]:
    tok = model.tokenizer
    return {
        "base": answer_sample(tok, "", ex.question, ex.answer),
        "prompt": answer_sample(tok, "", ex.document + "\n\n" + ex.question, ex.answer),
        "adapter": answer_sample(tok, ex.document, ex.question, ex.answer),
    }


@torch.no_grad()
def held_out_losses(model, examples) -> dict[str, float]:
    totals = {"base": 0.0, "prompt": 0.0, "adapter": 0.0}
    for ex in examples:
        s = samples(model, ex)
        totals["base"] += target_loss(model, [s["base"]], None).item()
        totals["prompt"] += target_loss(model, [s["prompt"]], None).item()
        totals["adapter"] += adapter_loss(model, [s["adapter"]]).item()
    return {k: round(v / len(examples), 4) for k, v in totals.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--generator", help="generator folder to start from (default: a fresh one)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--out", default="training/runs/read_probe.jsonl")
    args = p.parse_args()

    model = genadapter.load(generator=args.generator, device="cpu", dtype=torch.float32)
    held_out = [month_example(random.Random(1_000_000 + i)) for i in range(32)]
    rng = random.Random(0)
    params = list(model.generator.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    log = open(args.out, "w")
    start = time.perf_counter()
    for step in range(args.steps + 1):
        if step % args.eval_every == 0:
            model.generator.eval()
            row = {"step": step, "seconds": round(time.perf_counter() - start, 1)}
            row.update(held_out_losses(model, held_out))
            log.write(json.dumps(row) + "\n")
            log.flush()
            print(row, flush=True)
            model.generator.train()
        if step == args.steps:
            break
        model.generator.requires_grad_(True)
        batch = [samples(model, month_example(rng))["adapter"] for _ in range(args.batch)]
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = adapter_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()


if __name__ == "__main__":
    main()
