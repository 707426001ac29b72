"""Absorb a corpus on a Ray cluster: the state is a sum over chunks, so chunks are encoded by Ray
actors (each holding the model once) and their partial states added on the driver.

    driver: files -> tokens -> numbered chunks -> tasks of whole chunk batches (as absorb
            batches each document), at least `task_chunks` consecutive chunks
    actor:  task -> AdaptedModel.encode_chunks -> partial K^T V sums and the chunks' context
            memory (keys and values, memory.py; the same code as absorb)
    driver: partial states added as they arrive (any order: the sum is order-free); memory
            parts put back in chunk order, each chunk given the document it was cut from

Scheduling and fault tolerance are Ray's: `ray.util.ActorPool` hands tasks to idle actors; an
actor whose process dies is restarted (it loads the model again) and its unfinished task is run
again (`max_restarts`, `max_task_retries`). A task's result reaches the driver once; every
partial state carries the chunk numbers it holds (`ChunkedState.held`) and the reduction refuses
a chunk held twice and checks at the end that every chunk was added exactly once.

Ray is an optional dependency (`pip install genadapter[ray]`); without an address a local
cluster is started, and an existing one is joined with its address ("auto", "HOST:6379" or
"ray://HOST:10001"). Its machines need genadapter and the base model installed."""

from __future__ import annotations

import bisect
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .memory import ContextMemory
from .state import AdapterState
from .text import chunked, token_stream

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'genadapter[ray]'"


class DuplicateChunkError(RuntimeError):
    """A partial state holds a chunk that the sum already holds."""


def _ray():
    try:
        import ray
    except ImportError as e:
        raise ImportError(f"absorbing on Ray needs the ray package: {INSTALL_HINT}") from e
    return ray


@dataclass
class ChunkedState:
    """A state and the numbers of the chunks summed into it, as sorted disjoint [start, stop)
    ranges of the corpus's chunk numbering (chunk i is the i-th chunk the driver cut). `memory`:
    the chunks' context memory in chunk order (RayAbsorber.absorb's result; None when the model
    keeps none)."""

    state: AdapterState
    held: list[tuple[int, int]] = field(default_factory=list)
    memory: ContextMemory | None = None

    @property
    def chunks_held(self) -> int:
        """How many chunks were summed into the state."""
        return sum(stop - start for start, stop in self.held)

    def add_(self, other: ChunkedState) -> ChunkedState:
        """Add another partial state in place. Raises DuplicateChunkError, changing nothing, when
        a chunk of `other` is already held."""
        held = list(self.held)
        for start, stop in other.held:
            held = _insert(held, start, stop)
        self.state.add_(other.state)
        self.held = held
        return self


def _insert(ranges: list[tuple[int, int]], start: int, stop: int) -> list[tuple[int, int]]:
    """`ranges` (sorted, disjoint, merged) with [start, stop) added and neighbours merged."""
    if not start < stop:
        raise ValueError(f"empty chunk range [{start}, {stop})")
    i = bisect.bisect_left(ranges, (start, stop))
    before, after = ranges[i - 1] if i else None, ranges[i] if i < len(ranges) else None
    if (before and before[1] > start) or (after and after[0] < stop):
        raise DuplicateChunkError(f"chunks [{start}, {stop}) overlap chunks already added")
    if before and before[1] == start:
        i, start = i - 1, before[0]
        ranges = ranges[:i] + ranges[i + 1 :]
    if after and after[0] == stop:
        stop = after[1]
        ranges = ranges[:i] + ranges[i + 1 :]
    return ranges[:i] + [(start, stop)] + ranges[i:]


