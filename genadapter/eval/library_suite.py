"""The `library` suite (issue 14): many held-out documents absorbed into one adapter library
(genadapter.library), and a continuation of, or a question about, one of them under

* base        no context;
* prompt      that document in the prompt (as the completion and qa suites do);
* adapter     that document's own state alone: the oracle, which knows which document is meant;
* sum         the summed state of all N documents (AdapterState.add_: as if one session had
              absorbed them all);
* routed k=K  the library's routed session (Library.session(K, memory=False): the states
              alone, no entry's memory): each token, at each adapted layer, mixes its top-K
              documents by the closed-form gates (PHATGOOSE, Muqeeth et al., arXiv 2402.05859;
              library/routing.py).
* memory      that document's own entry's context memory alone (the memory's oracle);
* memory+adapter  that entry's state and memory (the session the entry stores);
* library     (QA only) the library's chat as the server runs it: routed k=2 states, and the
              memories of the entries the library's lexical search finds for the question
              (Library.session(2), library/memory.py). A continuation has no question to
              search with, so its row has no library column.

Documents: corpus documents as the completion suite picks them (the split's documents of the
installed corpora, round robin, in an order fixed by the seed), cut to `library_context` tokens
absorbed + `library_target` tokens of continuation scored; every fourth document (the 2nd, 6th,
...) is a generated QA document (eval/fictional.py, with the split's seed) absorbed whole and asked
one question (contains-match and token F1 of a greedy answer). Libraries of each size in
`library_sizes` are nested: each is built in a temporary folder from the previous one
(Library.merge) plus the next documents, so no document is absorbed twice; the first
`library_queries` documents are scored under every condition at every size.

Per size N, the rows report perplexity (corpus continuations, token-weighted, lower is better) and
QA scores per condition, and in "oracle_recovered" the fraction of the oracle's gain over no
context that each condition recovers, (base - c) / (base - oracle) on perplexity; "retrieval":
accuracy@1 and @5 of Library.search over all N documents, the query being the first sentence(s)
of the continuation (corpus) or the question (QA), for each embedding kind the library offers;
"decode": milliseconds per decoded token routed (k = 2) against one document's state alone
(bench/library.py's routed_against_single; None at the tiny limit)."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..library.embedding import KINDS
from ..library.folder import Library
from ..session import Session
from . import metrics
from .completion import completion_documents, nll_sum, nll_sum_under
from .data import Question
from .fictional import qa_examples
from .limits import Limits
from .prompts import QA_INSTRUCTION, chat_message, split_seed

ROUTED_K = (1, 2, 4)
CONDITIONS = (
    "base",
    "prompt",
    "adapter",
    "sum",
    *(f"routed k={k}" for k in ROUTED_K),
    "memory",
    "memory+adapter",
    "library",
)
LIBRARY_K = 2  # the routed k of the "library" condition (the server's default)
QA_ONLY = ("library",)  # conditions a corpus continuation (no question) has not
QA_EVERY = 4  # every fourth document is a generated QA document
DECODE_K = 2  # the routed decode timed against one state
DECODE_MIN_TOKENS = 8  # fewer new tokens (the tiny limit): the decode is not timed
SEARCH_K = 5
QUERY_WORDS = (12, 60)  # a continuation's query: whole sentences, at least / at most these words
QA_METRICS = {"contains": metrics.contains_match, "f1": metrics.token_f1}


@dataclass
class LibraryDocument:
    """One library entry and what is asked about it."""

    name: str  # the entry's name in the library
    doc_id: str  # corpus document id, or the generated example's id
    source: str  # corpus name ("gcide", ...) or "qa"
    absorbed: str  # the text absorbed (and, for prompting, put in the prompt)
    context_ids: list[int]  # corpus: the absorbed tokens; QA: empty
    target_ids: list[int]  # corpus: the continuation scored; QA: empty
    question: Question | None  # QA: the question asked
    query: str  # what search is given: the continuation's first sentence(s), or the question


def first_sentences(text: str, least: int = QUERY_WORDS[0], most: int = QUERY_WORDS[1]) -> str:
    """The first words of `text` up to the first sentence end ('.', '?', '!' or ':') after at
    least `least` words, and at most `most` words."""
    words = []
    for word in text.split():
        words.append(word)
        if len(words) >= most or (len(words) >= least and word.endswith((".", "?", "!", ":"))):
            break
    return " ".join(words)


def library_documents(
    tokenizer, n: int, context: int, target: int, seed: int, split: str
) -> list[LibraryDocument]:
    """n documents in library order: every QA_EVERY-th (from the second) a generated QA document,
    the others corpus documents (completion.completion_documents, so the same picks as that
    suite); QA documents fill in when the corpora have too few long enough documents.

    Raises FileNotFoundError when no corpus is installed (as the completion suite)."""
    qa_wanted = sum(1 for i in range(n) if i % QA_EVERY == 1)
    corpus = completion_documents(tokenizer, n - qa_wanted, context, target, seed, split)
    examples = iter(qa_examples(n - len(corpus), 1, split_seed(seed, split)))
    corpus_left = iter(corpus)
    out: list[LibraryDocument] = []
    for i in range(n):
        doc = None if i % QA_EVERY == 1 else next(corpus_left, None)
        name = f"d{i:04d}"
        if doc is None:
            example = next(examples)
            q = example.questions[0]
            out.append(LibraryDocument(name, example.id, "qa", example.context, [], [], q, q.text))
        else:
            query = first_sentences(tokenizer.decode(doc.target_ids))
            absorbed = tokenizer.decode(doc.context_ids)
            source = doc.doc_id.split(":", 1)[0]
            out.append(
                LibraryDocument(
                    name, doc.doc_id, source, absorbed, doc.context_ids, doc.target_ids, None, query
                )
            )
    return out


def suite_library(model, limits: Limits, seed: int, split: str, progress: bool) -> list[dict]:
    """The suite's rows: per library size, one perplexity row (corpus continuations) and one QA
    row (when QA documents were scored). Everything is built in a temporary folder, deleted at
    the end; nothing is cached across runs."""
    sizes = sorted(set(limits.library_sizes))
    docs = library_documents(
        model.tokenizer, sizes[-1], limits.library_context, limits.library_target, seed, split
    )
    rows: list[dict] = []
    absorb_seconds = 0.0
    with tempfile.TemporaryDirectory(prefix="genadapter-library-suite-") as tmp:
        previous: Library | None = None
        for n in sizes:
            library = Library.create(Path(tmp) / f"n{n}", model)
            if previous is not None:
                library.merge(previous)
            start = time.perf_counter()
            new = docs[len(library) : n]
            for d in tqdm(new, desc=f"library N={n}", unit="doc", disable=not progress):
                library.add(d.name, d.absorbed)
            absorb_seconds += time.perf_counter() - start
            rows += _evaluate(model, library, docs[:n], limits, absorb_seconds, progress)
            previous = Library.open(library.path, model)  # a fresh handle: routing stacks freed
            del library
    return rows


def _evaluate(model, library: Library, docs, limits: Limits, absorb_seconds: float, progress):
    """The rows of one library holding `docs` (all of it): every condition on the first
    `limits.library_queries` documents, then search and decode timing over the whole library."""
    n = len(docs)
    summed = model.new_state()
    for d in docs:
        summed.add_(library.load(d.name)[0].state)
    routed = {k: library.session(k, memory=False) for k in ROUTED_K}
    with_memory = library.session(LIBRARY_K)
    nll = {c: 0.0 for c in CONDITIONS}
    qa = {c: dict.fromkeys(QA_METRICS, 0.0) for c in CONDITIONS}
    seconds = {kind: dict.fromkeys(CONDITIONS, 0.0) for kind in ("corpus", "qa")}
    corpus_records, qa_records, scored = [], [], 0
    queried = docs[: limits.library_queries]
    keeps = model.memory_storage is not None
    for d in tqdm(queried, desc=f"library N={n} conditions", unit="doc", disable=not progress):
        entry = library.load(d.name)[0]
        oracle = entry.state
        sessions = {
            "base": Session(model, None, memory=None),
            "prompt": Session(model, None, memory=None),
            "adapter": Session(model, oracle, memory=None),
            "sum": Session(model, summed, memory=None),
            "memory": Session(model, None, memory=entry.memory),
            "memory+adapter": Session(model, oracle, memory=entry.memory),
            "library": with_memory,
        }
        record = {"doc_id": d.doc_id, "entry": d.name, "source": d.source}
        for c in _conditions(keeps, d.question is not None):
            k = int(c.split("=")[1]) if c.startswith("routed") else None
            start = time.perf_counter()
            if d.question is None:
                own = sessions.get(c)  # None: routed
                state, memory = (own.state, own.memory) if own else (None, None)
                value = _continuation_nll(model, d, c, state, memory, routed.get(k))
                nll[c] += value
                record[c] = {"perplexity": metrics.perplexity([value], [len(d.target_ids) - 1])}
            else:
                session = routed[k] if k else sessions[c]
                context = d.absorbed if c == "prompt" else None
                message = chat_message(d.question.text, context, QA_INSTRUCTION)
                answer = session.chat(message, max_new_tokens=limits.library_new_tokens)
                record[c] = {"answer": answer}
                for m, f in QA_METRICS.items():
                    record[c][m] = metrics.best_of(f, answer, d.question.answers)
                    qa[c][m] += record[c][m]
            seconds["qa" if d.question else "corpus"][c] += time.perf_counter() - start
        if d.question is None:
            scored += len(d.target_ids) - 1
            corpus_records.append(record)
        else:
            record |= {"question": d.question.text, "answers": d.question.answers}
            qa_records.append(record)
    shared = {
        "library_documents": n,
        "absorb_seconds": absorb_seconds,
        "retrieval": retrieval(library, docs),
        "decode": _decode(model, library, docs, limits),
    }
    rows = []
    if corpus_records:
        methods = {
            c: {"perplexity": metrics.perplexity([nll[c]], [scored])}
            for c in _conditions(keeps, question=False)
        }
        timed = seconds["corpus"]
        rows.append(_row(f"library N={n}", ["perplexity"], methods, timed, corpus_records, shared))
    if qa_records:
        m = len(qa_records)
        methods = {c: {k: v / m for k, v in qa[c].items()} for c in _conditions(keeps, True)}
        timed = seconds["qa"]
        rows.append(_row(f"library qa N={n}", list(QA_METRICS), methods, timed, qa_records, shared))
    return rows


def _conditions(keeps_memory: bool, question: bool) -> list[str]:
    """The conditions a document is scored under: the memory ones only when the model keeps
    memories, the library's chat only for a question."""
    return [
        c
        for c in CONDITIONS
        if (keeps_memory or not c.startswith(("memory", "library")))
        and (question or c not in QA_ONLY)
    ]


