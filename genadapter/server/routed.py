"""Chats routed over an adapter library (a chat request's `library`), run by the model thread.

In a routed forward every adapted layer mixes, per token, the deltas of the library's top-k
documents (library/routing.py): the binding's `routes`, which apply to the whole forward. The
worker's batch instead gives each row its own state, so a routed chat cannot share its forwards.
Each routed chat therefore runs as a one-row batch of its own, with its own KV cache: a prefill
when it is admitted, then one decode step per worker turn, between the batch's steps. At most
`limit` run at once (each costs a forward per turn); the others wait their turn.

Isolation: a routed chat's prefill, decode step and sampling each fail that chat alone (its
request gets the error), and the routes are bound only for its own forwards, so the batch and the
other routed chats never see them."""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from ..layers import bound
from .sampling import ChatJob, Finished, Row

log = logging.getLogger(__name__)


@dataclass
class _Run:
    row: Row
    cache: DynamicCache
    mask: torch.Tensor  # (1, cache length), all ones: one row has no padding


class RoutedChats:
    """The routed chats of one ModelWorker (worker.py), which calls `turn` once per loop turn
    from the model thread; it reuses the worker's forwards and sampling for one row at a time."""

    def __init__(self, worker, limit: int = 8):
        self.worker = worker
        self.limit = max(1, limit)
        self.waiting: deque[ChatJob] = deque()
        self.runs: list[_Run] = []

    def __len__(self) -> int:
        return len(self.waiting) + len(self.runs)

    def _routing(self, job: ChatJob):
        return bound(self.worker.model.binding, routes=job.routes)

    def turn(self) -> None:
        """Admit waiting chats up to the limit (one prefill each), then one decode step for
        every running one. Never raises: a failure ends the chat it belongs to (and a bug here
        ends the routed chats, never the worker)."""
        try:
            while self.waiting and len(self.runs) < self.limit:
                self._admit(self.waiting.popleft())
            for run in list(self.runs):
                if not self._step(run):
                    self.runs.remove(run)
        except Exception as e:
            log.exception("a turn of the routed chats failed")
            for job in [*self.waiting, *(run.row.job for run in self.runs)]:
                job.fail(e)
            self.waiting.clear()
            self.runs.clear()

    def _admit(self, job: ChatJob) -> None:
        worker = self.worker
        if worker._drop_early(job) or (row := worker._start(job)) is None:
            return
        try:
            with self._routing(job):
                cache, mask, logits = worker._prefill_forward([job])
        except Exception as e:
            log.exception("prefilling a routed chat failed")
            job.fail(e)
            return
        if worker._sample(row, logits[0]):
            self.runs.append(_Run(row, cache, mask))

    def _step(self, run: _Run) -> bool:
        """One decode step of `run`; False when it is done (finished, cancelled or failed)."""
        job = run.row.job
        if job.cancelled:
            job.tokens.put(Finished("cancelled"))
            return False
        try:
            with self._routing(job):
                run.mask, logits = self.worker._decode_forward([run.row], run.cache, run.mask)
        except Exception as e:
            log.exception("a routed chat's decode step failed")
            job.fail(e)
            return False
        run.row.length += 1
        return self.worker._sample(run.row, logits[0])

    def stop(self) -> None:
        """End every routed chat as cancelled (the worker is stopping)."""
        for job in [*self.waiting, *(run.row.job for run in self.runs)]:
            job.tokens.put(Finished("cancelled"))
        self.waiting.clear()
        self.runs.clear()
