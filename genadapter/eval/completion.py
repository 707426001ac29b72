"""The completion suite (suite_completion, run by runner.run_suites): held-out real documents,
absorb all but the last K tokens of a document and score the last K. Documents come from the
installed Debian corpora (corpora.py), only from an evaluation split, so training never sees them
(see data.is_eval_document)."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from ..generation import prefill
from ..session import Session
from . import corpora, metrics
from .limits import Limits

log = logging.getLogger(__name__)


@dataclass
class CompletionDocument:
    doc_id: str
    context_ids: list[int]  # absorbed (adapter) or put before the target (prompt)
    target_ids: list[int]  # scored


def completion_documents(
    tokenizer, n: int, context_tokens: int, target_tokens: int, seed: int, split: str = "test"
) -> list[CompletionDocument]:
    """n documents spread over the installed corpora, each cut to its first context_tokens +
    target_tokens tokens; documents shorter than target_tokens + context_tokens // 2 are skipped.

    Fails clearly when no corpus is installed; a missing corpus is skipped with a warning."""
    if split not in ("dev", "test"):
        raise ValueError("evaluation documents come from the 'dev' or 'test' split")
    installed = corpora.available()
    missing = [c for c in corpora.CORPORA if c not in installed]
    if missing:
        log.warning(
            "corpora not installed, left out of the completion suite: %s (apt-get install %s)",
            ", ".join(missing),
            " ".join(corpora.APT_PACKAGES[c] for c in missing),
        )
    if not installed:
        raise FileNotFoundError(
            "the completion suite needs at least one text corpus: apt-get install "
            + " ".join(corpora.APT_PACKAGES.values())
        )
    queues = []
    for corpus in installed:
        texts = dict(corpora.documents(corpus, split))
        order = sorted(texts)
        random.Random(f"completion:{seed}:{corpus}").shuffle(order)
        queues.append(iter([(doc_id, texts[doc_id]) for doc_id in order]))
    picked: list[CompletionDocument] = []
    while queues and len(picked) < n:  # round robin, so every corpus is represented
        for queue in list(queues):
            doc = _next_long_enough(queue, tokenizer, context_tokens, target_tokens)
            if doc is None:
                queues.remove(queue)
            elif len(picked) < n:
                picked.append(doc)
    if len(picked) < n:
        log.warning("only %d long enough %s documents in the installed corpora", len(picked), split)
    return picked


def _next_long_enough(queue, tokenizer, context_tokens: int, target_tokens: int):
    for doc_id, text in queue:
        ids = tokenizer.encode(text, add_special_tokens=False)[: context_tokens + target_tokens]
        if len(ids) >= target_tokens + context_tokens // 2:
            return CompletionDocument(doc_id, ids[:-target_tokens], ids[-target_tokens:])
    return None


def nll_sum(logits: torch.Tensor, ids: list[int], first: int) -> float:
    """Summed negative log-likelihood (nats) of ids[first:] under `logits` (len(ids), vocab), the
    logits of the sequence `ids` itself: position i predicts ids[i + 1]."""
    target = torch.tensor(ids[first:], device=logits.device)
    return torch.nn.functional.cross_entropy(logits[first - 1 : -1], target, reduction="sum").item()


# -- the suite ------------------------------------------------------------------------------------


@torch.no_grad()
def logits_under(model, ids: list[int], state, memory=None) -> torch.Tensor:
    """(len(ids), vocab) logits of the sequence `ids` under `state`, reading `memory` (the latest
    of it within the budget: the text is no query) laid out before `ids` as Session.text_layout
    does."""
    if memory is not None:
        layout = Session(model, state, memory=memory).text_layout(ids, None)
        if layout.read is not None:
            with model.bind_states([state]):
                _, logits = prefill(model, [layout], DynamicCache(), logits_to_keep=0)
            return logits[0].float()
    return model.logits(torch.tensor([ids]), [state])[0]


def nll_sum_under(model, ids: list[int], first: int, state, memory=None) -> float:
    """Summed NLL of ids[first:] under `state`, reading `memory` (logits_under)."""
    return nll_sum(logits_under(model, ids, state, memory), ids, first)


COMPLETION_METHODS = ("base", "prompt", "adapter", "memory", "memory+adapter")
# Controls: a document's target scored under another document's adapter state and memory.
OTHER = " (other doc)"
OTHER_DOCUMENT = ("adapter" + OTHER, "memory" + OTHER)


def _absorbed(target: list[int], session, suffix: str):
    """(method, ids, first, state, memory) rows of the methods a session gives."""
    return (
        ("adapter" + suffix, target, 1, session.state, None),
        ("memory" + suffix, target, 1, None, session.memory),
        ("memory+adapter" + suffix, target, 1, session.state, session.memory),
    )


def _score_other(model, previous, session, sums: dict, seconds: dict) -> None:
    """Score the previous document's target under `session` (another document's) as the
    OTHER_DOCUMENT methods, into its record and the sums."""
    target, record = previous
    rows = [r for r in _absorbed(target, session, OTHER) if r[0] in OTHER_DOCUMENT]
    _score(model, rows, len(target) - 1, record, sums, seconds)


def _score(model, rows, n: int, record: dict, sums: dict, seconds: dict) -> None:
    """Score each (method, ids, first, state, memory) row (memory methods only with a memory)
    into `record`, the summed NLL and the seconds."""
    for method, ids, first, state, memory in rows:
        if method.startswith("memory") and memory is None:
            continue
        start = time.perf_counter()
        nll = nll_sum_under(model, ids, first, state, memory)
        seconds[method] += time.perf_counter() - start
        sums[method] += nll
        record[method] = {"perplexity": metrics.perplexity([nll], [n])}


def suite_completion(model, limits: Limits, seed: int, split: str, progress: bool):
    """Perplexity of the last K tokens of held-out documents. Every method scores the same K - 1
    tokens (all but the first target token, which base and adapter have nothing to predict from)."""
    docs = completion_documents(
        model.tokenizer,
        limits.completion_documents,
        limits.completion_context,
        limits.completion_target,
        seed,
        split,
    )
    sums = {m: 0.0 for m in (*COMPLETION_METHODS, *OTHER_DOCUMENT)}
    seconds = dict(sums)
    absorb_seconds, scored, records = 0.0, 0, []
    first_session, previous = None, None
    for doc in tqdm(docs, desc="completion", unit="doc", disable=not progress):
        target, n = doc.target_ids, len(doc.target_ids) - 1
        # Prompting keeps the most recent context that fits the window with the target.
        context = doc.context_ids[-(model.max_positions - len(target)) :]
        start = time.perf_counter()
        session = model.session()
        session.absorb(model.tokenizer.decode(doc.context_ids))
        absorb_seconds += time.perf_counter() - start
        record = {"doc_id": doc.doc_id, "context_tokens": len(doc.context_ids), "scored": n}
        rows = (
            ("base", target, 1, None, None),
            ("prompt", context + target, len(context) + 1, None, None),
            *_absorbed(target, session, ""),
        )
        _score(model, rows, n, record, sums, seconds)
        # The control: the previous document's target under this document's session (the
        # first's under the last's, below). Is it the document, or text of its kind?
        if previous is not None:
            _score_other(model, previous, session, sums, seconds)
        if first_session is None:
            first_session = session
        previous = (target, record)
        scored += n
        records.append(record)
    if previous is not None and len(records) > 1:
        _score_other(model, previous, first_session, sums, seconds)
    else:  # one document: no other document to compare with
        for m in OTHER_DOCUMENT:
            sums.pop(m)
    methods = {
        m: {"perplexity": metrics.perplexity([sums[m]], [scored]), "seconds": seconds[m]}
        for m in sums
        if not (m.startswith("memory") and model.memory_storage is None)
    }
    methods["adapter"]["absorb_seconds"] = absorb_seconds
    return [
        {
            "name": "completion",
            "metric": "perplexity",
            "metrics": ["perplexity"],
            "higher_is_better": False,
            "n": len(records),
            "methods": methods,
            "recovered": metrics.recovered(methods, ["perplexity"]),
            "records": records,
        }
    ]
