"""Evaluation harness: does absorbing context into parameters match putting it in the prompt?

    from genadapter.eval import run_suites, evaluate_generator, is_eval_document
    results = run_suites(model, suites=["completion", "qa"], limit="tiny", seed=0)

See docs/EVAL.md for how each suite is built. The names below load on first use (PEP 562): the
suite and limit names (eval/limits.py) import no torch, so a command line can check them first."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LIMITS": "limits",
    "SUITES": "limits",
    "Limits": "limits",
    "Example": "data",
    "Question": "data",
    "is_eval_document": "data",
    "chat_message": "prompts",
    "evaluate_generator": "runner",
    "run_suites": "runner",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
