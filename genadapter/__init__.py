"""genadapter: absorb context into a frozen language model's parameters (GenerativeAdapter)."""

from .generator import Generator, GeneratorConfig, GeneratorFormatError
from .model import AbsorbStats, AdaptedModel, load
from .session import Session
from .state import AdapterState, CorruptStateError, IncompatibleStateError, normalize_svd
from .text import DocumentError

__version__ = "0.1.0"

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
    "Session",
    "load",
    "normalize_svd",
]
