"""Merging adapters: sessions' states, or LoRAs exported from sessions (or any plain PEFT LoRA).

Methods (TIES: Yadav et al., NeurIPS 2023; DARE: Yu et al., ICML 2024), every one but `sum`
computed by PEFT's own implementation (peft.utils.merge_utils), on each layer's tensors:

* sum              S = sum_i S_i: exactly the state of one session that absorbed every document
                   (states add; see state.py). Takes no weights.
* mean             sum_i w_i S_i / sum_i w_i (w = 1 by default).
* task_arithmetic  sum_i w_i S_i (w = 1 by default).
* ties             trim each S_i to its `density` largest magnitudes, elect each entry's sign by
                   the weighted total, average the weighted entries that agree with it.
* dare_linear      drop each entry at random with probability 1 - density, rescale by 1 / density,
                   then task arithmetic. dare_ties: the same drop, then TIES's sign election.
* magnitude_prune  TIES's trim, then task arithmetic.

Over states, S_i are the r1 x r2 sums of each adapted layer: the adapter reads S through its SVD
normalization, which ignores scale, so `sum`, `mean` and `task_arithmetic` with equal weights
give the same delta. Over LoRAs, S_i are the weight deltas Delta W_i = B_i A_i: the linear
methods concatenate the factors (exact, rank sum_i r_i; PEFT's "cat"), the others merge the full
deltas and factor the result back by SVD to `rank` (PEFT's "ties_svd", "dare_linear_svd", ...).

Sessions also hold a context memory (memory.py): merging sessions (`merge_sessions`, and
`genadapter merge` of saved sessions) gives a session whose state is the merge above and whose
memory is the union of their chunks, documents in the order the sessions are given. With `sum`,
that is exactly one session that absorbed every document."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ..memory import ContextMemory, MemoryFormatError
from ..session import Session, _state_path
from ..state import AdapterState, CorruptStateError, IncompatibleStateError
from .export import LoraAdapter

METHODS = ("sum", "mean", "task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune")
LINEAR = ("sum", "mean", "task_arithmetic")
SIGN_METHODS = ("total", "frequency")


def merge(
    items: Sequence,
    method: str = "sum",
    weights: Sequence[float] | None = None,
    density: float = 0.5,
    majority_sign_method: str = "total",
    seed: int = 0,
    rank: int | None = None,
) -> AdapterState | LoraAdapter:
    """Merge states or LoRAs into one.

    items:   AdapterStates and Sessions (their states) -> an AdapterState; or LoraAdapters and
             paths of PEFT LoRA folders -> a LoraAdapter. Not a mix; at least one.
    method:  one of METHODS (module docstring). weights: one float per item (not for `sum`).
    density: the share of entries TIES / DARE / magnitude pruning keep, in (0, 1].
    majority_sign_method: TIES's sign election, "total" (sum of values) or "frequency".
    seed:    the random drops of DARE (the global torch RNG is left as it was).
    rank:    of a LoRA merged by a non-linear method (default: the sum of the inputs' ranks,
             at most the layer's smaller dimension); the SVD keeps the largest directions.
    Token, chunk and document counts of a merged state are the inputs' sums.

    Raises ValueError for an unknown method, bad weights or density, or items of different
    layers; ImportError when PEFT is not installed (a method other than `sum`)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    if majority_sign_method not in SIGN_METHODS:
        raise ValueError(f"majority_sign_method must be one of {SIGN_METHODS}")
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], not {density}")
    items = [_as_item(x) for x in items]
    if not items:
        raise ValueError("nothing to merge")
    if weights is not None and method == "sum":
        raise ValueError("sum takes no weights; use task_arithmetic or mean for weighted merges")
    w = torch.ones(len(items)) if weights is None else torch.tensor(weights, dtype=torch.float32)
    if w.shape != (len(items),) or not torch.isfinite(w).all():
        raise ValueError(f"weights must be {len(items)} finite numbers, one per item")
    if method == "mean":
        if w.sum().abs() < 1e-12:
            raise ValueError("mean needs weights whose sum is not zero")
        w = w / w.sum()
    kinds = {type(x) for x in items}
    if kinds == {AdapterState}:
        return _merge_states(items, method, w, density, majority_sign_method, seed)
    if kinds == {LoraAdapter}:
        return _merge_loras(items, method, w, density, majority_sign_method, seed, rank)
    raise ValueError("merge states (or sessions) with states, LoRAs with LoRAs, not a mix")


