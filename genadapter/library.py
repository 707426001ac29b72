"""An adapter library: a folder of named documents absorbed with one base and generator, each an
expert that decoding routes to per token and per layer (routing.py, PHATGOOSE).

Layout of a library folder:
    library.json                   manifest: format, the base and generator fingerprints, and per
                                   entry its counts and the SHA-256 of its state's sums
    entries/NAME/state.safetensors the document's state and context memory in the saved-session
                                   format (`model.load_session` opens it as a session; entries
                                   written before memories load with an empty one)
    entries/NAME/gates.safetensors per adapted layer, the mean of the layer's inputs over the
                                   document's tokens (1 x d_in float32), in the same checksummed
                                   container (AdapterState.save), bound to the state's checksum
    entries/NAME/behaviour.safetensors
                                   the state's behaviour embedding (embedding.py; 1 x D float32
                                   under the name "behaviour"), same container, bound to the
                                   state's checksum and to embedding.BEHAVIOUR_VERSION. Entries
                                   written before it existed have none: it is then computed from
                                   the stored state when first needed (the same vector `add`
                                   would have stored) and kept in memory, never written by a read
    entries/NAME/lexical.safetensors
                                   its lexical embedding (1 x vocab float32, "lexical"), same
                                   container, bound likewise and to embedding.LEXICAL_VERSION;
                                   made from the text, which is not kept: an entry without it
                                   must be added again to be searched lexically

Every file is written atomically (state.atomic_write); an entry's files are written before the
manifest names it, and the manifest forgets an entry before its files are deleted, so a crash
leaves at worst an unnamed folder that the next `add` of that name overwrites. One process
writes a library at a time; libraries built apart combine with `merge`.

Entries are read whole and their checksums verified (a state is r1 r2 L float32, 245,760 bytes
for the default generator), not memory-mapped: what grows with N is the stack of folded deltas
that routing builds in memory (N r2 sum(d_in) floats, 8 MiB per entry for the default)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from . import embedding
from .gates import background
from .library_entry import (
    EMBEDDING_FILES,
    FINGERPRINTS,
    FORMAT,
    STATE_FILE,
    Entry,
    EntryDraft,
    MissingEmbeddingError,
    NoEntryError,
    check_name,
    copy_entry,
    documents,
    read_embedding,
    read_gates,
    read_manifest,
)
from .library_memory import EntryMemories
from .library_session import RoutedSession
from .routing import Routes, standardize
from .session import AbsorbStats, Session
from .state import CorruptStateError, IncompatibleStateError, atomic_write

log = logging.getLogger(__name__)

MANIFEST = "library.json"
ENTRIES = "entries"
# Routing's gates and whether the internal embedding subtracts the same background (gates.py):
# the variants that measured best (docs/LIBRARY.md, "Embeddings, gates and routing").
DEFAULT_GATES = "closed"
INTERNAL_CENTRED = False


class Library:
    """A library folder opened with `model` (an AdaptedModel), or with None to list and remove
    entries without loading a model (adding, loading and routing then raise ValueError)."""

    def __init__(self, path: Path, model, manifest: dict):
        self.path = path
        self.model = model
        self._manifest = manifest
        # Per adapted layer, built on demand: standardized gates (N, d_in), folded deltas
        # (N, r2, d_in).
        self._means: dict[str, torch.Tensor] | None = None
        self._downs: dict[str, torch.Tensor] | None = None
        self._routes: dict[str, dict] = {}  # gate kind -> layer -> (gates, center)
        self._stored: dict[tuple[str, str], torch.Tensor] = {}  # (kind, entry) -> (D,) embedding
        self.memories = EntryMemories(self)  # entries' context memories, loaded on demand

    # -- opening --------------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike, model) -> Library:
        """A new, empty library at `path` for `model`'s base and generator.

        Raises FileExistsError when `path` already holds a library, ValueError for a generator
        with an LM-head adapter (not routed yet)."""
        path = Path(path)
        if (path / MANIFEST).exists():
            raise FileExistsError(f"{path} already holds a library")
        _check_routable(model)
        manifest = {"format": FORMAT, **{k: getattr(model, k) for k in FINGERPRINTS}, "entries": {}}
        library = cls(path, model, manifest)
        library._write_manifest({})
        return library

    @classmethod
    def open(cls, path: str | os.PathLike, model=None, create: bool = False) -> Library:
        """The library at `path`; a new one when there is none and `create` is true.

        Raises FileNotFoundError (no library and not `create`), CorruptStateError (a manifest
        that is not a library's) and IncompatibleStateError (a library made with another base or
        generator than `model`'s)."""
        path = Path(path)
        if not (path / MANIFEST).is_file():
            if create and model is not None:
                return cls.create(path, model)
            raise FileNotFoundError(f"no library at {path} (no {MANIFEST})")
        manifest = read_manifest(path / MANIFEST)
        if model is not None:
            _check_routable(model)
            for key in FINGERPRINTS:
                if manifest[key] != getattr(model, key):
                    what = key.split("_")[0]
                    raise IncompatibleStateError(
                        f"the library {path} was made with another {what} ({manifest[key]}); "
                        f"this model's {what} is {getattr(model, key)}"
                    )
        return cls(path, model, manifest)

    # -- entries --------------------------------------------------------------------------------

    def list(self) -> list[Entry]:
        """The stored entries, sorted by name (from the manifest; no file is read)."""
        return [Entry(name=n, **e) for n, e in sorted(self._manifest["entries"].items())]

    def __len__(self) -> int:
        return len(self._manifest["entries"])

    def __contains__(self, name: str) -> bool:
        return name in self._manifest["entries"]

    def add(self, name: str, document: object, progress: bool = False) -> AbsorbStats:
        """Absorb `document` as the entry `name` and save it.

        document: text, UTF-8 bytes or an iterable of str pieces (one document, as
        Session.absorb), or a Path or a list of Paths (UTF-8 files, each absorbed as one document;
        the entry's state is their sum, its gates their mean over all their tokens).
        Raises ValueError for a bad or taken name and, like absorb, for empty or non-text input;
        the library is then unchanged."""
        model = self._need_model()
        check_name(name)
        if name in self:
            raise ValueError(f"the library already has an entry {name!r}; remove it first")
        texts = documents(document)
        start = time.perf_counter()
        draft = EntryDraft(model)
        for doc in texts:
            draft.encode(model.chunks(doc), progress)
            draft.state.documents += 1
        self.commit(name, draft)
        return AbsorbStats(draft.state.tokens, draft.state.chunks, time.perf_counter() - start)

    def commit(self, name: str, draft: EntryDraft) -> None:
        """Write `draft` (an EntryDraft absorbed with this library's model: `add` in steps, as
        the server does) as the entry `name`. Raises ValueError for a bad or taken name or a
        draft of another model, DocumentError for one that absorbed nothing; the library is
        then unchanged."""
        check_name(name)
        if name in self:
            raise ValueError(f"the library already has an entry {name!r}; remove it first")
        if draft.model is not self._need_model():
            raise ValueError("the draft was absorbed with another model than the library's")
        entry = draft.write(self.path / ENTRIES / name)
        self._write_manifest({**self._manifest["entries"], name: entry})

    def remove(self, name: str) -> None:
        """Delete the entry `name`. Raises NoEntryError (a KeyError) when there is none."""
        if name not in self:
            raise NoEntryError(f"the library {self.path} has no entry {name!r}")
        self._write_manifest({n: e for n, e in self._manifest["entries"].items() if n != name})
        shutil.rmtree(self.path / ENTRIES / name, ignore_errors=True)

    def load(self, name: str) -> tuple[Session, dict[str, torch.Tensor]]:
        """The entry's session (state and memory) and gates (layer -> (d_in,) float32 mean input).

        Raises NoEntryError (a KeyError: no such entry), FileNotFoundError, CorruptStateError (a
        damaged file, or files that do not belong together) and IncompatibleStateError (made
        with another base, generator or layers)."""
        model = self._need_model()
        if name not in self:
            raise NoEntryError(f"the library {self.path} has no entry {name!r}")
        folder = self.path / ENTRIES / name
        session = Session.load(model, folder / STATE_FILE)
        checksum = session.state.checksum()
        if checksum != self._manifest["entries"][name]["state_sha256"]:
            raise CorruptStateError(f"{folder}: the state is not the one the manifest recorded")
        return session, read_gates(folder, model, checksum)

    def merge(self, other: Library) -> list[str]:
        """Copy every entry of `other` (a library of the same base and generator, e.g. built in
        another process) into this one; returns the names copied. Each entry is loaded and
        verified first. Raises ValueError when a name is in both, IncompatibleStateError for
        another model's library."""
        self._need_model()
        if any(other._manifest[k] != self._manifest[k] for k in FINGERPRINTS):
            raise IncompatibleStateError(f"{other.path} was made with another base or generator")
        clash = sorted(n for n in other._manifest["entries"] if n in self)
        if clash:
            raise ValueError(f"both libraries have entries named {', '.join(clash)}")
        checked = Library(other.path, self.model, other._manifest)
        names = [e.name for e in other.list()]
        for name in names:  # refuses damaged or foreign entries before anything is copied
            session, _ = checked.load(name)
            for kind in EMBEDDING_FILES:
                read_embedding(
                    other.path / ENTRIES / name, self.model, session.state.checksum(), kind
                )
        for name in names:
            copy_entry(other.path / ENTRIES / name, self.path / ENTRIES / name)
        copied = {n: dict(other._manifest["entries"][n]) for n in names}
        self._write_manifest({**self._manifest["entries"], **copied})
        return names

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
        text finds (library_memory.py; `memory=False`: the routed adapter states alone)."""
        self.routes(k, gates)  # fail now, not at the first token
        return RoutedSession(self, k, gates, memory)

    # -- helpers --------------------------------------------------------------------------------

    def _need_model(self):
        if self.model is None:
            raise ValueError(f"the library {self.path} was opened without a model")
        return self.model

    def _write_manifest(self, entries: dict) -> None:
        """Write the manifest with `entries`, then (only once it is on disk) use it: a failed
        write leaves this object as the disk has it."""
        manifest = {**self._manifest, "entries": entries}
        atomic_write(self.path / MANIFEST, json.dumps(manifest, indent=1).encode())
        self._manifest = manifest
        self._means = self._downs = None
        self._routes = {}
        self._stored = {}
        self.memories = EntryMemories(self)


def _check_routable(model) -> None:
    if model.generator.head is not None:
        raise ValueError("the adapter library does not route a generator's LM-head adapter yet")


__all__ = ["Entry", "EntryDraft", "Library", "MissingEmbeddingError", "NoEntryError"]
__all__ += ["RoutedSession"]
