"""Greedy answers of a generator on the evaluation's QA and persona questions of the *dev* split
(never the test split), adapter only: a quick transfer check between training runs.

    python training/probes/qa_check.py --generator training/runs/head --documents 6
"""

from __future__ import annotations

import argparse
import json

import torch

import genadapter
from genadapter.eval import metrics
from genadapter.eval.closedbook import closedbook_examples
from genadapter.eval.fictional import qa_examples
from genadapter.eval.persona import persona_examples
from genadapter.eval.runner import QA_INSTRUCTION, _seed, chat_message

SUITES = {
    "qa": lambda n, seed: qa_examples(n, 3, seed),
    "persona": lambda n, seed: persona_examples(n, 4, seed),
    "closedbook": lambda n, seed: closedbook_examples(n, seed),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--generator")
    p.add_argument("--documents", type=int, default=6)
    p.add_argument("--suite", choices=sorted(SUITES), default="qa")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--head-scale", type=float, default=1.0, help="multiply the head's alpha")
    p.add_argument("--out")
    args = p.parse_args()
    model = genadapter.load(generator=args.generator, device="cpu", dtype=torch.float32)
    if model.generator.head is not None:
        model.generator.head.alpha *= args.head_scale
    examples = SUITES[args.suite](args.documents, _seed(0, "dev"))
    right, total, records = 0, 0, []
    for ex in examples:
        session = model.session()
        for doc in ex.documents:
            session.absorb(doc)
        for q in ex.questions:
            message = chat_message(q.text, None, QA_INSTRUCTION)
            # A fresh conversation per question over the same absorbed state.
            answer = genadapter.Session(model, session.state).chat(
                message, max_new_tokens=args.max_new_tokens
            )
            ok = metrics.best_of(metrics.contains_match, answer, q.answers)
            right, total = right + ok, total + 1
            records.append({"q": q.text, "gold": q.answers, "answer": answer, "ok": ok})
            print(int(ok), q.text, "->", answer.replace("\n", " ")[:100], "| gold", q.answers[0])
    print(f"{args.suite} dev contains-match: {right}/{total}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"right": right, "total": total, "records": records}, f, indent=1)


if __name__ == "__main__":
    main()
