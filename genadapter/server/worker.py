"""The one thread that runs the model: continuous batching of chat decoding over sessions, with
document encoding interleaved.

Every forward of the server happens here, because the adapted layers share one binding (the states
of the batch being run). Each turn of the loop admits waiting chats (one batched prefill, merged
into the running batch), runs one decode step for every running chat, each row under its own
session's state, and encodes a few chunks of a waiting document. Tokens go to per-chat queues
that never block, so a slow reader holds up nobody."""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from ..generation import SamplingParams, sample
from ..generation import _eos_ids as end_of_sequence_ids
from ..model import AdaptedModel
from ..state import AdapterState

log = logging.getLogger(__name__)


@dataclass
class Finished:
    """The last item of a chat's token queue: "stop" (end of sequence), "length" (max tokens),
    "cancelled", or "error" with a message."""

    reason: str
    error: str | None = None


@dataclass
class ChatJob:
    prompt: list[int]
    state: AdapterState | None
    params: SamplingParams
    tokens: queue.Queue = field(default_factory=queue.Queue)  # ints, then one Finished
    cancelled: bool = False  # set by the reader (client gone, stop string seen)

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class _Row:
    """A running chat: one row of the batch."""

    job: ChatJob
    rng: torch.Generator | None
    length: int  # real tokens in the KV cache
    produced: int = 0
    next_token: int = 0


@dataclass
class _EncodeJob:
    chunks: deque[list[int]]
    future: Future
    state: AdapterState