def _as_item(x) -> AdapterState | LoraAdapter:
    if isinstance(x, (AdapterState, LoraAdapter)):
        return x
    if isinstance(x, (str, os.PathLike)):
        return LoraAdapter.load(Path(x))
    if isinstance(getattr(x, "state", None), AdapterState):  # a Session
        return x.state
    raise TypeError(f"cannot merge a {type(x).__name__}: pass states, sessions or LoRAs")


def merge_tensors(
    tensors: list[torch.Tensor],
    method: str,
    weights: torch.Tensor,
    density: float = 0.5,
    majority_sign_method: str = "total",
) -> torch.Tensor:
    """One merge of same-shape float32 tensors with PEFT's merge_utils (`sum` and `mean`: task
    arithmetic, with the weights `merge` prepared). The result has the inputs' shape."""
    if method in LINEAR:
        return sum(w * t for w, t in zip(weights.tolist(), tensors))
    from peft.utils import merge_utils

    weights = weights.to(tensors[0].device)
    if method == "magnitude_prune":
        return merge_utils.magnitude_prune(tensors, weights, density)
    if method == "dare_linear":
        return merge_utils.dare_linear(tensors, weights, density)
    fn = merge_utils.ties if method == "ties" else merge_utils.dare_ties
    return fn(tensors, weights, density, majority_sign_method)


def _merge_states(states, method, weights, density, sign, seed) -> AdapterState:
    names = states[0].sums.keys()
    if any(s.sums.keys() != names for s in states):
        raise ValueError("cannot merge states of different adapted layers")
    if method == "sum":  # bit-for-bit what one session absorbing everything holds
        merged = states[0].clone()
        for s in states[1:]:
            merged.add_(s)
        return merged
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sums = {
            n: merge_tensors([s.sums[n].float() for s in states], method, weights, density, sign)
            for n in names
        }
    counts = [sum(getattr(s, k) for s in states) for k in ("tokens", "chunks", "documents")]
    return AdapterState(sums, *counts)


def _merge_loras(loras, method, weights, density, sign, seed, rank) -> LoraAdapter:
    names = loras[0].weights.keys()
    if any(x.weights.keys() != names for x in loras):
        raise ValueError("cannot merge LoRAs of different modules")
    merged = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in names:
            if method in LINEAR:  # sum_i w_i B_i A_i = [w_1 B_1 ... w_n B_n] [A_1; ...; A_n]
                a = torch.cat([x.weights[name][0].float() for x in loras])
                b = torch.cat([w * x.weights[name][1].float() for w, x in zip(weights, loras)], 1)
                merged[name] = (a, b)
                continue
            delta = merge_tensors([x.delta(name) for x in loras], method, weights, density, sign)
            merged[name] = _factor(delta, rank or sum(x.rank for x in loras))
    info = {"merge": method, "weights": weights.tolist(), "inputs": [x.info for x in loras]}
    if method not in LINEAR:
        info["density"] = density
    return LoraAdapter(merged, loras[0].base, info)


