"""Evaluation harness: does absorbing context into parameters match putting it in the prompt?

    from genadapter.eval import run_suites, evaluate_generator, is_eval_document
    results = run_suites(model, suites=["completion", "qa"], limit="tiny", seed=0)

See docs/EVAL.md for how each suite is built."""

from .data import Example, Question, is_eval_document
from .runner import LIMITS, SUITES, Limits, chat_message, evaluate_generator, run_suites

__all__ = [
    "LIMITS",
    "SUITES",
    "Example",
    "Limits",
    "Question",
    "chat_message",
    "evaluate_generator",
    "is_eval_document",
    "run_suites",
]