class ModelWorker:
    def __init__(self, model: AdaptedModel, max_batch: int = 32, encode_chunks_per_turn: int = 1):
        self.model = model
        self.max_batch = max_batch
        self.encode_chunks_per_turn = encode_chunks_per_turn
        self._inbox: queue.Queue = queue.Queue()
        self._waiting: deque[ChatJob] = deque()
        self._encodes: deque[_EncodeJob] = deque()
        self._rows: list[_Row] = []
        self._admitting = 0  # chats in their prefill, between the waiting queue and the batch
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # (rows, cache length): 1 = real token
        self._eos = end_of_sequence_ids(model)
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="genadapter-model", daemon=True)
        # Decode steps run, rows in them, and the largest batch: how much batching happened.
        self.steps = 0
        self.step_rows = 0
        self.max_rows = 0

    def start(self) -> ModelWorker:
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping = True
        self._inbox.put(None)
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def pending(self) -> int:
        """Chats admitted or waiting, and documents being encoded."""
        queued = self._inbox.qsize() + len(self._waiting) + len(self._encodes)
        return queued + self._admitting + len(self._rows)

    # -- requests (any thread) ----------------------------------------------------------------

    def chat(
        self, prompt: list[int], state: AdapterState | None, params: SamplingParams
    ) -> ChatJob:
        if not prompt:
            raise ValueError("empty prompt")
        job = ChatJob(list(prompt), state, params)
        self._inbox.put(job)
        return job

    def encode(self, chunks: list[list[int]]) -> Future:
        """Future of the state of one document, given as token chunks."""
        job = _EncodeJob(deque(chunks), Future(), self.model.new_state())
        self._inbox.put(job)
        return job.future

    # -- the loop (model thread) --------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stopping:
            idle = not (self._rows or self._waiting or self._encodes)
            self._take_inbox(block=idle)
            if self._stopping:
                break
            running = [r.job for r in self._rows]
            self._guarded(self._admit, running + list(self._waiting)[: self._free_rows()])
            self._guarded(self._decode_step, [r.job for r in self._rows])
            self._encode_turn()
        for row in self._rows:
            row.job.tokens.put(Finished("cancelled"))
        for job in [*self._waiting, *self._drain_inbox()]:
            if isinstance(job, ChatJob):
                job.tokens.put(Finished("cancelled"))
        for enc in self._encodes:
            enc.future.set_exception(RuntimeError("the server is shutting down"))

    def _take_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get() if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        items = [item, *self._drain_inbox()]
        for item in items:
            if isinstance(item, ChatJob):
                self._waiting.append(item)
            elif isinstance(item, _EncodeJob) and item.future.set_running_or_notify_cancel():
                self._encodes.append(item)

    def _drain_inbox(self) -> list:
        items = []
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                return items

    def _free_rows(self) -> int:
        return max(0, self.max_batch - len(self._rows))

    def _guarded(self, step, jobs: list[ChatJob]) -> None:
        """Run one part of a turn; if it fails, fail the chats it touched, including every running
        one (the batch's KV cache is no longer trustworthy), and keep serving."""
        try:
            step()
        except Exception as e:  # one bad request must not take the server down
            log.exception("model worker step failed")
            failed = set(map(id, jobs))
            for job in jobs:
                job.tokens.put(Finished("error", f"{type(e).__name__}: {e}"))
            self._waiting = deque(j for j in self._waiting if id(j) not in failed)
            self._rows, self._cache, self._mask = [], None, None

    def _finish(self, row: _Row, reason: str) -> None:
        row.job.tokens.put(Finished(reason))

    def _sample(self, row: _Row, logits: torch.Tensor) -> bool:
        """Pick the row's next token and send it; False when the row is done."""
        params = row.job.params
        token = sample(logits, params, row.rng)
        if token in self._eos:
            self._finish(row, "stop")
            return False
        row.job.tokens.put(token)
        row.produced += 1
        row.next_token = token
        if row.produced >= params.max_new_tokens:
            self._finish(row, "length")
            return False
        return True

    def _admit(self) -> None:
        """Prefill waiting chats in one left-padded forward and merge them into the batch."""
        take = min(self._free_rows(), len(self._waiting))
        jobs = [j for j in list(self._waiting)[:take] if not self._drop_early(j)]
        self._admitting = len(jobs)
        for _ in range(take):
            self._waiting.popleft()
        try:
            self._prefill(jobs)
        finally:
            self._admitting = 0

    def _prefill(self, jobs: list[ChatJob]) -> None:
        if not jobs:
            return
        dev = self.model.device
        width = max(len(j.prompt) for j in jobs)
        ids = torch.full((len(jobs), width), self.model.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for i, j in enumerate(jobs):
            ids[i, width - len(j.prompt) :] = torch.tensor(j.prompt)
            mask[i, width - len(j.prompt) :] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        cache = DynamicCache()
        with self.model.bind_states([j.state for j in jobs]):
            out = self.model.base(
                input_ids=ids,
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp_min(0),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        rows = [_Row(j, _rng(j.params, dev), len(j.prompt)) for j in jobs]
        keep = [i for i, r in enumerate(rows) if self._sample(r, out.logits[i, -1])]
        if not keep:
            return
        if len(keep) < len(rows):
            cache.batch_select_indices(torch.tensor(keep, device=dev))
            mask = mask[keep]
        self._merge([rows[i] for i in keep], cache, mask)

    def _drop_early(self, job: ChatJob) -> bool:
        if job.cancelled:
            job.tokens.put(Finished("cancelled"))
            return True
        if job.params.max_new_tokens == 0:
            job.tokens.put(Finished("length"))
            return True
        return False

    def _merge(self, rows: list[_Row], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Append new rows (with their own cache) to the running batch, left-padding the shorter
        of the two caches; padded positions are masked out."""
        if not self._rows:
            self._rows, self._cache, self._mask = rows, cache, mask
            return
        old_len, new_len = self._mask.shape[1], mask.shape[1]
        width = max(old_len, new_len)
        for old_layer, new_layer in zip(self._cache.layers, cache.layers):
            for attr in ("keys", "values"):
                a, b = getattr(old_layer, attr), getattr(new_layer, attr)
                setattr(old_layer, attr, torch.cat([_left_pad(a, width), _left_pad(b, width)]))
        self._mask = torch.cat([_left_pad(self._mask, width), _left_pad(mask, width)])
        self._rows = self._rows + rows

    def _decode_step(self) -> None:
        self._drop_rows([i for i, r in enumerate(self._rows) if r.job.cancelled], "cancelled")
        if not self._rows:
            return
        dev = self.model.device
        ids = torch.tensor([[r.next_token] for r in self._rows], device=dev)
        positions = torch.tensor([[r.length] for r in self._rows], device=dev)
        ones = torch.ones((len(self._rows), 1), dtype=self._mask.dtype, device=dev)
        mask = torch.cat([self._mask, ones], dim=1)
        with self.model.bind_states([r.job.state for r in self._rows]):
            out = self.model.base(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=self._cache,
                use_cache=True,
            )
        self._mask = mask
        self.steps += 1
        self.step_rows += len(self._rows)
        self.max_rows = max(self.max_rows, len(self._rows))
        done = []
        for i, row in enumerate(self._rows):
            row.length += 1
            if not self._sample(row, out.logits[i, -1]):
                done.append(i)
        self._drop_rows(done, None)

    def _drop_rows(self, indices: list[int], reason: str | None) -> None:
        """Remove finished rows from the batch; trim cache columns that only padding uses."""
        if not indices:
            return
        if reason is not None:
            for i in indices:
                self._finish(self._rows[i], reason)
        gone = set(indices)
        keep = [i for i in range(len(self._rows)) if i not in gone]
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        self._rows = [self._rows[i] for i in keep]
        self._cache.batch_select_indices(torch.tensor(keep, device=self._mask.device))
        self._mask = self._mask[keep]
        first = int(self._mask.any(0).float().argmax())
        if first > 0:
            self._mask = self._mask[:, first:]
            for layer in self._cache.layers:
                layer.keys = layer.keys[:, :, first:]
                layer.values = layer.values[:, :, first:]

    def _encode_turn(self) -> None:
        if not self._encodes:
            return
        job = self._encodes.popleft()
        try:
            n = min(self.encode_chunks_per_turn, len(job.chunks))
            part = [job.chunks.popleft() for _ in range(n)]
            job.state.add_(self.model.encode_chunks(part))
        except Exception as e:
            log.exception("encoding a document failed")
            job.future.set_exception(e)
            return
        if job.chunks:
            self._encodes.append(job)  # round robin between documents
            return
        job.state.documents = 1
        job.future.set_result(job.state)


def _rng(params: SamplingParams, device) -> torch.Generator | None:
    if params.temperature == 0:
        return None
    rng = torch.Generator(device=device)
    rng.manual_seed(params.seed if params.seed is not None else torch.seed())
    return rng


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """Pad dim 2 (KV cache: batch, heads, time, dim) or dim 1 (mask: batch, time) on the left."""
    dim = 2 if t.dim() == 4 else 1
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)