@torch.no_grad()
def _continuation_nll(model, d: LibraryDocument, condition: str, state, memory, routed) -> float:
    """Summed NLL (nats) of the continuation's tokens but its first, under one condition:
    `state` and `memory` (the entry's, read as the completion suite reads one), or `routed`."""
    target = d.target_ids
    if condition == "prompt":  # the most recent context that fits the window with the target
        context = d.context_ids[-(model.max_positions - len(target)) :]
        ids, first = context + target, len(context) + 1
    else:
        ids, first = target, 1
    if routed is not None:
        return nll_sum(routed.logits(torch.tensor([ids]))[0], ids, first)
    return nll_sum_under(model, ids, first, state, memory)


def _row(name: str, names: list[str], methods, seconds, records, shared) -> dict:
    """A runner row (runner._row's fields) plus the library's own: oracle_recovered, notes, and
    the size's retrieval and decode figures."""
    metric = names[0]
    for c, values in methods.items():
        values["seconds"] = seconds[c]
    methods["adapter"]["absorb_seconds"] = shared["absorb_seconds"]
    b, p, a = (methods[c] for c in ("base", "prompt", "adapter"))
    row = {
        "name": name,
        "metric": metric,
        "metrics": names,
        "higher_is_better": metric != "perplexity",
        "n": len(records),
        "methods": methods,
        "recovered": {k: metrics.recovered_fraction(b[k], p[k], a[k]) for k in names},
        "oracle_recovered": {
            c: metrics.recovered_fraction(b[metric], a[metric], v[metric])
            for c, v in methods.items()
        },
        **shared,
        "records": records,
    }
    row["notes"] = _notes(row)
    return row


