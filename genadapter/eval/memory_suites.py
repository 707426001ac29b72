"""The context memory's own suites (docs/MEMORY.md):

* manydocs  documents of the qa suite absorbed eight to a session, each by its own `absorb`:
            the memory with all eight (memory 8) against a session of the question's document
            alone (memory), and prompting with the eight (prompt 8) against the one (prompt).
* beyond    one stream of generated documents three times the window long (the model's, or
            the limit's beyond_window), absorbed one document per call; questions about
            documents in its first third, which prompting (keeping the most recent text that
            fits) cannot see. memory 1 is the one-document reference: a session of the
            question's document alone."""

from __future__ import annotations

import time

from tqdm.auto import tqdm

from ..session import Session
from .answering import Scorer, Tally, respond, row, score
from .fictional import long_example, qa_examples
from .limits import Limits
from .prompts import QA_INSTRUCTION, chat_message, fit_context
from .prompts import split_seed as _seed

GROUP = 8  # documents per session in manydocs


def _scorer(limits: Limits) -> Scorer:
    from . import metrics

    return Scorer(
        {"f1": metrics.token_f1, "contains": metrics.contains_match},
        QA_INSTRUCTION,
        limits.max_new_tokens,
    )


def _alone(model, document: str) -> Session:
    session = Session(model)
    session.absorb(document)
    return Session(model, memory=session.memory)  # the memory alone, as the memory method


def _ask(model, tally: Tally, record: dict, method: str, session, message: str, q, scorer):
    text, seconds = respond(model, session, message, q, scorer)
    scores = score(scorer, text, q.answers)
    tally.add(method, scores, seconds)
    record[method] = {"answer": text, **scores}


def suite_manydocs(model, limits: Limits, seed: int, split: str, progress: bool) -> list[dict]:
    scorer = _scorer(limits)
    group = min(GROUP, max(2, limits.qa_documents))
    count = max(group, limits.qa_documents // group * group)
    examples = qa_examples(count, limits.qa_questions, _seed(seed, split))
    methods = ["prompt", "prompt 8", "memory", "memory 8"]
    tally, budget = Tally(methods), model.max_positions - scorer.max_new_tokens
    absorb_seconds = 0.0
    total = sum(len(e.questions) for e in examples) * len(methods)
    with tqdm(total=total, desc="manydocs", unit="answer", disable=not progress) as bar:
        for at in range(0, len(examples), group):
            members = examples[at : at + group]
            start = time.perf_counter()
            many = Session(model)
            for e in members:
                many.absorb(e.context)
            absorb_seconds += time.perf_counter() - start
            many = Session(model, memory=many.memory)
            joined = "\n\n".join(e.context for e in members)
            for e in members:
                alone = _alone(model, e.context)
                for q in e.questions:
                    record = {"example": e.id, "question": q.text, "answers": q.answers}
                    plain = chat_message(q.text, None, scorer.instruction)
                    runs = {"memory": (alone, plain), "memory 8": (many, plain)}
                    for method, context in (("prompt", e.context), ("prompt 8", joined)):
                        text, _ = fit_context(
                            model.tokenizer, context, q.text, scorer.instruction, budget
                        )
                        runs[method] = (None, chat_message(q.text, text, scorer.instruction))
                    for method in methods:
                        session, message = runs[method]
                        _ask(model, tally, record, method, session, message, q, scorer)
                        bar.update()
                    tally.records.append(record)
    out = row(
        "manydocs",
        scorer,
        tally.summary({"memory 8": {"absorb_seconds": absorb_seconds}}),
        tally.records,
    )
    out["group"] = group
    return [out]


def suite_beyond(model, limits: Limits, seed: int, split: str, progress: bool) -> list[dict]:
    scorer = _scorer(limits)
    window = limits.beyond_window or model.max_positions
    length = 3 * window
    count = lambda text: len(model.tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    wanted = limits.beyond_questions
    # Questions are drawn at random places; keep those whose document is in the first third.
    example = long_example(length, 6 * wanted, _seed(seed, split), count)
    early = [q for q in example.questions if q.info["tokens_after"] >= 2 * length // 3][:wanted]
    methods = ["base", "prompt", "memory", "memory 1"]
    tally, budget = Tally(methods), window - scorer.max_new_tokens
    start = time.perf_counter()
    absorbed = Session(model)
    for document in tqdm(example.documents, desc="beyond: absorbing", disable=not progress):
        absorbed.absorb(document)
    absorb_seconds = time.perf_counter() - start
    memory = Session(model, memory=absorbed.memory)
    for q in tqdm(early, desc="beyond", unit="question", disable=not progress):
        record = {"question": q.text, "answers": q.answers, **q.info}
        plain = chat_message(q.text, None, scorer.instruction)
        context, kept = fit_context(
            model.tokenizer, example.context, q.text, scorer.instruction, budget
        )
        record["prompt_context_tokens"] = kept
        runs = {
            "base": (None, plain),
            "prompt": (None, chat_message(q.text, context, scorer.instruction)),
            "memory": (memory, plain),
            "memory 1": (_alone(model, example.documents[q.info["document"]]), plain),
        }
        for method in methods:
            session, message = runs[method]
            _ask(model, tally, record, method, session, message, q, scorer)
        tally.records.append(record)
    out = row(
        "beyond",
        scorer,
        tally.summary({"memory": {"absorb_seconds": absorb_seconds}}),
        tally.records,
    )
    out["context_tokens"], out["window"] = absorbed.tokens, window
    return [out]
