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
import os
import shutil
import time
from pathlib import Path

import torch

from ..session import AbsorbStats, Session
from ..state import CorruptStateError, IncompatibleStateError, atomic_write
from .entry import (
    EMBEDDING_FILES,
    ENTRIES,
    FINGERPRINTS,
    FORMAT,
    STATE_FILE,
    Entry,
    EntryDraft,
    NoEntryError,
    check_name,
    copy_entry,
    documents,
    read_embedding,
    read_gates,
    read_manifest,
)
from .search import LibraryIndex

MANIFEST = "library.json"


class Library(LibraryIndex):
    """A library folder opened with `model` (an AdaptedModel), or with None to list and remove
    entries without loading a model (adding, loading and routing then raise ValueError). Its
    routing and search (routes, embed, embeddings, search, session) are LibraryIndex's
    (search.py)."""

    def __init__(self, path: Path, model, manifest: dict):
        self.path = path
        self.model = model
        self._manifest = manifest
        self._forget()

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
        self._forget()


def _check_routable(model) -> None:
    if model.generator.head is not None:
        raise ValueError("the adapter library does not route a generator's LM-head adapter yet")
