"""genadapter: absorb context into a frozen language model's parameters (GenerativeAdapter).

The core is the top-level modules, in the order data flows through them: text.py (text to token
chunks), base.py and quantize.py (the frozen base), model.py (the base with the generator
injected: the context pass), generator.py, state.py and polar.py (the adapter sums and their
normalization; head.py the LM-head adapter), memory.py (the context memory, from the same pass),
layers.py and kernels.py (the adapted layers), memory_read.py (what a turn reads of the memory),
session.py (a session) and generation.py (decoding). Around it: library/ (the adapter library),
adapters/ (PEFT export and merging), distributed.py (absorbing on Ray), eval/, bench/, server/,
and the command line (cli/, with options.py and chat.py).

The public names below are imported on first use, so importing `genadapter` (or its command
line, for `genadapter --help`) does not pay for torch and transformers until a model is needed."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Each public name and the module that defines it.
_EXPORTS = {
    "AbsorbStats": "model",
    "AdaptedModel": "model",
    "AdapterState": "state",
    "CorruptStateError": "state",
    "DocumentError": "text",
    "Generator": "generator",
    "GeneratorConfig": "generator",
    "GeneratorFormatError": "generator",
    "IncompatibleStateError": "state",
    "LoraAdapter": "adapters.export",
    "Session": "session",
    "load": "model",
    "merge": "adapters.merging",
    "merge_sessions": "adapters.merging",
    "normalize_svd": "state",
}

__all__ = [
    "AbsorbStats",
    "AdaptedModel",
    "AdapterState",
    "CorruptStateError",
    "DocumentError",
    "Generator",
    "GeneratorConfig",
    "GeneratorFormatError",
    "IncompatibleStateError",
    "LoraAdapter",
    "Session",
    "load",
    "merge",
    "merge_sessions",
    "normalize_svd",
]

if TYPE_CHECKING:  # what the lazy imports below resolve to, for type checkers and readers
    from .adapters.export import LoraAdapter
    from .adapters.merging import merge, merge_sessions
    from .generator import Generator, GeneratorConfig, GeneratorFormatError
    from .model import AbsorbStats, AdaptedModel, load
    from .session import Session
    from .state import AdapterState, CorruptStateError, IncompatibleStateError, normalize_svd
    from .text import DocumentError


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
