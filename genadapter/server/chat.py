"""A chat job's answer as the client gets it: text read from the job's token queue (in a request
thread, so a slow client holds up nobody), whole or as server-sent events. Either way the job is
cancelled as soon as its client is gone."""

from __future__ import annotations

import asyncio
import json
import logging
import queue
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

from fastapi import Request

from ..generation import stream_text
from .worker import ChatJob, Finished, ModelWorker, ServerShuttingDown

log = logging.getLogger(__name__)

# How often a non-streamed request checks that its client is still connected, in seconds.
DISCONNECT_POLL = 0.25


class GenerationFailed(RuntimeError):
    """The worker ended this chat with an error (its row failed; other chats go on)."""


class Completion:
    """Text pieces of one chat job, read from its token queue (in a request thread)."""

    def __init__(self, job: ChatJob, worker: ModelWorker, tokenizer, stop: list[str]):
        self.job, self.worker, self.tokenizer, self.stop = job, worker, tokenizer, stop
        self.finish_reason: str | None = None
        self.completion_tokens = 0

    def _tokens(self) -> Iterator[int]:
        while True:
            try:
                item = self.job.tokens.get(timeout=5)
            except queue.Empty:
                if not self.worker.alive:
                    raise GenerationFailed("the model worker stopped") from None
                continue
            if isinstance(item, Finished):
                if item.reason == "error":
                    raise GenerationFailed(item.error)
                if item.reason == "cancelled" and not self.job.cancelled:
                    raise ServerShuttingDown("the server is shutting down")
                self.finish_reason = "length" if item.reason == "length" else "stop"
                return
            self.completion_tokens += 1
            yield item

    def pieces(self) -> Iterator[str]:
        """The answer's text, piece by piece, cut at the first stop string."""
        yield from stream_text(self.tokenizer, self._tokens(), self.stop)
        if self.finish_reason is None:  # a stop string ended the text; the model may run on
            self.finish_reason = "stop"
            self.job.cancel()

    def text(self) -> str:
        """The whole answer (blocks until the job ends)."""
        return "".join(self.pieces())


async def whole_text(
    completion: Completion, request: Request, in_thread: Callable[..., Awaitable]
) -> str:
    """The whole answer, read in a thread while this checks that the client is still there; when
    it is gone, the job is cancelled (its batch row freed within a decode step)."""
    task = asyncio.ensure_future(in_thread(completion.text))
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL)
            if not task.done() and not completion.job.cancelled:
                if await request.is_disconnected():
                    log.info("client gone: cancelling its chat")
                    completion.job.cancel()
        return task.result()
    finally:
        completion.job.cancel()


async def stream_events(
    completion: Completion, meta: dict, usage, in_thread: Callable[..., Awaitable]
) -> AsyncIterator[str]:
    """The answer as OpenAI's chat.completion.chunk events, then `data: [DONE]`. A failure after
    the first event becomes an error event; a closed connection cancels the job."""

    def event(delta: dict, finish: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        chunk = {**meta, "object": "chat.completion.chunk", "choices": [choice]}
        return f"data: {json.dumps(chunk)}\n\n"

    pieces = completion.pieces()
    try:
        yield event({"role": "assistant", "content": ""})
        while (piece := await in_thread(next, pieces, None)) is not None:
            yield event({"content": piece})
        yield event({}, completion.finish_reason)
        if usage is not None:
            chunk = {**meta, "object": "chat.completion.chunk", "choices": [], "usage": usage()}
            yield f"data: {json.dumps(chunk)}\n\n"
    except Exception as e:  # the response has started: the error goes in the stream
        if isinstance(e, GenerationFailed):
            error = {"message": f"generation failed: {e}", "code": "generation_failed"}
        elif isinstance(e, ServerShuttingDown):
            error = {"message": str(e), "code": "shutting_down"}
        else:
            log.exception("streaming a chat failed")
            error = {"message": f"internal server error ({type(e).__name__}: {e})"}
            error["code"] = "internal_error"
        error.update(type="server_error", param=None)
        yield f"data: {json.dumps({'error': error})}\n\n"
    finally:
        completion.job.cancel()  # client gone or done: free the batch row
    yield "data: [DONE]\n\n"