class _Encoder:
    """One Ray actor: loads the model once (genadapter.load(**load_kwargs)) and encodes tasks."""

    def __init__(self, load_kwargs: dict):
        from transformers.utils import logging as hf_logging

        import genadapter

        hf_logging.disable_progress_bar()  # the driver's own bar is the one a person reads
        self.model = genadapter.load(**load_kwargs)

    def info(self) -> dict:
        m = self.model
        return {
            "base_name": m.base_name,
            "base_fingerprint": m.base_fingerprint,
            "generator_fingerprint": m.generator_fingerprint,
            "chunk_tokens": m.chunk_tokens,
            "chunk_batch": m.chunk_batch,
            "state_shapes": m.generator.state_shapes(),
            "memory_storage": m.memory_storage,
            "memory_prefix_len": len(m.encoding_prefix),
            "memory_shape": m.memory_shape,
        }

    def pid(self) -> int:
        return os.getpid()

    def encode(self, start: int, batches: list[tuple[int, list[list[int]]]]) -> tuple:
        """(document number, chunks) batches of the chunks numbered start.., each batch encoded
        as one -> (start, stop, tokens, {layer: float32 (r1, r2) numpy sum}, the chunks' memory,
        each part in its document, in ContextMemory.tensors()'s form: CPU tensors; {} when the
        model keeps none)."""
        memory = self.model.new_memory()
        state = self.model.new_state()
        for document, batch in batches:
            kept = len(memory.chunks) if memory is not None else 0
            state.add_(self.model.encode_chunks(batch, memory=memory))
            if memory is not None:
                for part in memory.chunks[kept:]:
                    part.document = document
        sums = {n: s.cpu().numpy() for n, s in state.sums.items()}
        tensors = memory.tensors() if memory is not None else {}
        return start, start + state.chunks, state.tokens, sums, tensors


@dataclass
class RemoteModel:
    """What a Session needs of a model to save a state made by the actors (Session.save)."""

    base_name: str
    base_fingerprint: str
    generator_fingerprint: str
    chunk_tokens: int


