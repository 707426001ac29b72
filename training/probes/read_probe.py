"""Can the generator learn to *read* a fact out of its state? A minimal probe.

--task month: every example is one short synthetic document about a festival
(training/synth_qa.py) and the question "In which month does it take place?": ten possible
answers, so an answer guessed from the prior costs ln(10) = 2.30 nats, and a loss well below that
can only come from the absorbed document.
--task any: one synthetic entity document and a question about any of its facts; most answers are
invented names, numbers or WordNet nouns, so the answer has to be copied from the document.
--task word: the same, only questions answered by one lower-case word (mostly a WordNet noun of
the kind asked for: an animal, a dish, a material...).
--held-out-task eval scores the held-out answers on the evaluation's own QA generator instead
(other templates and names; never trained on): whether what was learned transfers.

Trains a copy of a generator (or a fresh one with --pairing) for --steps on fresh examples and
logs, on fixed held-out examples (--held-out, 32), the answer's loss with no context, with the
document in the prompt, absorbed, and with another example's document absorbed (the gap to
"absorbed" is what is read from the state rather than guessed from the question).

    python training/probes/read_probe.py --steps 200 \
        --generator training/checkpoints/smollm2-135m-v0
    python training/probes/read_probe.py --task any --pairing next --steps 300
    python training/probes/read_probe.py --generator DIR --steps 0 --held-out 24 \
        --held-out-task eval
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent  # training/probes: the probes, then the recipe
sys.path[:0] = [str(HERE), str(HERE.parent)]
from passes import Sample, adapter_loss, target_loss  # noqa: E402
from synth_qa import Example, _festival, make_example  # noqa: E402
from train import answer_sample  # noqa: E402

import genadapter  # noqa: E402
from genadapter.base import load_base  # noqa: E402
from genadapter.eval.fictional import qa_examples  # noqa: E402
from genadapter.eval.runner import QA_INSTRUCTION  # noqa: E402
from genadapter.generator import PAIRINGS, Generator, GeneratorConfig  # noqa: E402
from genadapter.model import AdaptedModel  # noqa: E402


def month_example(rng: random.Random) -> Example:
    facts = _festival(rng)
    head, rest = facts[0][0], [s for s, _, _ in facts[1:]]
    rng.shuffle(rest)
    _, question, answer = facts[1]  # "In which month does ... take place?"
    return Example(" ".join([head, *rest]), question, answer)


def any_example(rng: random.Random) -> Example:
    return make_example(rng, distractors=0)


def word_example(rng: random.Random) -> Example:
    """A question whose answer is one lower-case word (an animal, a dish, a material...)."""
    while True:
        ex = any_example(rng)
        if ex.answer.isalpha() and ex.answer.islower():
            return ex


def eval_example(rng: random.Random) -> Example:
    """A question from the evaluation's own QA generator (other templates and names than
    synth_qa's), for held-out scoring only, never training: does what was learned on synth_qa
    transfer? Seed 0, the one `genadapter eval` uses, is never drawn."""
    example = qa_examples(1, 1, seed=rng.randrange(1, 2**31))[0]
    question = example.questions[0]
    return Example(example.context, f"{question.text} {QA_INSTRUCTION}", question.answers[0])


TASKS = {"month": month_example, "any": any_example, "word": word_example}
HELD_OUT_TASKS = {**TASKS, "eval": eval_example}


def samples(model, ex: Example) -> dict[str, Sample]:
    tok = model.tokenizer
    return {
        "base": answer_sample(tok, "", ex.question, ex.answer),
        "prompt": answer_sample(tok, "", ex.document + "\n\n" + ex.question, ex.answer),
        "adapter": answer_sample(tok, ex.document, ex.question, ex.answer),
    }


@torch.no_grad()
def held_out_losses(model, examples) -> dict[str, float]:
    """Mean answer loss with no context, prompted, absorbed, and with *another* example's
    document absorbed: the gap between the last two is what the state reads, not the prior."""
    tok = model.tokenizer
    totals = {"base": 0.0, "prompt": 0.0, "adapter": 0.0, "adapter_other": 0.0}
    for i, ex in enumerate(examples):
        s = samples(model, ex)
        other = examples[(i + 1) % len(examples)].document
        totals["base"] += target_loss(model, [s["base"]], None).item()
        totals["prompt"] += target_loss(model, [s["prompt"]], None).item()
        totals["adapter"] += adapter_loss(model, [s["adapter"]]).item()
        mismatched = answer_sample(tok, other, ex.question, ex.answer)
        totals["adapter_other"] += adapter_loss(model, [mismatched]).item()
    return {k: round(v / len(examples), 4) for k, v in totals.items()}


def provenance(args, step: int, tokens: int, last_eval: dict) -> dict:
    """What a saved generator's config.json records of this stage (training/package.py keeps it)."""
    return {
        "stage": f"read_probe --task {args.task}",
        "args": vars(args),
        "steps": step,
        "tokens": tokens,
        "wall_seconds": last_eval["seconds"],
        "device": "cpu",
        "data": "training/synth_qa.py: generated entity documents and questions (DATA.md)",
        "last_eval": last_eval,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--generator", help="generator folder to start from (default: a fresh one)")
    p.add_argument("--task", choices=sorted(TASKS), default="month")
    p.add_argument("--pairing", choices=PAIRINGS, default="same", help="of a fresh generator")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--held-out", type=int, default=32, help="examples scored at each evaluation")
    p.add_argument(
        "--held-out-task",
        choices=sorted(HELD_OUT_TASKS),
        help="what the held-out examples ask (default: --task); eval: the evaluation's QA",
    )
    p.add_argument("--seed", type=int, default=0, help="of the training examples")
    p.add_argument("--out", default="training/runs/read_probe.jsonl")
    p.add_argument("--save", metavar="DIR", help="write the generator here at every evaluation")
    args = p.parse_args(argv)

    if args.generator:
        model = genadapter.load(generator=args.generator, device="cpu", dtype=torch.float32)
    else:
        base = load_base(None, device="cpu", dtype=torch.float32)
        fresh = Generator.for_base(base.model, GeneratorConfig(pairing=args.pairing))
        model = AdaptedModel(base, fresh)
    example = TASKS[args.task]
    held_out_example = HELD_OUT_TASKS[args.held_out_task or args.task]
    held_out = [held_out_example(random.Random(1_000_000 + i)) for i in range(args.held_out)]
    rng = random.Random(args.seed)
    model.generator.requires_grad_(True)  # load() hands out a frozen generator
    params = list(model.generator.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    log = open(args.out, "w")
    start, tokens = time.perf_counter(), 0
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            model.generator.eval()
            row = {"step": step, "seconds": round(time.perf_counter() - start, 1)}
            row.update(held_out_losses(model, held_out))
            log.write(json.dumps(row) + "\n")
            log.flush()
            print(row, flush=True)
            if args.save:  # at every evaluation, so a long run can be stopped and still used
                model.generator.config.extra = provenance(args, step, tokens, row)
                model.generator.save_pretrained(args.save, model.base_fingerprint)
            model.generator.train()
        if step == args.steps:
            break
        batch = [samples(model, example(rng))["adapter"] for _ in range(args.batch)]
        tokens += sum(len(x.context) + len(x.target) for x in batch)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = adapter_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    log.close()


if __name__ == "__main__":
    main()