def _factor(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B A the best rank-`rank` approximation of delta (truncated SVD, as PEFT's
    add_weighted_adapter does for its *_svd combinations)."""
    k = min(rank, *delta.shape)
    if not delta.any():  # e.g. an untrained generator's sessions: no SVD needed
        return delta.new_zeros(k, delta.shape[1]), delta.new_zeros(delta.shape[0], k)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return Vh[:k].contiguous(), (U[:, :k] * S[:k]).contiguous()


def merge_sessions(sessions: Sequence[Session], method: str = "sum", **options) -> Session:
    """A new session on the first session's model: its state the `merge` of the sessions' states
    (`method` and `options` as for `merge`), its memory the union of their memories' chunks, the
    documents of each session after those of the sessions before it, and no conversation. The
    inputs are left as they were.

    Raises ValueError for no sessions, sessions of models with other bases or generators, or
    memories stored differently (int8 and float) or encoded after different prefixes."""
    sessions = list(sessions)
    if not sessions or not all(isinstance(s, Session) for s in sessions):
        raise ValueError("merge_sessions takes one or more Sessions")
    model = sessions[0].model
    if len({(s.model.base_fingerprint, s.model.generator_fingerprint) for s in sessions}) > 1:
        raise IncompatibleStateError("the sessions were made with different bases or generators")
    state = merge([s.state for s in sessions], method=method, **options)
    return Session(model, state, memory=union([s.memory for s in sessions]))


def union(memories: Sequence[ContextMemory | None]) -> ContextMemory | None:
    """A new memory holding every chunk of `memories` in order (None entries hold nothing); None
    when all are None. Raises ValueError for memories of different storage or prefix."""
    present = [m for m in memories if m is not None]
    if not present:
        return None
    if len({(m.storage, m.prefix_len) for m in present}) > 1:
        raise ValueError("cannot join memories stored differently or encoded after other prefixes")
    out = ContextMemory(present[0].prefix_len, present[0].storage)
    for m in present:
        out.extend(m)
    return out


def merge_session_files(paths: Sequence, out, method: str = "sum", **options) -> Path:
    """`genadapter merge` of saved sessions: the merged session (state: `merge`; memory: the
    union of the files' memories, in the order of `paths`) saved to `out` (a folder or a
    .safetensors file) without loading a model. Returns the file written.

    Raises FileNotFoundError, CorruptStateError, and IncompatibleStateError for sessions of
    different bases or generators or memories that cannot be joined."""
    loaded = []
    for p in paths:
        tensors: dict = {}
        state, meta = AdapterState.load(_state_path(p), extra=tensors)
        loaded.append((state, meta, _file_memory(p, meta, tensors)))
    keys = ("base_fingerprint", "generator_fingerprint")
    if len({tuple(meta.get(k) for k in keys) for _, meta, _ in loaded}) > 1:
        raise IncompatibleStateError("the sessions were made with different bases or generators")
    merged = merge([state for state, _, _ in loaded], method=method, **options)
    try:
        memory = union([m for _, _, m in loaded])
    except ValueError as e:  # MemoryFormatError among them
        raise IncompatibleStateError(f"the sessions' memories cannot be joined: {e}") from None
    meta = {k: v for k, v in loaded[0][1].items() if k not in ("messages", "created", "memory")}
    meta.update(messages=[], merge=method)
    if memory is not None:
        info = {"storage": memory.storage, "prefix_len": memory.prefix_len}
        meta["memory"] = dict(info, documents=memory.documents)
    path = _state_path(out)
    merged.save(path, meta, extra=memory.tensors() if memory is not None else None)
    return path


def _file_memory(path, meta: dict, tensors: dict) -> ContextMemory | None:
    """The memory a saved session holds (None for a file saved without one), read with the
    shape its own tensors have: a model checks it when the merged session is loaded."""
    info = meta.get("memory")
    if info is None:
        if tensors:
            raise CorruptStateError(f"{path}: memory tensors without their description")
        return None
    keys = tensors.get("memory.keys")
    shape = tuple(keys.shape[i] for i in (0, 1, 3)) if getattr(keys, "ndim", 0) == 4 else (0,) * 3
    try:
        return ContextMemory.from_tensors(
            tensors, int(info["prefix_len"]), str(info["storage"]), int(info["documents"]), shape
        )
    except (MemoryFormatError, KeyError, TypeError, ValueError) as e:
        raise CorruptStateError(f"{path}: {e}") from e
