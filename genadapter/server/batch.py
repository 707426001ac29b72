"""The batch the model thread (worker.py) decodes: waiting chats admitted with one left-padded
prefill and merged into the running batch, then one decode step at a time for every running row,
each row under its own session's state and reading its own session's context memory, and each
row's next token sampled and sent to its chat.

A failure ends only the chat whose computation failed: a row's seed, logit adjustments and
sampling are computed row by row (sampling.py); a failed batched forward is retried (prefill) or
probed (decode) one row at a time, so one bad request never ends another user's answer.

BatchDecoder is ModelWorker's base: it keeps the batch in the worker's `_rows`, `_cache` and
`_mask`, admits from its `_waiting` queue up to `max_batch` rows, and uses its `model`,
`vocab_size`, `_eos` and `_admitting` (ModelWorker.__init__ sets them all); routed.py reuses its
one-row forwards and sampling."""

from __future__ import annotations

import logging
from collections import deque

import torch
from transformers import DynamicCache

from ..generation import cache_kwargs, prefill
from ..memory_read import Layout
from . import kvcache
from .sampling import ChatJob, Finished, Row

log = logging.getLogger(__name__)


class BatchDecoder:
    """Continuous batching of chat decoding, for ModelWorker (worker.py), its subclass."""

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
