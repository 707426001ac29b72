"""The files of one library entry (folder.py): writing them at `add`, reading and verifying them,
and the manifest's checks. Every file is a checksummed AdapterState container written atomically;
the gates and the stored embeddings are bound to the state's checksum and the model's
fingerprints, so an entry's files cannot be mixed with another's or another model's. The state
file also holds the entry's context memory (genadapter/memory.py), as a saved session holds its
own."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..layers import bound
from ..memory import ContextMemory
from ..session import Session
from ..state import AdapterState, CorruptStateError, IncompatibleStateError, atomic_write
from ..text import DocumentError
from . import embedding

FORMAT = "genadapter-library/1"
ENTRIES = "entries"  # the library folder's subfolder of entries, one folder each
STATE_FILE = "state.safetensors"
GATES_FILE = "gates.safetensors"
GATES_KIND = "library-gates"
# The embeddings stored per entry (embedding.py), by kind: file name and version. "internal" is
# made from the gates, so it has no file of its own.
EMBEDDING_FILES = {"behaviour": "behaviour.safetensors", "lexical": "lexical.safetensors"}
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
FINGERPRINTS = ("base_fingerprint", "generator_fingerprint")


class MissingEmbeddingError(ValueError):
    """An entry has no current stored embedding of a kind that cannot be recomputed from its
    state (lexical: made from the text, which the library does not keep); add it again."""


class NoEntryError(KeyError):
    """The library has no entry of that name."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass
class Entry:
    """One stored document: its name, what was absorbed, when, its state's checksum, and its
    context memory's tokens and bytes (0 for an entry written before entries kept one)."""

    name: str
    tokens: int
    chunks: int
    documents: int
    added: float
    state_sha256: str
    memory_tokens: int = 0
    memory_bytes: int = 0


# Manifest fields every entry has; the others were added later and may be missing.
REQUIRED_FIELDS = {"tokens", "chunks", "documents", "added", "state_sha256"}


class EntryDraft:
    """An entry being absorbed: its state, its context memory (None when the model keeps none),
    the sums of each adapted layer's inputs (its gates) and its lexical embedding, all from the
    one context pass that absorbs it. `encode` takes any number of token chunks per call (so a
    server absorbs a long document a few chunks at a time, between decode steps, in its model
    thread); Library.commit writes it."""

    def __init__(self, model):
        self.model = model
        self.state = model.new_state()
        self.memory = model.new_memory()
        self.inputs: dict[str, torch.Tensor] = {}  # layer name -> (d_in,) sum of inputs
        self.bag = embedding.LexicalBag(model)

    def encode(self, chunks: Iterable[list[int]], progress: bool = False) -> None:
        """Absorb token chunks (each of 1..max_positions ids) as model.encode_chunks does;
        raises ValueError for a chunk of another length (the draft is then unchanged). Count a
        finished document with `state.documents += 1`: the memory's chunks belong to the
        document being absorbed, `state.documents` (0-based)."""
        part = self.model.new_memory() if self.memory is not None else None
        with bound(self.model.binding, input_sums=self.inputs, on_hidden=self.bag.add):
            self.state.add_(self.model.encode_chunks(chunks, progress=progress, memory=part))
        if part is not None:
            for chunk in part.chunks:
                chunk.document = self.state.documents
            self.memory.chunks.extend(part.chunks)
            self.memory.version += 1

    def write(self, folder: Path) -> dict:
        """Write the entry's files into `folder` (write_entry) and return its manifest record
        (Entry's fields but the name). Raises DocumentError when nothing was absorbed."""
        state = self.state
        if not state.tokens:
            raise DocumentError("nothing was absorbed into this entry")
        means = {n: s / state.tokens for n, s in self.inputs.items()}
        memory = self.memory
        if memory is not None:  # its documents, as AdaptedModel.encode counts one document's
            last = max((c.document for c in memory.chunks), default=-1)
            memory.documents = max(state.documents, last + 1)
            memory.version += 1
        write_entry(folder, self.model, state, means, self.bag.vector(), memory)
        return {
            "tokens": state.tokens,
            "chunks": state.chunks,
            "documents": state.documents,
            "added": time.time(),
            "state_sha256": state.checksum(),
            "memory_tokens": memory.tokens if memory is not None else 0,
            "memory_bytes": memory.nbytes if memory is not None else 0,
        }


def write_entry(
    folder: Path,
    model,
    state: AdapterState,
    means: dict[str, torch.Tensor],
    lexical: torch.Tensor,
    memory: ContextMemory | None = None,
) -> None:
    """Save an entry's state and its context memory `memory` (None: none; the saved-session
    format, one checksum over both), its gates (`means`: layer name -> (d_in,) float32 mean
    input), its behaviour embedding (computed here: one forward of the probes under the state)
    and its lexical embedding (`lexical`: (vocab,) float32, the embedding.LexicalBag filled by
    the pass that absorbed the document) into `folder`."""
    meta = {k: getattr(model, k) for k in FINGERPRINTS}
    meta["state_sha256"] = state.checksum()
    gates = AdapterState({n: m.unsqueeze(0) for n, m in means.items()})
    gates.tokens = state.tokens
    Session(model, state, memory=memory).save(folder / STATE_FILE)
    gates.save(folder / GATES_FILE, dict(meta, kind=GATES_KIND))
    vectors = {"behaviour": embedding.behaviour_of_state(model, state), "lexical": lexical}
    for kind, vector in vectors.items():
        stored = AdapterState({kind: vector[None].float()})
        meta_kind = dict(meta, kind=f"library-{kind}", version=_version(kind))
        stored.save(folder / EMBEDDING_FILES[kind], meta_kind)


