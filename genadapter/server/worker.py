"""The one thread that runs the model: continuous batching of chat decoding over sessions, with
document encoding interleaved.

Every forward of the server happens here, because the adapted layers share one binding (the states
of the batch being run). Each turn of the loop admits waiting chats (one batched prefill, merged
into the running batch), runs one decode step for every running chat, each row under its own
session's state and reading its own session's context memory (a memory_read.Layout prompt, whose
prefill generation.prefill runs for rows with different memories at once), and encodes a few
chunks of a waiting document (its state and memory). Tokens go to per-chat queues
that never block, so a slow reader holds up nobody.

The batch itself (admitting, prefill, decode steps, sampling, and failures that end only the chat
whose computation failed) is batch.py's BatchDecoder, ModelWorker's base."""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from ..generation import SamplingParams
from ..generation import _eos_ids as end_of_sequence_ids
from ..memory import ContextMemory
from ..memory_read import Layout
from ..model import AdaptedModel
from ..state import AdapterState
from .batch import BatchDecoder
from .encodes import EncodeJob, encode_turn
from .routed import RoutedChats
from .sampling import ChatJob, Finished, LogitAdjust, Row
from .uploads import Upload

__all__ = ["ChatJob", "Finished", "LogitAdjust", "ModelWorker", "ServerShuttingDown"]


class ServerShuttingDown(RuntimeError):
    """Work that was still queued or running when the worker stopped."""


@dataclass
class _CallJob:
    fn: Callable
    future: Future


class ModelWorker(BatchDecoder):
    """The model thread: chats batched step by step, documents encoded between the steps."""

    def __init__(self, model: AdaptedModel, max_batch=32, encode_chunks_per_turn=1, max_routed=8):
        self.model = model
        self.max_batch = max_batch
        self.encode_chunks_per_turn = encode_chunks_per_turn
        self._inbox: queue.Queue = queue.Queue()
        self._waiting: deque[ChatJob] = deque()
        self._encodes: deque[EncodeJob] = deque()
        self._calls: deque[_CallJob] = deque()
        self.routed = RoutedChats(self, max_routed)  # chats routed over a library
        self._rows: list[Row] = []
        self._admitting = 0  # chats in their prefill, between the waiting queue and the batch
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # (rows, cache length): 1 = real token
        self._eos = end_of_sequence_ids(model)
        head = model.base.get_output_embeddings()
        self.vocab_size: int = getattr(head, "out_features", None) or model.base.config.vocab_size
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="genadapter-model", daemon=True)
        # Decode steps run, rows in them, and the largest batch: how much batching happened.
        self.steps = 0
        self.step_rows = 0
        self.max_rows = 0

    def start(self) -> ModelWorker:
        """Start the model thread."""
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the model thread; queued and running chats end as cancelled."""
        self._stopping = True
        self._inbox.put(None)
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def pending(self) -> int:
        """Chats admitted or waiting, documents being encoded, and calls waiting."""
        queued = self._inbox.qsize() + len(self._waiting) + len(self._encodes) + len(self._calls)
        return queued + self._admitting + len(self._rows) + len(self.routed)

    # -- requests (any thread) ----------------------------------------------------------------

    def chat(
        self,
        prompt: list[int] | Layout,
        state: AdapterState | None,
        params: SamplingParams,
        adjust: LogitAdjust | None = None,
        routes: dict | None = None,
        grammar: object | None = None,
    ) -> ChatJob:
        """Queue a chat; its tokens, then one Finished, arrive on the job's queue. `prompt` is
        token ids, or a Layout that reads a session's memory (Session.chat_layout). With `routes`
        (Library.routes: layer name -> Routes) and no state, the chat is routed over a library
        (routed.py) instead of running under one state; its Layout reads the memories of the
        library's entries (library_store.py). `grammar` (grammar.py) constrains the answer."""
        if not prompt:
            raise ValueError("empty prompt")
        if routes is not None and state is not None:
            raise ValueError("a chat runs under one state or is routed, not both")
        if isinstance(prompt, Layout) and prompt.read is None:
            prompt = prompt.header + prompt.rest  # nothing read: the plain prompt
        prompt = prompt if isinstance(prompt, Layout) else list(prompt)
        job = ChatJob(prompt, state, params, adjust, routes, grammar)
        self._inbox.put(job)
        return job

    def encode(
        self,
        chunks: list[list[int]],
        memory: ContextMemory | None = None,
        upload: Upload | None = None,
    ) -> Future:
        """Future of the state of one document, given as token chunks; with `memory` (empty,
        model.new_memory()), the document's keys and values fill it, as one document, by the
        time the future is done. With `upload`, its progress is counted, and once its client is
        gone the encoding stops at the next chunk (the future's exception: UploadAbandoned)."""
        job = EncodeJob(deque(chunks), Future(), self.model.new_state(), memory, upload)
        self._inbox.put(job)
        return job.future

    def call(self, fn: Callable) -> Future:
        """Future of `fn()` run whole in the model thread between two decode steps (the chats
        wait): work with forwards of its own (a step of a library add, a search), which must not
        overlap the batch's, as all forwards share the layers' binding. Its exception goes to the
        future."""
        job = _CallJob(fn, Future())
        if self._stopping:
            _shut(job.future)
        else:
            self._inbox.put(job)
        return job.future

    # -- the loop (model thread) --------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stopping:
            idle = not (self._rows or self._waiting or self._encodes or self._calls or self.routed)
            self._take_inbox(block=idle)
            if self._stopping:
                break
            self._guarded(self._admit, list(self._waiting)[: self._free_rows()])
            self._guarded(self._decode_step, [])
            self.routed.turn()
            encode_turn(self.model, self._encodes, self.encode_chunks_per_turn)
            self._call_turn()
        self.routed.stop()
        for row in self._rows:
            row.job.tokens.put(Finished("cancelled"))
        for job in [*self._waiting, *self._drain_inbox()]:
            if isinstance(job, ChatJob):
                job.tokens.put(Finished("cancelled"))
            elif isinstance(job, (EncodeJob, _CallJob)):
                _shut(job.future)
        for enc in [*self._encodes, *self._calls]:  # running: they can no longer be cancelled
            enc.future.set_exception(ServerShuttingDown("the server is shutting down"))

    def _take_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get() if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        items = [item, *self._drain_inbox()]
        for item in items:
            if isinstance(item, ChatJob) and item.routes is not None:
                self.routed.waiting.append(item)
            elif isinstance(item, ChatJob):
                self._waiting.append(item)
            elif isinstance(item, EncodeJob) and item.future.set_running_or_notify_cancel():
                self._encodes.append(item)
            elif isinstance(item, _CallJob) and item.future.set_running_or_notify_cancel():
                self._calls.append(item)

    def _drain_inbox(self) -> list:
        items = []
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                return items

    def _call_turn(self) -> None:
        if self._calls:
            job = self._calls.popleft()
            try:
                job.future.set_result(job.fn())
            except BaseException as e:  # the caller's failure: it goes to the caller alone
                job.future.set_exception(e)


def _shut(future: Future) -> None:
    """Fail a pending `future` with ServerShuttingDown, unless its waiter cancelled it."""
    if future.set_running_or_notify_cancel():
        future.set_exception(ServerShuttingDown("the server is shutting down"))
