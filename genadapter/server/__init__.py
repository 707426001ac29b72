"""`genadapter serve`: sessions that absorb documents, and OpenAI-compatible chat, over HTTP.

store.py keeps sessions (SQLite + safetensors), library_store.py adapter libraries; worker.py
runs the model thread, batch.py its continuous batching, with each chat's row in sampling.py and
the batch's KV cache in kvcache.py, and chats routed over an adapter library in routed.py; app.py
is the FastAPI app, sessions.py and libraries.py its session and adapter-library endpoints,
validation.py its request bodies, chat.py its answers, errors.py its error shape; command.py the
CLI entry. FastAPI is imported only by the app's modules, so the library works
without the [serve] extra."""

from .command import add_serve_parser

__all__ = ["add_serve_parser"]
