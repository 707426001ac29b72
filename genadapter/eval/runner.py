"""The evaluation runner: every suite answers the same questions with the same model, chat
template and greedy decoding, under each method:

* base     no context;
* prompt   the context in the prompt, before the question (cut to the window, keeping the most
           recent text);
* adapter  the context absorbed into a session (one `absorb` per document), then the question;
* sft      (document QA only) a LoRA fine-tuned on the context for a few steps, then the question.

`run_suites` is the Python entry (also used by training for periodic evaluation); `genadapter eval`
(genadapter/cli.py) calls it."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..model import AdaptedModel
from ..session import Session
from . import metrics
from .closedbook import closedbook_examples
from .completion import suite_completion
from .data import Example
from .demonstrations import icl_examples
from .fictional import long_example, qa_examples
from .library_suite import suite_library
from .limits import LIMITS, Limits, resolve_limits  # noqa: F401 (re-exported)
from .persona import persona_examples
from .prompts import (
    QA_INSTRUCTION,
    chat_ids,  # noqa: F401 (re-exported)
    chat_message,
    fit_context,
    prompt_ids,
)
from .prompts import split_seed as _seed
from .sft import SFTBaseline
from .vocab import vocab_rows

log = logging.getLogger(__name__)

SUITES = ("completion", "qa", "longqa", "icl", "persona", "closedbook", "vocab", "library")
METHODS = ("base", "prompt", "adapter", "sft")


# -- answering -----------------------------------------------------------------------------------


@dataclass
class Scorer:
    """How a suite scores an answer: named metrics, the first one being the headline."""

    metrics: dict[str, Callable[[str, str], float]]
    instruction: str
    max_new_tokens: int
    chat: bool = True  # False: a raw language-model prompt, no chat template (demonstrations)


def _score(scorer: Scorer, prediction: str, answers: Sequence[str]) -> dict[str, float]:
    return {k: metrics.best_of(f, prediction, answers) for k, f in scorer.metrics.items()}


class _Tally:
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
    model: AdaptedModel, state, message: str, choices: Sequence[str], chat: bool = True
) -> str:
    """The choice the model finds likeliest (lowest mean NLL per token) as the continuation of
    `message` (the assistant's reply under the chat template, else the raw text's next words),
    all choices scored in one batch."""
    prompt = prompt_ids(model.tokenizer, message, chat)
    options = [
        model.tokenizer.encode(c if chat else " " + c, add_special_tokens=False) for c in choices
    ]
    width = len(prompt) + max(map(len, options))
    ids = torch.full((len(options), width), model.tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, option in enumerate(options):  # right padding: no real token attends to it
        ids[i, : len(prompt) + len(option)] = torch.tensor(prompt + option)
        mask[i, : len(prompt) + len(option)] = 1
    logits = model.logits(ids, [state] * len(options), attention_mask=mask)
    nll = [
        torch.nn.functional.cross_entropy(
            logits[i, len(prompt) - 1 : len(prompt) + len(o) - 1],
            torch.tensor(o, device=logits.device),
        ).item()
        for i, o in enumerate(options)
    ]
    return choices[min(range(len(nll)), key=nll.__getitem__)]


def _respond(model: AdaptedModel, state, message: str, question, scorer: Scorer):
    """Answer one question: rank its choices when it has some, else greedy decoding."""
    start = time.perf_counter()
    if question.choices:
        text = rank_choices(model, state, message, question.choices, scorer.chat)
    else:
        session = model.session() if state is None else Session(model, state)
        ask = session.chat if scorer.chat else session.generate
        text = ask(message, max_new_tokens=scorer.max_new_tokens)
    return text, time.perf_counter() - start


def run_questions(
    model: AdaptedModel,
    examples: Sequence[Example],
    scorer: Scorer,
    name: str,
    sft: SFTBaseline | None = None,
    progress: bool = True,
) -> dict:
    """Answer every question of every example under each method and score the answers."""
    methods = ["base", "prompt", "adapter"] + (["sft"] if sft else [])
    tally = _Tally(methods)
    absorb_seconds, sft_seconds = 0.0, 0.0
    budget = model.max_positions - scorer.max_new_tokens
    total = sum(len(e.questions) for e in examples) * len(methods)
    with tqdm(total=total, desc=name, unit="answer", disable=not progress) as bar:
        for example in examples:
            absorbed = model.session()
            start = time.perf_counter()
            for document in example.documents:
                absorbed.absorb(document)
            absorb_seconds += time.perf_counter() - start
            if sft is not None:
                sft_seconds += sft.fit(example.context)
            context_tokens = absorbed.state.tokens
            for q in example.questions:
                record = {"example": example.id, "question": q.text, "answers": q.answers, **q.info}
                plain = chat_message(q.text, None, scorer.instruction)
                context, kept = fit_context(
                    model.tokenizer,
                    example.context,
                    q.text,
                    scorer.instruction,
                    budget,
                    scorer.chat,
                )
                record["context_tokens"], record["prompt_context_tokens"] = context_tokens, kept
                runs = {
                    "base": (model, None, plain),
                    "prompt": (model, None, chat_message(q.text, context, scorer.instruction)),
                    "adapter": (model, absorbed.state, plain),
                }
                if sft is not None:
                    runs["sft"] = (sft.model, None, plain)
                for method, (m, state, message) in runs.items():
                    text, seconds = _respond(m, state, message, q, scorer)
                    scores = _score(scorer, text, q.answers)
                    tally.add(method, scores, seconds)
                    record[method] = {"answer": text, **scores}
                    bar.update()
                tally.records.append(record)
    extra = {"adapter": {"absorb_seconds": absorb_seconds}}
    if sft is not None:
        extra["sft"] = {"train_seconds": sft_seconds, "steps": sft.steps}
    return _row(name, scorer, tally.summary(extra), tally.records)


def _row(name: str, scorer: Scorer, methods: dict, records: list[dict]) -> dict:
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


# -- suites --------------------------------------------------------------------------------------

QA_SCORER = {"f1": metrics.token_f1, "contains": metrics.contains_match}


def suite_qa(model: AdaptedModel, limits: Limits, seed: int, split: str, progress: bool):
    examples = qa_examples(limits.qa_documents, limits.qa_questions, _seed(seed, split))
    scorer = Scorer(QA_SCORER, QA_INSTRUCTION, limits.max_new_tokens)
    sft = SFTBaseline(model, steps=limits.sft_steps, seed=seed) if limits.sft_steps else None
    return [run_questions(model, examples, scorer, "qa", sft=sft, progress=progress)]


def suite_longqa(model: AdaptedModel, limits: Limits, seed: int, split: str, progress: bool):
    scorer = Scorer(QA_SCORER, QA_INSTRUCTION, limits.max_new_tokens)
    count = lambda text: len(model.tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    rows = []
    for length in limits.longqa_lengths:
        example = long_example(length, limits.longqa_questions, _seed(seed, split), count)
        name = f"longqa {_kilo(length)}"
        rows.append(run_questions(model, [example], scorer, name, progress=progress))
        rows[-1]["context_tokens"] = length
    return rows


def suite_icl(model: AdaptedModel, limits: Limits, seed: int, split: str, progress: bool):
    examples = icl_examples(limits.icl_shots, limits.icl_queries, _seed(seed, split))
    # MetaICL's format: a raw prompt (demonstrations, then "Input: x\nOutput:") whose
    # continuation ranks the choices. Under the chat template this 135M chat model ignores the
    # demonstrations' format, and prompting scored below no context at all.
    scorer = Scorer({"accuracy": metrics.label_match}, "", limits.max_new_tokens, chat=False)
    return [run_questions(model, examples, scorer, "icl", progress=progress)]


def suite_persona(model: AdaptedModel, limits: Limits, seed: int, split: str, progress: bool):
    examples = persona_examples(limits.persona_users, limits.persona_questions, _seed(seed, split))
    scorer = Scorer(QA_SCORER, QA_INSTRUCTION, limits.max_new_tokens)
    return [run_questions(model, examples, scorer, "persona", progress=progress)]


def suite_closedbook(model: AdaptedModel, limits: Limits, seed: int, split: str, progress: bool):
    """General questions the base answers right, asked with an unrelated document absorbed (and,
    for prompting, in the prompt): absorbing must not make the model forget what it knew."""
    examples = closedbook_examples(limits.closedbook_questions, _seed(seed, split))
    scorer = Scorer(QA_SCORER, QA_INSTRUCTION, limits.max_new_tokens)
    return [run_questions(model, examples, scorer, "closedbook", progress=progress)]


def suite_vocab(model: AdaptedModel, limits: Limits, seed: int, split: str, progress: bool):
    """Rare technical terms from glossaries: term NLL and definitions under base, prompting, a
    session per glossary, and the glossaries merged every way (eval/vocab.py)."""
    return vocab_rows(
        model,
        limits.vocab_glossaries,
        limits.vocab_terms,
        limits.vocab_merges,
        limits.max_new_tokens,
        seed,
        split,
        progress,
    )


SUITE_FUNCTIONS = {
    "completion": suite_completion,
    "qa": suite_qa,
    "longqa": suite_longqa,
    "icl": suite_icl,
    "persona": suite_persona,
    "closedbook": suite_closedbook,
    "vocab": suite_vocab,
    "library": suite_library,  # eval/library_suite.py: routed, summed and oracle states
}


def _kilo(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens % 1024 == 0 else str(tokens)


def run_suites(
    model: AdaptedModel,
    suites: Sequence[str] = SUITES,
    limit: str | int | Limits = "small",
    seed: int = 0,
    split: str = "test",
    progress: bool = True,
) -> dict:
    """Run evaluation suites on an already loaded model; returns the results as a JSON-ready dict:
    {"config": ..., "suites": {suite: [row, ...]}}, each row with per-method metrics, seconds and
    the share of prompting's gain the adapter recovers. split="dev" for periodic evaluation
    during training (other documents and generated examples than the "test" split)."""
    unknown = [s for s in suites if s not in SUITE_FUNCTIONS]
    if unknown:
        raise ValueError(f"unknown suite(s) {unknown}; known: {', '.join(SUITES)}")
    if split not in ("dev", "test"):
        raise ValueError("split must be 'dev' or 'test'")
    limits = resolve_limits(limit)
    results = {
        "config": {
            "suites": list(suites),
            "limit": limit if isinstance(limit, (str, int)) else "custom",
            "limits": limits.__dict__
            | {
                "longqa_lengths": list(limits.longqa_lengths),
                "vocab_merges": list(limits.vocab_merges),
                "library_sizes": list(limits.library_sizes),
            },
            "seed": seed,
            "split": split,
            "base": model.base_name,
            "generator": model.generator_fingerprint,
            "chunk_tokens": model.chunk_tokens,
            "window": model.max_positions,
            "device": str(model.device),
        },
        "suites": {},
    }
    for suite in suites:
        start = time.perf_counter()
        results["suites"][suite] = SUITE_FUNCTIONS[suite](model, limits, seed, split, progress)
        log.info("suite %s took %.1f s", suite, time.perf_counter() - start)
        results["config"].setdefault("suite_seconds", {})[suite] = time.perf_counter() - start
    return results


def evaluate_generator(
    model: AdaptedModel,
    suites: Sequence[str] = ("completion", "qa"),
    limit: str | int | Limits = "tiny",
    seed: int = 0,
    split: str = "dev",
) -> dict[str, float]:
    """Every row's numbers, flat, for a training log: "<row>/<metric>/<method>" for each metric,
    and "<row>/recovered" for the row's headline metric."""
    flat = {}
    results = run_suites(model, suites, limit, seed, split, progress=False)
    for rows in results["suites"].values():
        for row in rows:
            for method, values in row["methods"].items():
                for metric in row["metrics"]:
                    flat[f"{row['name']}/{metric}/{method}"] = values[metric]
            flat[f"{row['name']}/recovered"] = row["recovered"].get(row["metric"])
    return flat
