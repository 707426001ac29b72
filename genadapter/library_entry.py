"""The files of one library entry (library.py): writing them at `add`, reading and verifying them,
and the manifest's checks. Every file is a checksummed AdapterState container written atomically;
the gates and the behaviour embedding are bound to the state's checksum and the model's
fingerprints, so an entry's files cannot be mixed with another's or another model's."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from . import embedding
from .session import Session
from .state import AdapterState, CorruptStateError, IncompatibleStateError

FORMAT = "genadapter-library/1"
STATE_FILE = "state.safetensors"
GATES_FILE = "gates.safetensors"
GATES_KIND = "library-gates"
BEHAVIOUR_FILE = "behaviour.safetensors"
BEHAVIOUR_KIND = "library-behaviour"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
FINGERPRINTS = ("base_fingerprint", "generator_fingerprint")


class NoEntryError(KeyError):
    """The library has no entry of that name."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass
class Entry:
    """One stored document: its name, what was absorbed, when, and its state's checksum."""

    name: str
    tokens: int
    chunks: int
    documents: int
    added: float
    state_sha256: str


def write_entry(folder: Path, model, state: AdapterState, means: dict[str, torch.Tensor]) -> None:
    """Save an entry's state (the saved-session format), its gates (`means`: layer name ->
    (d_in,) float32 mean input) and its behaviour embedding (computed here: one forward of the
    probes under the state) into `folder`."""
    meta = {k: getattr(model, k) for k in FINGERPRINTS}
    meta["state_sha256"] = state.checksum()
    gates = AdapterState({n: m.unsqueeze(0) for n, m in means.items()})
    gates.tokens = state.tokens
    behaviour = AdapterState({"behaviour": embedding.behaviour_of_state(model, state)[None]})
    Session(model, state).save(folder / STATE_FILE)
    gates.save(folder / GATES_FILE, dict(meta, kind=GATES_KIND))
    version = embedding.BEHAVIOUR_VERSION
    behaviour.save(folder / BEHAVIOUR_FILE, dict(meta, kind=BEHAVIOUR_KIND, version=version))


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


def read_behaviour(folder: Path, model, checksum: str) -> torch.Tensor | None:
    """The entry's stored behaviour embedding (D,) float32, or None when the entry has no file
    (made before it existed) or one made with other probes (embedding.BEHAVIOUR_VERSION): the
    caller recomputes it from the verified state. Raises CorruptStateError (damaged, or not this
    state's) and IncompatibleStateError (another model's, or of another size)."""
    file = folder / BEHAVIOUR_FILE
    if not file.exists():
        return None
    stored, meta = AdapterState.load(file)
    if meta.get("kind") != BEHAVIOUR_KIND or stored.sums.keys() != {"behaviour"}:
        raise CorruptStateError(f"{file}: not a behaviour embedding")
    if meta.get("state_sha256") != checksum:
        raise CorruptStateError(f"{file}: not the behaviour embedding of this entry")
    _check_model(file, meta, model)
    if meta.get("version") != embedding.BEHAVIOUR_VERSION:
        return None  # other probes: recomputed from the verified state, as for a missing file
    vector = stored.sums["behaviour"][0]
    if vector.shape != (embedding.dimension(),):
        raise IncompatibleStateError(f"{file} holds an embedding of another size")
    return vector


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
            isinstance(e, dict) and e.keys() == fields and NAME_RE.fullmatch(n)
            for n, e in manifest["entries"].items()
        )
    except (ValueError, AttributeError, UnicodeDecodeError) as e:
        raise CorruptStateError(f"{path}: not a genadapter library manifest ({e})") from e
    if not ok:
        raise CorruptStateError(f"{path}: not a genadapter library manifest")
    return manifest
