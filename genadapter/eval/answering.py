"""Answering one question under one method: a Scorer says how, `respond` answers through a
session (its adapter state and context memory, either possibly empty), `Tally` sums the scores
and `row` makes the result row every suite returns."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from ..generation import prefill
from ..memory_read import Layout
from ..session import Session
from . import metrics
from .prompts import prompt_ids


@dataclass
class Scorer:
    """How a suite scores an answer: named metrics, the first one being the headline."""

    metrics: dict[str, Callable[[str, str], float]]
    instruction: str
    max_new_tokens: int
    chat: bool = True  # False: a raw language-model prompt, no chat template (demonstrations)


def score(scorer: Scorer, prediction: str, answers: Sequence[str]) -> dict[str, float]:
    return {k: metrics.best_of(f, prediction, answers) for k, f in scorer.metrics.items()}


class Tally:
    """Per method: summed scores, seconds and counts; per question: the record."""

    def __init__(self, methods: Sequence[str]):
        self.methods = {m: {"scores": {}, "seconds": 0.0, "n": 0} for m in methods}
        self.records: list[dict] = []

    def add(self, method: str, scores: dict[str, float], seconds: float) -> None:
        m = self.methods[method]
        for k, v in scores.items():
            m["scores"][k] = m["scores"].get(k, 0.0) + v
        m["seconds"] += seconds
        m["n"] += 1

    def summary(self, extra: dict[str, dict] | None = None) -> dict[str, dict]:
        out = {}
        for name, m in self.methods.items():
            if m["n"]:
                out[name] = {k: v / m["n"] for k, v in m["scores"].items()}
                out[name]["seconds"] = m["seconds"]
                out[name].update((extra or {}).get(name, {}))
        return out


@torch.no_grad()
def rank_choices(
    model, session: Session | None, message: str, choices: Sequence[str], chat: bool = True
) -> str:
    """The choice the model finds likeliest (lowest mean NLL per token) as the continuation of
    `message` (the assistant's reply under the chat template, else the raw text's next words)
    under `session` (None: the base), all choices scored in one batch."""
    session = session or Session(model, memory=None)
    options = [
        model.tokenizer.encode(c if chat else " " + c, add_special_tokens=False) for c in choices
    ]
    if chat:
        layout = session.chat_layout([{"role": "user", "content": message}], max(map(len, options)))
    else:
        ids = prompt_ids(model.tokenizer, message, chat)
        layout = session.text_layout(ids, message, max(map(len, options)))
    if layout.read is None:
        layout = Layout([], None, layout.header + layout.rest)
    rows = [Layout(layout.header, layout.read, layout.rest + o) for o in options]
    with model.bind_states([session.state] * len(rows)):
        _, logits = prefill(model, rows, DynamicCache(), logits_to_keep=max(map(len, options)) + 1)
    nll = [  # left padding: each row's option ends every row
        torch.nn.functional.cross_entropy(
            logits[i, -len(o) - 1 : -1].float(), torch.tensor(o, device=logits.device)
        ).item()
        for i, o in enumerate(options)
    ]
    return choices[min(range(len(nll)), key=nll.__getitem__)]


def respond(model, session: Session | None, message: str, question, scorer: Scorer):
    """Answer one question under `session` (None: the base): rank its choices when it has
    some, else greedy decoding. Returns (text, seconds)."""
    start = time.perf_counter()
    if question.choices:
        text = rank_choices(model, session, message, question.choices, scorer.chat)
    else:
        session = session or Session(model, memory=None)
        session.messages = []
        ask = session.chat if scorer.chat else session.generate
        text = ask(message, max_new_tokens=scorer.max_new_tokens)
        session.messages = []
    return text, time.perf_counter() - start


def row(name: str, scorer: Scorer, methods: dict, records: list[dict]) -> dict:
    headline = next(iter(scorer.metrics))
    return {
        "name": name,
        "metric": headline,
        "metrics": list(scorer.metrics),
        "higher_is_better": True,
        "n": len(records),
        "methods": methods,
        "recovered": metrics.recovered(methods, scorer.metrics),
        "records": records,
    }
