"""Documents the model thread encodes between decode steps: a few token chunks per turn, round
robin between documents, each into its own state and, when the model keeps one, its own memory
(one document), so running chats wait at most a few chunks' forwards."""

from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass

from ..memory import ContextMemory
from ..state import AdapterState
from .uploads import Upload, UploadAbandoned

log = logging.getLogger(__name__)


@dataclass
class EncodeJob:
    """One document being encoded: its chunks left, the future of its state, and the memory
    (empty when queued) its keys and values go into."""

    chunks: deque[list[int]]
    future: Future
    state: AdapterState
    memory: ContextMemory | None = None
    upload: Upload | None = None  # its upload: progress, and whether its client left


def encode_turn(model, jobs: deque[EncodeJob], chunks_per_turn: int) -> None:
    """Encode up to `chunks_per_turn` chunks of the first job, then put it last; a job done sets
    its future (a failure: its exception, the other jobs go on)."""
    if not jobs:
        return
    job = jobs.popleft()
    try:
        if job.upload is not None:
            job.upload.check()  # the client left: stop here, the document is dropped
        n = min(chunks_per_turn, len(job.chunks))
        part = [job.chunks.popleft() for _ in range(n)]
        job.state.add_(model.encode_chunks(part, memory=job.memory))
        if job.upload is not None:
            job.upload.done += n
    except UploadAbandoned as e:
        job.future.set_exception(e)
        return
    except Exception as e:
        log.exception("encoding a document failed")
        job.future.set_exception(e)
        return
    if job.chunks:
        jobs.append(job)  # round robin between documents
        return
    job.state.documents = 1
    if job.memory is not None:
        job.memory.documents, job.memory.version = 1, job.memory.version + 1
    job.future.set_result(job.state)
