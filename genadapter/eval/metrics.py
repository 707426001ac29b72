"""Scores: SQuAD-style answer normalization, token F1, contains-match, label match, perplexity,
and the share of prompting's gain that the adapter recovers."""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans(string.punctuation, " " * len(string.punctuation))


def normalize_answer(text: str) -> str:
    """Lower case, punctuation and the articles a/an/the removed, whitespace collapsed."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCT))
    return " ".join(text.split())


def token_f1(prediction: str, gold: str) -> float:
    """Harmonic mean of precision and recall of the normalized words (bag of words)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def contains_match(prediction: str, gold: str) -> float:
    """1.0 when the normalized gold answer appears, on word boundaries, in the prediction."""
    pred, ref = normalize_answer(prediction), normalize_answer(gold)
    if not ref:
        return float(not pred)
    return float(f" {ref} " in f" {pred} ")


def best_of(metric, prediction: str, golds: Sequence[str]) -> float:
    """A metric against several acceptable answers: the best one counts."""
    return max(metric(prediction, g) for g in golds)


def label_match(prediction: str, gold: str) -> float:
    """1.0 when the first line of the prediction, less an echoed 'Output:', is the gold label.

    For demonstrations, which teach an exact output format: a right word buried in a sentence
    does not count."""
    lines = [line for line in prediction.strip().splitlines() if line.strip()]
    first = lines[0] if lines else ""
    first = re.sub(r"^\s*output\s*:", "", first, flags=re.IGNORECASE)
    return float(normalize_answer(first) == normalize_answer(gold))


def perplexity(nll_sums: Sequence[float], token_counts: Sequence[int]) -> float:
    """exp of the mean negative log-likelihood per token over all documents (token-weighted)."""
    tokens = sum(token_counts)
    if tokens <= 0:
        raise ValueError("perplexity needs at least one scored token")
    return math.exp(sum(nll_sums) / tokens)


def recovered_fraction(base: float, prompt: float, adapter: float) -> float | None:
    """(adapter - base) / (prompt - base): 1.0 when absorbing matches prompting, 0.0 when it is no
    better than no context. Works for lower-is-better metrics too (both gains are negative).
    None when prompting gains nothing, where the ratio means nothing."""
    gain = prompt - base
    if abs(gain) < 1e-9:
        return None
    return (adapter - base) / gain


def recovered(methods: dict, names) -> dict[str, float | None]:
    """Per metric in `names`, recovered_fraction of a row's methods (name -> metric -> value);
    empty unless the row has base, prompt and adapter."""
    if not all(m in methods for m in ("base", "prompt", "adapter")):
        return {}
    b, p, a = methods["base"], methods["prompt"], methods["adapter"]
    return {k: recovered_fraction(b[k], p[k], a[k]) for k in names}
