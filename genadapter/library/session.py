"""RoutedSession: a session that answers over a library (folder.py), every token of every
adapted layer routed to its top-k entries (routing.py), each turn reading the context memories
of the entries its text finds (memory.py). Imports flow one way: search.py imports this module;
it uses the library it is given through `routes` and `memories` alone."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch

from ..layers import bound
from ..memory import ContextMemory
from ..session import AbsorbStats, Session


class RoutedSession(Session):
    """A session over a library: chat, generate and logits route each token of each adapted
    layer to its top-k entries (routing.py). With `memory` (and a model that keeps memories), a
    turn (chat, generate) also reads the memories of the entries the library's lexical search
    ranks first for its text, at or above the model's memory_threshold, within its
    memory_budget, laid out as Session lays out one session's memory; logits and score read
    none (they route the adapter states alone). It absorbs nothing itself (add to the library)
    and has no state or memory of its own to save or export: those raise ValueError."""

    def __init__(self, library, k: int = 2, gates: str = "closed", memory: bool = True):
        super().__init__(library.model, memory=False)
        self.library = library
        self.k = k
        self.gates = gates
        self.reads_memory = memory

    def _routing(self):
        return bound(self.model.binding, routes=self.library.routes(self.k, self.gates))

    def _reads_memory(self) -> bool:
        has = self.reads_memory and self.model.memory_storage is not None
        return has and self.library.memories.any()

    def _turn_memory(self, query, budget: int) -> ContextMemory | None:
        return None if query is None else self.library.memories.for_turn(query, budget)

    def _run(self, layout, params) -> Iterable[str]:
        pieces = super()._run(layout, params)  # lazy: nothing runs until the first piece is asked
        with self._routing():
            yield from pieces

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """(b, t, vocab) float32 logits of `input_ids` (b, t) under routing."""
        with self._routing():
            return self.model.logits(input_ids, None, attention_mask)

    def score(self, text: str, prefix: str | None = None) -> float:
        """Mean negative log-likelihood per token of `text` (after `prefix`) under routing, as
        model.score (which hands a routed session back to this method); no memory is read."""
        with self._routing():
            return self.model.score(text, None, prefix)

    def absorb(self, document: object, progress: bool = False) -> AbsorbStats:
        raise ValueError("a routed session reads its library: add documents with Library.add")

    def save(self, path: str | os.PathLike) -> Path:
        raise ValueError("a routed session has no state of its own to save")

    def to_peft(self, folder: str | os.PathLike, merged: bool = False) -> Path:
        raise ValueError("a routed session is not one LoRA; export the library's entries")
