"""Routing and search over a library's entries (folder.py): the stacks of gates and folded
deltas that routed decoding mixes (routing.py, gates.py), the entries' embeddings and the search
that ranks them (embedding.py), and the routed session (session.py) that reads the entries'
memories (memory.py).

LibraryIndex is the half of Library that reads entries and builds on them; Library (folder.py)
stores them. It uses the library only through `path`, `model`, `_manifest` (the entries' state
checksums), `list`, `load`, `in`, `len` and `_need_model`, and everything it builds is dropped
(`_forget`) whenever the entries change."""

from __future__ import annotations

import logging

import torch

from . import embedding
from .entry import ENTRIES, MissingEmbeddingError, NoEntryError, read_embedding
from .gates import background
from .memory import EntryMemories
from .routing import Routes, standardize
from .session import RoutedSession

log = logging.getLogger(__name__)

# Routing's gates and whether the internal embedding subtracts the same background (gates.py):
# the variants that measured best (docs/LIBRARY.md, "Embeddings, gates and routing").
DEFAULT_GATES = "closed"
INTERNAL_CENTRED = False


class LibraryIndex:
    """What a Library (folder.py, its subclass) builds over its entries to route and search."""

    def _forget(self) -> None:
        """Drop everything built from the entries: at opening, and whenever they change."""
        # Per adapted layer, built on demand: standardized gates (N, d_in), folded deltas
        # (N, r2, d_in).
        self._means: dict[str, torch.Tensor] | None = None
        self._downs: dict[str, torch.Tensor] | None = None
        self._routes: dict[str, dict] = {}  # gate kind -> layer -> (gates, center)
        self._stored: dict[tuple[str, str], torch.Tensor] = {}  # (kind, entry) -> (D,) embedding
        self.memories = EntryMemories(self)  # entries' context memories, loaded on demand

    # -- routing --------------------------------------------------------------------------------

    def routes(self, k: int = 2, gates: str = DEFAULT_GATES) -> dict[str, Routes]:
        """Per adapted layer, the stacked standardized gates (of kind `gates`: "closed" or
        "centred", gates.py) and folded deltas of every entry (in name order), for routed
        decoding; the stacks are cached until the library changes.

        Memory: N x r2 x d_in float32 per layer (N entries). Raises ValueError for an empty
        library, k < 1 or another gate kind, and whatever `load` raises for a bad entry."""
        if k < 1:
            raise ValueError(f"k must be at least 1, not {k}")
        if gates not in ("closed", "centred"):
            raise ValueError(f"a library routes with 'closed' or 'centred' gates, not {gates!r}")
        self._stack(folds=True)
        if gates not in self._routes:
            center = self._center(gates == "centred")
            self._routes[gates] = {}
            for n, m in self._means.items():
                c = None if center is None else center[n]
                self._routes[gates][n] = (standardize(m if c is None else m - c), c)
        return {n: Routes(g, self._downs[n], k, c) for n, (g, c) in self._routes[gates].items()}

    def _center(self, centred: bool) -> dict[str, torch.Tensor] | None:
        return background(self._need_model()) if centred else None

    def _stack(self, folds: bool) -> None:
        """Load and verify every entry once; keep the stacks of their mean layer inputs (N, d_in)
        and, when `folds`, of their folded deltas (the larger part, which search does not need)."""
        if self._means is not None and (self._downs is not None or not folds):
            return
        model = self._need_model()
        if not len(self):
            raise ValueError(f"the library {self.path} has no entries")
        means: dict[str, list[torch.Tensor]] = {n: [] for n in model.generator.shapes}
        downs: dict[str, list[torch.Tensor]] = {n: [] for n in model.generator.shapes}
        for entry in self.list():
            session, g = self.load(entry.name)
            folded = model.generator.folded(session.state) if folds else {}
            for n in means:
                means[n].append(g[n])
                if folds:
                    downs[n].append(folded[n])
        self._means = {n: torch.stack(v) for n, v in means.items()}
        self._downs = {n: torch.stack(v) for n, v in downs.items()} if folds else None

    # -- search ---------------------------------------------------------------------------------

    def stored_embedding(self, name: str, kind: str) -> torch.Tensor:
        """The entry's stored embedding of `kind` ("behaviour" or "lexical"), (D,) float32
        (embedding.py), read from its file and verified. A behaviour embedding missing or made
        with other probes is computed from the stored state (never written by a read).

        Raises NoEntryError, CorruptStateError (a damaged file, or one that is not the state's
        the manifest records), IncompatibleStateError (another model's), MissingEmbeddingError
        (a lexical one of an entry added before it existed: add it again); computing one, what
        `load` raises."""
        if (kind, name) not in self._stored:
            model = self._need_model()
            if name not in self:
                raise NoEntryError(f"the library {self.path} has no entry {name!r}")
            # Bound to the state the manifest records (which `load` checks the state against),
            # so search reads no state file unless the embedding must be computed.
            checksum = self._manifest["entries"][name]["state_sha256"]
            vector = read_embedding(self.path / ENTRIES / name, model, checksum, kind)
            if vector is None and kind == "lexical":
                raise MissingEmbeddingError(
                    f"the entry {name!r} has no current lexical embedding (added by an older "
                    "version): remove it and add it again, or search with kind 'internal'"
                )
            if vector is None:
                vector = embedding.behaviour_of_state(model, self.load(name)[0].state)
            self._stored[kind, name] = vector
        return self._stored[kind, name]

    def embed(self, text: str, kind: str = embedding.DEFAULT_KIND) -> torch.Tensor:
        """A fixed-size vector of `text` (a question, a prompt or a document) in the space of
        `embeddings(kind)` (embedding.py):

        "lexical":   each token id's largest surprisal under the base, norm 1: (vocab,) float32.
        "internal":  per adapted layer the mean of the inputs the layer saw while `text` was
                     read, standardized and scaled to norm 1/sqrt(L) (L layers), concatenated:
                     (sum of d_in,) float32.
        "behaviour": the shift of the base's next-token log-distributions at the probe prompts
                     with `text` placed before each probe: (P * PROJECTION_DIM,) float32, norm 1.
        Raises ValueError for another kind, and for an empty or non-text `text` (DocumentError
        is a ValueError)."""
        embedding.check_kind(kind)
        model = self._need_model()
        if kind == "behaviour":
            return embedding.behaviour_of_text(model, text)
        if kind == "lexical":
            return embedding.lexical(model, [text])
        means = embedding.input_means(model, text)
        return embedding.internal(means, self._center(INTERNAL_CENTRED))

    def embeddings(self, kind: str = embedding.DEFAULT_KIND) -> tuple[list[str], torch.Tensor]:
        """Every entry's name and embedding (N, D) float32 in the space of `embed(text, kind)`,
        in name order, each made from that entry's stored files alone (its gates for
        "internal", its stored embedding for the others), so it does not depend on the rest of
        the library. Raises ValueError for an unknown kind or an empty library, and what
        `stored_embedding` or `load` raise for a bad entry."""
        embedding.check_kind(kind)
        if kind != "internal":
            self._need_model()
            if not len(self):
                raise ValueError(f"the library {self.path} has no entries")
            names = [e.name for e in self.list()]
            return names, torch.stack([self.stored_embedding(n, kind) for n in names])
        self._stack(folds=False)
        return [e.name for e in self.list()], embedding.internal(
            self._means, self._center(INTERNAL_CENTRED)
        )

    def search(self, question: str, k: int = 5, kind: str | None = None) -> list[tuple[str, float]]:
        """The k entries whose embeddings (of `kind`) are nearest `question`'s, best first, with
        their scores in [-1, 1]: the cosine of the two lexical vectors for "lexical" (0: no token
        in common), for "internal" the mean over adapted layers of the cosine between the
        question's and the document's standardized mean layer inputs, for "behaviour" the mean
        over probes of the cosine between their projected shifts. kind None: "lexical" (it
        found documents best, docs/LIBRARY.md), or "internal", with a warning, while some entry
        predates lexical embeddings. Raises ValueError for an unknown kind, an empty library,
        k < 1, or a question that is not a non-empty str (before any entry is read), and
        MissingEmbeddingError for kind "lexical" over such an older entry."""
        if kind is not None:
            embedding.check_kind(kind)
        if k < 1:
            raise ValueError(f"k must be at least 1, not {k}")
        if not isinstance(question, str) or not question.strip():
            raise ValueError("the question must be a non-empty text")
        chosen = kind or embedding.DEFAULT_KIND
        try:
            names, docs = self.embeddings(chosen)
        except MissingEmbeddingError as e:
            if kind is not None:
                raise
            log.warning("%s; searching %s with kind 'internal'", e, self.path)
            chosen = "internal"
            names, docs = self.embeddings(chosen)
        scores = docs @ self.embed(question, chosen).to(docs.device)
        top = scores.topk(min(k, len(names)))
        return [(names[i], float(v)) for v, i in zip(top.values.tolist(), top.indices.tolist())]

    def session(self, k: int = 2, gates: str = DEFAULT_GATES, memory: bool = True) -> RoutedSession:
        """A session that answers with every token routed to its top-k entries by `gates`
        ("closed" or "centred", see `routes`), each turn reading the memories of the entries its
        text finds (memory.py; `memory=False`: the routed adapter states alone)."""
        self.routes(k, gates)  # fail now, not at the first token
        return RoutedSession(self, k, gates, memory)