class RayAbsorber:
    """A pool of `workers` Ray actors, each with the model `genadapter.load(**load_kwargs)` gives.

    address:      None starts a local Ray cluster (unless this process already joined one);
                  otherwise an existing cluster's address ("auto", "HOST:6379", "ray://...").
    worker_cpus:  CPUs reserved per actor (torch uses that many threads); worker_gpus likewise.
    workers:      None: as many actors as the cluster's CPUs allow.
    max_restarts: how often a dead actor is restarted; each task is retried as often.
    Use as a context manager, or call close(); raises ImportError without ray."""

    def __init__(
        self,
        load_kwargs: dict,
        workers: int | None = None,
        address: str | None = None,
        worker_cpus: float = 1,
        worker_gpus: float = 0,
        max_restarts: int = 3,
    ):
        from .base import load_tokenizer

        ray = _ray()
        # Before the actors start: the first load of the default base converts it once on this
        # machine, which local actors then read.
        self.tokenizer = load_tokenizer(load_kwargs.get("base"))
        self._started = not ray.is_initialized()
        if self._started:
            ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
        if workers is None:
            workers = max(1, int(ray.cluster_resources().get("CPU", 1) // max(worker_cpus, 1e-9)))
        self.load_kwargs = dict(load_kwargs)
        actor = ray.remote(_Encoder).options(
            num_cpus=worker_cpus,
            num_gpus=worker_gpus,
            max_restarts=max_restarts,
            max_task_retries=max_restarts,
        )
        self.actors = [actor.remote(self.load_kwargs) for _ in range(workers)]
        try:
            self.info = ray.get(self.actors[0].info.remote())
        except Exception:
            self.close()
            raise
        self.model = RemoteModel(
            self.info["base_name"],
            self.info["base_fingerprint"],
            self.info["generator_fingerprint"],
            self.info["chunk_tokens"],
        )

    def __enter__(self) -> RayAbsorber:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """End the actors, and the local cluster if this absorber started it."""
        ray = _ray()
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []
        if self._started:
            ray.shutdown()
            self._started = False

    def pids(self) -> list[int]:
        """The process id of each actor (changes when Ray restarts one)."""
        ray = _ray()
        return ray.get([a.pid.remote() for a in self.actors])

    def tasks(self, documents: Iterable[object], task_chunks: int) -> Iterator[tuple[int, list]]:
        """(first chunk number, [(document number, batch of chunks), ...]) of consecutive chunks
        of the documents, cut exactly as Session.absorb cuts each document and batched as it
        batches them: chunk_batch chunks of one document, counted from its start (a document's
        last batch may be shorter). A task holds whole batches, at least `task_chunks` chunks
        (the last task: what is left), so each chunk is encoded beside the same chunks, with the
        same padding, as in a local absorb."""
        per = self.info["chunk_batch"]
        task: list[tuple[int, list[list[int]]]] = []
        batch: list[list[int]] = []
        number = size = 0  # the task's first chunk number; chunks in its batches

        def close_batch(document: int) -> bool:
            nonlocal batch, size
            task.append((document, batch))
            size, batch = size + len(batch), []
            return size >= task_chunks

        for document, text in enumerate(documents):
            for chunk in chunked(token_stream(self.tokenizer, text), self.info["chunk_tokens"]):
                batch.append(chunk)
                if len(batch) == per and close_batch(document):
                    yield number, task
                    number, task, size = number + size, [], 0
            if batch and close_batch(document):
                yield number, task
                number, task, size = number + size, [], 0
        if task:
            yield number, task

    def absorb(
        self,
        documents: Iterable[object],
        task_chunks: int | None = None,
        progress: bool = True,
        on_result: Callable[[int], None] | None = None,
    ) -> ChunkedState:
        """The summed state of `documents` (each a str, bytes or iterable of pieces, as
        Session.absorb takes it), its chunks encoded by the actors, and their context memory
        (`memory`, None when the model keeps none).

        Equals the state of absorbing each document into one session in this process (with the
        actors' chunk_batch), up to float rounding of the order of the sum, and its memory: the
        same chunks, encoded in the same batches, in the same order, each in the document it came
        from. A task (the unit of work and of retry) holds whole chunk batches, at least
        `task_chunks` chunks (default: one batch); `on_result(n)` is called after the n-th
        partial state was added. Raises DocumentError for a document that is not text (before or
        while encoding: nothing is returned), and Ray's errors when an actor dies more often than
        max_restarts."""
        from ray.util import ActorPool

        task_chunks = task_chunks or self.info["chunk_batch"]
        documents = _counted(documents)
        pool = ActorPool(self.actors)
        pending = self.tasks(documents, task_chunks)
        total = ChunkedState(AdapterState.zeros(self.info["state_shapes"]))
        parts: dict[int, dict] = {}  # first chunk number -> that task's memory tensors
        submitted = 0

        def submit() -> bool:
            nonlocal submitted
            task = next(pending, None)
            if task is None:
                return False
            pool.submit(lambda actor, t: actor.encode.remote(*t), task)
            submitted = task[0] + sum(len(batch) for _, batch in task[1])
            return True

        for _ in range(2 * len(self.actors)):  # one running and one waiting per actor
            if not submit():
                break
        results = 0
        desc = f"absorbing on {len(self.actors)} Ray workers"
        with tqdm(desc=desc, unit="tok", unit_scale=True, disable=not progress) as bar:
            while pool.has_next():
                start, stop, tokens, sums, memory = pool.get_next_unordered()
                submit()
                part = {n: torch.from_numpy(s.copy()) for n, s in sums.items()}  # read-only
                total.add_(ChunkedState(AdapterState(part, tokens, stop - start), [(start, stop)]))
                parts[start] = memory
                bar.update(tokens)
                results += 1
                if on_result is not None:
                    on_result(results)
        if not submitted:
            raise ValueError("no documents to absorb")
        if total.held != [(0, submitted)]:
            raise RuntimeError(f"chunks {total.held} were added, expected [0, {submitted})")
        total.state.documents = documents.count
        total.memory = self._memory(parts, documents.count)
        return total

    def _memory(self, parts: dict[int, dict], documents: int) -> ContextMemory | None:
        """The tasks' memory parts (each chunk already in its document) in chunk order."""
        info = self.info
        if info["memory_storage"] is None:
            return None
        prefix, storage = info["memory_prefix_len"], info["memory_storage"]
        memory = ContextMemory(prefix, storage)
        for start in sorted(parts):
            part = ContextMemory.from_tensors(
                parts[start], prefix, storage, documents, info["memory_shape"]
            )
            memory.chunks += part.chunks
        memory.documents = documents
        memory.version += 1
        return memory

    def absorb_files(self, paths: Iterable[str], **kwargs) -> ChunkedState:
        """`absorb` of UTF-8 text files, one document each (as `genadapter absorb` reads them)."""
        from .chat import read_document

        return self.absorb((read_document(str(p)) for p in paths), **kwargs)


class _counted:
    """An iterable that counts the items taken from it."""

    def __init__(self, items: Iterable[object]):
        self._items = iter(items)
        self.count = 0

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self._items)
        self.count += 1
        return item
