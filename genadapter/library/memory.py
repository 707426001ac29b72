"""Library entries' context memories (genadapter/memory.py; entry.py writes each entry's into
its state file) and what a routed turn reads of them (session.py).

A routed turn reads the memories of the entries the library's lexical search ranks first for the
turn's text: every entry with a memory is scored by the cosine of its stored lexical embedding
with the turn's (the score Library.search ranks by), the entries at or above the model's
`memory_threshold` are taken best first until their memories hold the model's `memory_budget`
tokens, and their memories are joined into one ContextMemory (union, best entry first). The turn
then selects from that union and lays it out exactly as Session does one session's memory
(Session.read, ContextMemory.select, memory_read.assemble)."""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch

from ..memory import ContextMemory
from ..state import CorruptStateError
from .entry import MissingEmbeddingError

log = logging.getLogger(__name__)

# Bytes of entries' memories kept loaded (most recently read first); one entry larger than this
# is still read, then dropped.
MEMORY_CACHE_BYTES = 256 * 2**20


class EntryMemories:
    """The memories of a library's entries, loaded on demand (Library.load: verified like the
    state they share a file with) and kept within `cap_bytes`, least recently read dropped first.
    The library makes a new one whenever its entries change."""

    def __init__(self, library, cap_bytes: int = MEMORY_CACHE_BYTES):
        self.library = library
        self.cap_bytes = cap_bytes
        self._kept: OrderedDict[str, ContextMemory] = OrderedDict()
        self._by_name: dict | None = None  # the manifest's entries, by name
        self._ranked: tuple[list[str], torch.Tensor] | None = None  # names, (N, vocab) lexical
        self._union: tuple[tuple[str, ...], ContextMemory] | None = None  # the last turn's

    def any(self) -> bool:
        """Whether some entry has a memory (from the manifest; no file is read)."""
        return any(e.memory_tokens for e in self._entries().values())

    def _entries(self) -> dict:
        if self._by_name is None:
            self._by_name = {e.name: e for e in self.library.list()}
        return self._by_name

    def get(self, name: str) -> ContextMemory:
        """The entry's memory (empty when it has none). Raises what Library.load raises, and
        CorruptStateError for a memory that is not the one the manifest recorded."""
        if name in self._kept:
            self._kept.move_to_end(name)
            return self._kept[name]
        session, _ = self.library.load(name)
        memory = session.memory
        if memory is None:  # written without one, loaded by a model that keeps none
            memory = ContextMemory(prefix_len=0)
        if memory.tokens != self._entries()[name].memory_tokens:
            raise CorruptStateError(f"the entry {name!r}'s memory is not the one recorded")
        self._kept[name] = memory
        used = sum(m.nbytes for m in self._kept.values())
        while used > self.cap_bytes and len(self._kept) > 1:
            used -= self._kept.popitem(last=False)[1].nbytes
        return memory

    def ranked(self, query: torch.Tensor) -> list[tuple[str, float]]:
        """The entries that have a memory, best first, with the cosine of their stored lexical
        embedding with `query` ((vocab,) of norm 1, embedding.lexical of the turn's text). An
        entry without a current lexical embedding (added by an older version) is left out."""
        if self._ranked is None:
            names, vectors = [], []
            for entry in self._entries().values():
                if not entry.memory_tokens:
                    continue
                try:
                    vectors.append(self.library.stored_embedding(entry.name, "lexical"))
                except MissingEmbeddingError as e:
                    log.warning("%s; its memory is not read", e)
                    continue
                names.append(entry.name)
            self._ranked = (names, torch.stack(vectors) if vectors else torch.zeros(0))
        names, vectors = self._ranked
        if not names:
            return []
        scores = (vectors @ query.to(vectors)).tolist()
        order = sorted(range(len(names)), key=lambda i: -scores[i])  # stable: name order on ties
        return [(names[i], scores[i]) for i in order]

    def for_turn(self, query: torch.Tensor, budget: int) -> ContextMemory | None:
        """The union of the memories of the entries ranked first for `query` (module
        docstring), or None when no entry with a memory scores at or above the threshold (or
        the model keeps no memory)."""
        model, entries = self.library.model, self._entries()
        if model.memory_storage is None:
            return None
        picked, tokens = [], 0
        for name, score in self.ranked(query):
            if score < model.memory_threshold or tokens >= budget:
                break
            picked.append(name)
            tokens += entries[name].memory_tokens
        if not picked:
            return None
        if self._union is None or self._union[0] != tuple(picked):
            union = model.new_memory()  # this model's encoding prefix and storage
            for name in picked:
                union.extend(self.get(name))
            self._union = (tuple(picked), union)
        return self._union[1]