def copy_entry(src: Path, dst: Path) -> None:
    """Copy an entry's files (read and verified by the caller) from folder `src` to `dst`, each
    atomically. A stored embedding `src` lacks (made before it existed) is removed from `dst`,
    where a crashed add may have left one."""
    for file in (STATE_FILE, GATES_FILE, *EMBEDDING_FILES.values()):
        if (src / file).exists():
            atomic_write(dst / file, (src / file).read_bytes())
        else:
            (dst / file).unlink(missing_ok=True)


def read_gates(folder: Path, model, checksum: str) -> dict[str, torch.Tensor]:
    """The entry's gates (layer name -> (d_in,) float32), verified to be those of the state with
    `checksum` and of `model`. Raises FileNotFoundError, CorruptStateError and
    IncompatibleStateError."""
    file = folder / GATES_FILE
    gates, meta = AdapterState.load(file, device=model.device)
    if meta.get("kind") != GATES_KIND or meta.get("state_sha256") != checksum:
        raise CorruptStateError(f"{file}: not the gates of this entry's state")
    _check_model(file, meta, model)
    shapes = {n: (1, d_in) for n, (d_in, _) in model.generator.shapes.items()}
    if {n: tuple(g.shape) for n, g in gates.sums.items()} != shapes:
        raise IncompatibleStateError(f"{file} holds gates for other layers")
    return {n: g[0] for n, g in gates.sums.items()}


def read_embedding(folder: Path, model, checksum: str, kind: str) -> torch.Tensor | None:
    """The entry's stored embedding of `kind` ("behaviour" or "lexical"), (D,) float32, or None
    when the entry has no such file (made before it existed) or one of another version
    (embedding.BEHAVIOUR_VERSION, LEXICAL_VERSION): the caller recomputes a behaviour embedding
    from the verified state; a lexical one needs the text, which the library does not keep.
    Raises CorruptStateError (damaged, or not this state's) and IncompatibleStateError (another
    model's, or of another size)."""
    file = folder / EMBEDDING_FILES[kind]
    if not file.exists():
        return None
    stored, meta = AdapterState.load(file)
    if meta.get("kind") != f"library-{kind}" or stored.sums.keys() != {kind}:
        raise CorruptStateError(f"{file}: not a {kind} embedding")
    if meta.get("state_sha256") != checksum:
        raise CorruptStateError(f"{file}: not the {kind} embedding of this entry")
    _check_model(file, meta, model)
    if meta.get("version") != _version(kind):
        return None
    vector = stored.sums[kind][0]
    size = embedding.dimension() if kind == "behaviour" else embedding.vocab_size(model)
    if vector.shape != (size,):
        raise IncompatibleStateError(f"{file} holds an embedding of another size")
    return vector


def _version(kind: str) -> str:
    return embedding.BEHAVIOUR_VERSION if kind == "behaviour" else embedding.LEXICAL_VERSION


def _check_model(file: Path, meta: dict, model) -> None:
    for key in FINGERPRINTS:
        if meta.get(key) != getattr(model, key):
            raise IncompatibleStateError(f"{file} was made with another model")


def check_name(name: str) -> None:
    """ValueError unless `name` can name an entry (and its folder)."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ValueError(
            f"entry name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )


def documents(document: object) -> list[object]:
    """add's argument as a list of documents for model.encode (files read as UTF-8)."""
    paths = [document] if isinstance(document, Path) else document
    if isinstance(paths, (list, tuple)) and paths and all(isinstance(p, Path) for p in paths):
        return [p.read_text(encoding="utf-8") for p in paths]
    return [document]


def read_manifest(path: Path) -> dict:
    """The library manifest at `path`, checked for its format, fingerprints and entries (each a
    valid entry name, so no entry can point outside the library). Raises CorruptStateError."""
    try:
        manifest = json.loads(path.read_text())
        ok = manifest.get("format") == FORMAT and isinstance(manifest.get("entries"), dict)
        ok = ok and all(isinstance(manifest.get(k), str) for k in FINGERPRINTS)
        fields = set(Entry.__dataclass_fields__) - {"name"}
        ok = ok and all(
            isinstance(e, dict) and REQUIRED_FIELDS <= e.keys() <= fields and NAME_RE.fullmatch(n)
            for n, e in manifest["entries"].items()
        )
    except (ValueError, AttributeError, UnicodeDecodeError) as e:
        raise CorruptStateError(f"{path}: not a genadapter library manifest ({e})") from e
    if not ok:
        raise CorruptStateError(f"{path}: not a genadapter library manifest")
    return manifest
