"""A session's adapter state: the running sums S = sum_t K_t^T V_t per adapted layer, their SVD
normalization, and an atomic, checksummed file format."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .polar import RANK_RTOL, TopPolarFactor

log = logging.getLogger(__name__)

FORMAT = "genadapter-state/2"
# Format 1 kept the checksum of the sums alone inside the metadata; it still loads.
LEGACY_FORMAT = "genadapter-state/1"
# Keys of the safetensors header's metadata: the JSON metadata, and the digest of the whole file.
META_KEY = "genadapter"
# Tensors saved beside the sums (a session's context memory, memory.py), under this name prefix.
EXTRA_PREFIX = "memory."
DIGEST_KEY = "genadapter_sha256"


class CorruptStateError(ValueError):
    """A saved state that cannot be trusted: truncated, altered, or not a genadapter state."""


class IncompatibleStateError(ValueError):
    """A saved state made for another base model or generator."""


def _kept(sig: torch.Tensor) -> torch.Tensor:
    return sig > sig[..., :1] * RANK_RTOL


class _PolarFactor(torch.autograd.Function):
    """U V^T of S = U diag(sig) V^T on the kept rank, with a backward that stays finite when
    singular values coincide: the polar factor's derivative divides by sig_i + sig_j, never by
    sig_i - sig_j as the generic SVD backward does."""

    @staticmethod
    def forward(ctx, S: torch.Tensor) -> torch.Tensor:
        # Q is invariant to the scale of S; dividing by max|S| first keeps huge and tiny states
        # inside float32 range.
        scale = S.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(S.dtype).tiny)
        U, sig, Vh = torch.linalg.svd(S / scale, full_matrices=False)
        keep = _kept(sig)
        sig = torch.where(keep, sig, torch.zeros_like(sig))
        U = U * keep.unsqueeze(-2)
        Vh = Vh * keep.unsqueeze(-1)
        ctx.save_for_backward(U, sig, Vh, scale)
        return U @ Vh

    @staticmethod
    def backward(ctx, G: torch.Tensor) -> torch.Tensor:
        U, sig, Vh, scale = ctx.saved_tensors
        with torch.autocast(U.device.type, enabled=False):
            return _PolarFactor._grad(G.to(U.dtype), U, sig, Vh, scale)

    @staticmethod
    def _grad(G, U, sig, Vh, scale):
        V = Vh.mT
        keep = sig > 0
        floor = (sig[..., :1] * RANK_RTOL).clamp_min(torch.finfo(sig.dtype).tiny)
        M = U.mT @ G @ V
        pair = keep.unsqueeze(-1) & keep.unsqueeze(-2)
        denom = (sig.unsqueeze(-1) + sig.unsqueeze(-2)).clamp_min(floor.unsqueeze(-1))
        X = torch.where(pair, (M - M.mT) / denom, torch.zeros_like(M))
        grad = U @ X @ Vh
        # Directions outside the row / column spaces (rectangular or rank-deficient S).
        inv = torch.where(keep, 1.0 / sig.clamp_min(floor), torch.zeros_like(sig))
        GV = G @ V
        grad = grad + (GV - U @ (U.mT @ GV)) * inv.unsqueeze(-2) @ Vh
        UtG = U.mT @ G
        grad = grad + U @ (inv.unsqueeze(-1) * (UtG - (UtG @ V) @ Vh))
        return grad / scale


def normalize_svd(S: torch.Tensor, keep: int | None = None) -> torch.Tensor:
    """S_hat = U V^T: every kept singular value set to 1, so the adapter's scale does not depend on
    how much context was absorbed. S: (..., r1, r2) any float dtype -> float32 of that shape.

    `keep`: only the `keep` largest singular directions (GenerativeAdapter keeps the top 1/8 of
    its r = 1024, arXiv 2411.05877; fastlora's `svd_lowrank`), so the noise directions of a long
    context get no weight; None (or at least min(r1, r2)) keeps every nonzero direction. The
    truncated factor's gradient divides by the gap between the last kept and the first dropped
    singular value, floored at GAP_RTOL of the largest (polar.py). All-zero S gives zero; the
    result is always finite. Raises ValueError for NaN/Inf in S or keep < 1."""
    if not torch.isfinite(S).all():
        raise ValueError("adapter state contains NaN or Inf")
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be a positive number of directions, got {keep}")
    # Always float32, also under a bfloat16 autocast: S_hat is small and its SVD must be exact.
    with torch.autocast(S.device.type, enabled=False):
        if keep is None or keep >= min(S.shape[-2:]):
            return _PolarFactor.apply(S.float())
        return TopPolarFactor.apply(S.float(), keep)


class AdapterState:
    """Per adapted layer, the r1 x r2 sum S of K^T V over every absorbed token (float32)."""

    def __init__(
        self,
        sums: dict[str, torch.Tensor],
        tokens: int = 0,
        chunks: int = 0,
        documents: int = 0,
    ):
        self.sums = sums
        self.tokens = tokens
        self.chunks = chunks
        self.documents = documents
        self._normalized: dict[str, torch.Tensor] | None = None
        self._derived: dict[str, object] = {}

    @classmethod
    def zeros(cls, shapes: dict[str, tuple[int, int]], device=None) -> AdapterState:
        return cls(
            {n: torch.zeros(s, dtype=torch.float32, device=device) for n, s in shapes.items()}
        )

    @property
    def is_empty(self) -> bool:
        return self.tokens == 0

    @property
    def nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.sums.values())

    def clone(self) -> AdapterState:
        return AdapterState(
            {n: s.clone() for n, s in self.sums.items()}, self.tokens, self.chunks, self.documents
        )

    def add_(self, other: AdapterState) -> AdapterState:
        """In-place sum: states of separately absorbed text combine by addition."""
        if other.sums.keys() != self.sums.keys():
            raise ValueError("cannot add states of different adapted layers")
        for n, s in other.sums.items():
            self.sums[n].add_(s.to(self.sums[n].device))
        self.tokens += other.tokens
        self.chunks += other.chunks
        self.documents += other.documents
        self._normalized = None
        self._derived.clear()
        return self

    def normalized(self, normalize=None) -> dict[str, torch.Tensor]:
        """S_hat per layer: `normalize(name, S)` (the generator's; default: normalize_svd for
        every layer). Cached until the state changes; one state serves one generator."""
        if self._normalized is None:
            f = normalize or (lambda name, S: normalize_svd(S))
            self._normalized = {n: f(n, s) for n, s in self.sums.items()}
        return self._normalized

    def derived(self, key: str, make):
        """`make()`, computed once and cached under `key` until the state changes (add_), like
        `normalized`: e.g. the generator's folded deltas for decoding."""
        if key not in self._derived:
            self._derived[key] = make()
        return self._derived[key]

    def forget(self, key: str) -> None:
        """Drop the value `derived` cached under `key` (to bound memory), if any."""
        self._derived.pop(key, None)

    def checksum(self) -> str:
        """SHA-256 of the sums alone (names and float32 values): identifies a state's content."""
        h = hashlib.sha256()
        for name in sorted(self.sums):
            h.update(name.encode())
            h.update(self.sums[name].detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    # -- file format: one safetensors file; metadata (JSON) in its header ------------------------

    def save(
        self, path: str | os.PathLike, meta: dict, extra: dict[str, torch.Tensor] | None = None
    ) -> None:
        """Write the sums and `meta` (JSON-serializable) atomically to one safetensors file;
        `extra` tensors (names starting with EXTRA_PREFIX: a session's memory) go beside them.

        The header holds the metadata as JSON text (with format and counts added) and a SHA-256
        over that exact text and every tensor's name, dtype, shape and bytes."""
        meta = dict(
            meta, format=FORMAT, tokens=self.tokens, chunks=self.chunks, documents=self.documents
        )
        meta.pop("checksum", None)
        meta_json = json.dumps(meta)
        tensors = {n: s.detach().cpu().contiguous() for n, s in self.sums.items()}
        for name, t in (extra or {}).items():
            if not name.startswith(EXTRA_PREFIX) or name in tensors:
                raise ValueError(f"extra tensor names must start with {EXTRA_PREFIX!r}: {name}")
            tensors[name] = t.detach().cpu().contiguous()
        header = {META_KEY: meta_json, DIGEST_KEY: _file_digest(meta_json, tensors)}
        atomic_write(Path(path), st_save(tensors, metadata=header))

    @classmethod
    def load(
        cls, path: str | os.PathLike, device=None, extra: dict | None = None
    ) -> tuple[AdapterState, dict]:
        """Read a state saved by `save`; returns it (float32 sums on `device`) and its metadata.

        Raises FileNotFoundError when there is no file, and CorruptStateError when anything
        loaded (metadata or tensors) differs from what was saved, or the file is not a state."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no saved state at {path}")
        return cls.from_bytes(path.read_bytes(), device=device, source=path, extra=extra)

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        device=None,
        source: str | os.PathLike = "state",
        extra: dict | None = None,
    ) -> tuple[AdapterState, dict]:
        """`load` for the bytes of a saved file; `source` names it in error messages. Tensors
        saved as `extra` (checked by the same checksum) are put into the dict `extra` when one is
        given, and ignored otherwise."""
        header = _read_header(data, source)
        meta_json = header.get(META_KEY)
        try:
            meta = json.loads(meta_json)
            version = meta.get("format")
        except (TypeError, ValueError, AttributeError) as e:
            raise CorruptStateError(f"{source}: not a genadapter state file") from e
        if version not in (FORMAT, LEGACY_FORMAT):
            raise CorruptStateError(f"{source}: unknown format {version!r}")
        try:
            tensors = st_load(data)
        except Exception as e:  # safetensors raises its own error types
            raise CorruptStateError(f"{source}: unreadable tensor data ({e})") from e
        altered = CorruptStateError(f"{source}: checksum mismatch, the file was altered or damaged")
        if version == FORMAT and header.get(DIGEST_KEY) != _file_digest(meta_json, tensors):
            raise altered
        counts = [meta.get(k, 0) for k in ("tokens", "chunks", "documents")]
        if any(type(c) is not int or c < 0 for c in counts):
            raise CorruptStateError(f"{source}: token, chunk and document counts must be ints >= 0")
        extras = {n: tensors.pop(n) for n in list(tensors) if n.startswith(EXTRA_PREFIX)}
        if extra is not None:
            extra.update(extras)
        if any(t.dtype != torch.float32 or t.dim() != 2 for t in tensors.values()):
            raise CorruptStateError(f"{source}: sums must be float32 matrices")
        state = cls({n: t.to(device) for n, t in tensors.items()}, *counts)
        if version == LEGACY_FORMAT:  # its checksum covers the sums only
            if state.checksum() != meta.get("checksum"):
                raise altered
            log.warning(
                "%s is in the older format %s, whose checksum does not cover its metadata; "
                "save it again to protect it",
                source,
                LEGACY_FORMAT,
            )
        return state, meta


def _file_digest(meta_json: str, tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the metadata text and each tensor's name, dtype, shape and bytes (sorted by
    name), every field length-prefixed so no two different files hash alike by shifting bytes."""
    h = hashlib.sha256()

    def put(field: bytes) -> None:
        h.update(struct.pack("<Q", len(field)))
        h.update(field)

    put(FORMAT.encode())
    put(meta_json.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        put(name.encode())
        put(f"{t.dtype} {tuple(t.shape)}".encode())
        put(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _read_header(data: bytes, path: str | os.PathLike) -> dict:
    """The safetensors header's __metadata__ (a str -> str mapping)."""
    if len(data) < 8:
        raise CorruptStateError(f"{path}: truncated (only {len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if data[8:9] != b"{":
        raise CorruptStateError(f"{path}: not a genadapter state file")
    if n > len(data) - 8:
        raise CorruptStateError(f"{path}: truncated header")
    try:
        metadata = json.loads(data[8 : 8 + n])["__metadata__"]
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptStateError(f"{path}: not a genadapter state file") from e
    if not isinstance(metadata, dict) or META_KEY not in metadata:
        raise CorruptStateError(f"{path}: not a genadapter state file")
    return metadata


def file_mode() -> int:
    """The mode a plain open() gives a new file under the process's umask (0644 under 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over the target: readers see
    the old file or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file owner-only; give it the permissions a plain open() would.
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