def _notes(row: dict) -> list[str]:
    """What the table prints under the suite: oracle's gain recovered, search, decode cost."""
    cell = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    gains = ", ".join(f"{c} {cell(v)}" for c, v in row["oracle_recovered"].items() if c != "base")
    notes = [f"oracle's gain recovered ({row['metric']}): {gains}"]
    if row["metric"] == "perplexity":  # the library-wide figures once per size
        for kind, r in row["retrieval"].items():
            notes.append(
                f"search ({kind}) over {row['library_documents']} documents: "
                f"acc@1 {r['acc@1']:.3f}, acc@5 {r['acc@5']:.3f} ({r['n']} queries)"
            )
        d = row["decode"]
        notes.append(
            f"decode: not timed below {DECODE_MIN_TOKENS} new tokens"
            if d is None
            else f"decode: routed k={DECODE_K} {d['ms_per_token']['routed']:.1f} ms/token, one "
            f"state {d['ms_per_token']['one_state']:.1f} ms, ratio {d['routed_over_one_state']:.2f}"
        )
    return notes


def retrieval(library: Library, docs: list[LibraryDocument]) -> dict[str, dict]:
    """Per embedding kind: accuracy@1 and @SEARCH_K of Library.search over the whole library,
    one query per document (its `query`), overall and per source, and each query's rank (1-based,
    None when not in the top SEARCH_K)."""
    out = {}
    for kind in KINDS:
        ranks = []
        for d in docs:
            names = [name for name, _ in library.search(d.query, SEARCH_K, kind=kind)]
            ranks.append(names.index(d.name) + 1 if d.name in names else None)
        out[kind] = _accuracy(ranks) | {
            "by_source": {
                s: _accuracy([r for r, d in zip(ranks, docs) if d.source == s])
                for s in sorted({d.source for d in docs})
            },
            "ranks": ranks,
        }
    return out


def _accuracy(ranks: list[int | None]) -> dict:
    n = len(ranks)
    hit = lambda k: sum(r is not None and r <= k for r in ranks) / n  # noqa: E731
    return {"acc@1": hit(1), f"acc@{SEARCH_K}": hit(SEARCH_K), "n": n}


def _decode(model, library: Library, docs: list[LibraryDocument], limits: Limits) -> dict | None:
    """Per-token decode time routed (k = DECODE_K) against the first document's state alone,
    after the first corpus document's first 16 continuation tokens (or a QA question); None
    when the limit's new tokens are fewer than DECODE_MIN_TOKENS (tiny: not worth its cost)."""
    from ..bench.library import routed_against_single

    if limits.library_new_tokens < DECODE_MIN_TOKENS:
        return None
    d = next((x for x in docs if x.target_ids), docs[0])
    ids = d.target_ids[:16] or model.tokenizer.encode(d.query, add_special_tokens=False)
    state = library.load(docs[0].name)[0].state
    tokens = limits.library_new_tokens
    routes = library.routes(DECODE_K)
    return routed_against_single(model, ids, routes, state, tokens, repeats=2) | {
        "k": DECODE_K,
        "new_tokens": tokens,
    }
