"""The evaluation runner: every suite answers the same questions with the same model, chat
template and greedy decoding, under each method:

* base     no context;
* prompt   the context in the prompt, before the question (cut to the window, keeping the most
           recent text);
* adapter  the context absorbed into a session (one `absorb` per document), then the question,
           with the session's adapter state alone;
* memory   the same session's context memory alone (memory.py: the base's own keys and values,
           read as a prompt lays a document out, the turn's relevant documents only);
* memory+adapter  both parts of the session, as `Session.chat` uses them;
* sft      (document QA only) a LoRA fine-tuned on the context for a few steps, then the question.

`run_suites` is the Python entry (also used by training for periodic evaluation); `genadapter eval`
(genadapter/cli/measure.py) calls it."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from tqdm.auto import tqdm

from ..model import AdaptedModel
from ..session import Session
from . import answering, metrics
from .answering import Scorer, Tally, rank_choices, respond, score  # noqa: F401
from .closedbook import closedbook_examples
from .completion import suite_completion
from .data import Example
from .demonstrations import icl_examples
from .fictional import long_example, qa_examples
from .library_suite import suite_library
from .limits import LIMITS, SUITES, Limits, resolve_limits  # noqa: F401 (re-exported)
from .memory_suites import suite_beyond, suite_manydocs
from .persona import persona_examples
from .prompts import (
    QA_INSTRUCTION,
    chat_ids,  # noqa: F401 (re-exported)
    chat_message,
    fit_context,
)
from .prompts import split_seed as _seed
from .sft import SFTBaseline
from .vocab import vocab_rows

log = logging.getLogger(__name__)

METHODS = ("base", "prompt", "adapter", "memory", "memory+adapter", "sft")


# -- answering (eval/answering.py: scorers, tallies, rows) ---------------------------------------


def run_questions(
    model: AdaptedModel,
    examples: Sequence[Example],
    scorer: Scorer,
    name: str,
    sft: SFTBaseline | None = None,
    progress: bool = True,
    other_document: bool = True,
) -> dict:
    """Answer every question of every example under each method and score the answers. The
    session that absorbed an example's documents gives three methods: its adapter state alone
    (adapter), its context memory alone (memory), and both (memory+adapter). With
    `other_document` and more than one example, adapter and memory are also answered under the
    previous example's session ("adapter (other doc)", "memory (other doc)"): the control that
    tells the document's own content from what any document of its kind gives."""
    others = other_document and len(examples) > 1
    controls = [m + OTHER for m in OTHER_CONTROLS] if others else []
    methods = list(METHODS[:-1]) + controls + (["sft"] if sft else [])
    tally = Tally(methods)
    absorb_seconds, sft_seconds = 0.0, 0.0
    budget = model.max_positions - scorer.max_new_tokens

    def absorb(example: Example, timed: bool = True) -> Session:
        nonlocal absorb_seconds
        absorbed = model.session()
        start = time.perf_counter()
        for document in example.documents:
            absorbed.absorb(document)
        if timed:
            absorb_seconds += time.perf_counter() - start
        return absorbed

    # The control: each question also answered under the previous example's session (the
    # first example's under the last's). Is it the document, or documents of its kind? The
    # last example absorbed once more for it is not counted in the absorb time.
    previous = absorb(examples[-1], timed=False) if others else None
    total = sum(len(e.questions) for e in examples) * len(methods)
    with tqdm(total=total, desc=name, unit="answer", disable=not progress) as bar:
        for example in examples:
            absorbed = absorb(example)
            if sft is not None:
                sft_seconds += sft.fit(example.context)
            sessions = absorbed_methods(model, absorbed)
            if previous is not None:
                other = absorbed_methods(model, previous)
                sessions |= {m + OTHER: other[m] for m in OTHER_CONTROLS if m in other}
                previous = absorbed
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
                record["context_tokens"], record["prompt_context_tokens"] = absorbed.tokens, kept
                runs = {
                    "base": (model, None, plain),
                    "prompt": (model, None, chat_message(q.text, context, scorer.instruction)),
                    **{m: (model, s, plain) for m, s in sessions.items()},
                }
                if sft is not None:
                    runs["sft"] = (sft.model, None, plain)
                for method, (m, session, message) in runs.items():
                    text, seconds = respond(m, session, message, q, scorer)
                    scores = score(scorer, text, q.answers)
                    tally.add(method, scores, seconds)
                    record[method] = {"answer": text, **scores}
                    bar.update()
                tally.records.append(record)
    extra = {"adapter": {"absorb_seconds": absorb_seconds}}
    if sft is not None:
        extra["sft"] = {"train_seconds": sft_seconds, "steps": sft.steps}
    return answering.row(name, scorer, tally.summary(extra), tally.records)


OTHER = " (other doc)"  # an example's questions under another example's session
OTHER_CONTROLS = ("adapter", "memory")  # the methods that get that control


def absorbed_methods(model: AdaptedModel, absorbed: Session) -> dict[str, Session]:
    """The methods a session that absorbed the context gives: adapter (its state, no memory),
    memory (its memory, an empty state) and memory+adapter (both); memory methods only when
    the model keeps a memory."""
    out = {"adapter": Session(model, absorbed.state, memory=None)}
    if absorbed.memory is not None:
        out["memory"] = Session(model, memory=absorbed.memory)
        out["memory+adapter"] = Session(model, absorbed.state, memory=absorbed.memory)
    return out


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
    # Every document here is another one already: no other-document control.
    name = "closedbook"
    return [run_questions(model, examples, scorer, name, None, progress, other_document=False)]


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
    "manydocs": suite_manydocs,  # eval/memory_suites.py: eight documents in one memory
    "beyond": suite_beyond,  # eval/memory_suites.py: 3x the window, questions on its start
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
            "memory": {  # how turns read the context memory (docs/MEMORY.md, "Selection")
                "storage": model.memory_storage,
                "budget": model.memory_budget,
                "fraction": model.memory_fraction,
                "block": model.memory_block,
            },
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
