"""The one thread that runs the model: continuous batching of chat decoding over sessions, with
document encoding interleaved.

Every forward of the server happens here, because the adapted layers share one binding (the states
of the batch being run). Each turn of the loop admits waiting chats (one batched prefill, merged
into the running batch), runs one decode step for every running chat, each row under its own
session's state and reading its own session's context memory (a memory_read.Layout prompt, whose
prefill generation.prefill runs for rows with different memories at once), and encodes a few
chunks of a waiting document (its state and memory). Tokens go to per-chat queues
that never block, so a slow reader holds up nobody.

A failure ends only the chat whose computation failed: a row's seed, logit adjustments and
sampling are computed row by row (sampling.py); a failed batched forward is retried (prefill) or
probed (decode) one row at a time, so one bad request never ends another user's answer."""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from ..generation import SamplingParams, cache_kwargs, prefill
from ..generation import _eos_ids as end_of_sequence_ids
from ..memory import ContextMemory
from ..memory_read import Layout
from ..model import AdaptedModel
from ..state import AdapterState
from . import kvcache
from .encodes import EncodeJob, encode_turn
from .routed import RoutedChats
from .sampling import ChatJob, Finished, LogitAdjust, Row
from .uploads import Upload

log = logging.getLogger(__name__)

__all__ = ["ChatJob", "Finished", "LogitAdjust", "ModelWorker", "ServerShuttingDown"]


class ServerShuttingDown(RuntimeError):
    """Work that was still queued or running when the worker stopped."""


@dataclass
class _CallJob:
    fn: Callable
    future: Future


class ModelWorker:
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
        library's entries (server/libraries.py). `grammar` (grammar.py) constrains the answer."""
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

    def _free_rows(self) -> int:
        return max(0, self.max_batch - len(self._rows))

    def _guarded(self, step, waiting: list[ChatJob]) -> None:
        """Last resort: failures of single rows are handled where they happen; if a part of the
        turn still fails (a bug), fail the waiting chats it touched and every running one (the
        batch's KV cache is no longer trustworthy), and keep serving."""
        try:
            step()
        except Exception as e:  # one bad request must not take the server down
            log.exception("model worker step failed")
            touched = {id(j): j for j in [*waiting, *(r.job for r in self._rows)]}
            for job in touched.values():
                job.fail(e)
            self._waiting = deque(j for j in self._waiting if id(j) not in touched)
            self._rows, self._cache, self._mask = [], None, None

    def _sample(self, row: Row, logits: torch.Tensor) -> bool:
        """Pick the row's next token and send it; False when the row is done. A failure here
        (a seed or temperature no validation caught, say) ends this row only."""
        try:
            token = row.pick(logits)
        except Exception as e:
            log.exception("sampling a chat's next token failed")
            row.job.fail(e)
            return False
        if token in self._eos:
            row.job.tokens.put(Finished("stop"))
            return False
        row.job.tokens.put(token)
        row.produced += 1
        row.next_token = token
        if row.produced >= row.job.params.max_new_tokens:
            row.job.tokens.put(Finished("length"))
            return False
        return True

    def _admit(self) -> None:
        """Prefill waiting chats in one left-padded forward and merge them into the batch."""
        take = min(self._free_rows(), len(self._waiting))
        jobs = [self._waiting.popleft() for _ in range(take)]
        rows = [row for job in jobs if not self._drop_early(job) and (row := self._start(job))]
        self._admitting = len(rows)
        try:
            self._prefill(rows)
        finally:
            self._admitting = 0

    def _start(self, job: ChatJob) -> Row | None:
        try:
            return Row.start(job, self.vocab_size, self.model.device)
        except Exception as e:  # the seed, say: this chat fails, the others are admitted
            log.exception("a chat's sampling settings failed")
            job.fail(e)
            return None

    def _drop_early(self, job: ChatJob) -> bool:
        if job.cancelled:
            job.tokens.put(Finished("cancelled"))
            return True
        if job.params.max_new_tokens == 0:
            job.tokens.put(Finished("length"))
            return True
        return False

    def _prefill(self, rows: list[Row]) -> None:
        """One forward over the rows' prompts; if it fails, each row is retried alone, so only
        the rows that fail alone fail. The running batch is not touched until the merge."""
        if not rows:
            return
        try:
            cache, mask, logits = self._prefill_forward([r.job for r in rows])
        except Exception as e:
            if len(rows) == 1:
                log.exception("prefilling a chat failed")
                rows[0].job.fail(e)
                return
            log.warning("a batched prefill failed (%s); retrying its chats one by one", e)
            for row in rows:
                self._prefill([row])
            return
        keep = [i for i, r in enumerate(rows) if self._sample(r, logits[i])]
        if not keep:
            return
        if len(keep) < len(rows):
            cache.batch_select_indices(torch.tensor(keep, device=mask.device))
            mask = mask[keep]
        rows = [rows[i] for i in keep]
        if not self._rows:
            self._rows, self._cache, self._mask = rows, cache, mask
            return
        try:
            self._mask = kvcache.merge(self._cache, self._mask, cache, mask)
        except Exception as e:  # merge changes nothing when it fails
            log.exception("adding chats to the batch failed")
            for row in rows:
                row.job.fail(e)
            return
        self._rows = self._rows + rows

    def _prefill_forward(self, jobs: list[ChatJob]):
        """(KV cache, mask, last logits) of the jobs' prompts, left-padded, each row reading its
        own memory; a row's positions count its memory, so Row.length (len(prompt)) does too."""
        layouts = [
            j.prompt if isinstance(j.prompt, Layout) else Layout([], None, j.prompt) for j in jobs
        ]
        cache = DynamicCache()
        with self.model.bind_states([j.state for j in jobs]):
            mask, logits = prefill(self.model, layouts, cache, logits_to_keep=1)
        return cache, mask, logits[:, -1]

    def _decode_step(self) -> None:
        self._drop_rows([i for i, r in enumerate(self._rows) if r.job.cancelled], "cancelled")
        if not self._rows:
            return
        try:
            mask, logits = self._decode_forward(self._rows, self._cache, self._mask)
        except Exception as e:
            self._after_failed_step(e)
            return
        self._mask = mask
        self.steps += 1
        self.step_rows += len(self._rows)
        self.max_rows = max(self.max_rows, len(self._rows))
        done = []
        for i, row in enumerate(self._rows):
            row.length += 1
            if not self._sample(row, logits[i]):
                done.append(i)
        self._drop_rows(done, None)

    def _decode_forward(self, rows: list[Row], cache: DynamicCache, mask: torch.Tensor):
        dev = self.model.device
        ids = torch.tensor([[r.next_token] for r in rows], device=dev)
        positions = torch.tensor([[r.length] for r in rows], device=dev)
        ones = torch.ones((len(rows), 1), dtype=mask.dtype, device=dev)
        mask = torch.cat([mask, ones], dim=1)
        with self.model.bind_states([r.job.state for r in rows]):
            out = self.model.base(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                **cache_kwargs(self.model.base, cache),
                use_cache=True,
            )
        return mask, out.logits[:, -1]

    def _after_failed_step(self, error: Exception) -> None:
        """A batched decode step failed: undo what it appended to the KV cache, then run each row
        alone on a one-row view of the cache. Rows that fail alone fail; the others go on at the
        next step. If every row succeeds alone, the batch as a whole failed (out of memory, say)
        and its rows fail with the batch's error."""
        log.warning("a batched decode step failed (%s); probing its rows one by one", error)
        kvcache.truncate(self._cache, self._mask.shape[1])
        culprits = []
        for i, row in enumerate(self._rows):
            try:
                self._decode_forward(
                    [row], kvcache.row_cache(self._cache, i), self._mask[i : i + 1]
                )
            except Exception as e:
                log.exception("a chat's decode step failed")
                row.job.fail(e)
                culprits.append(i)
        if not culprits:
            for row in self._rows:
                row.job.fail(error)
            culprits = list(range(len(self._rows)))
        self._drop_rows(culprits, None)

    def _drop_rows(self, indices: list[int], reason: str | None) -> None:
        """Remove finished rows from the batch; trim cache columns that only padding uses."""
        if not indices:
            return
        if reason is not None:
            for i in indices:
                self._rows[i].job.tokens.put(Finished(reason))
        gone = set(indices)
        keep = [i for i in range(len(self._rows)) if i not in gone]
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        self._rows = [self._rows[i] for i in keep]
        self._mask = kvcache.select(self._cache, self._mask, keep)

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
