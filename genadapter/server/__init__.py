"""`genadapter serve`: sessions that absorb documents, and OpenAI-compatible chat, over HTTP.

store.py keeps sessions (SQLite + safetensors), worker.py runs the model (continuous batching),
app.py is the FastAPI app, command.py the CLI entry. FastAPI is imported only by app.py, so the
library works without the [serve] extra."""

from .command import add_serve_parser

__all__ = ["add_serve_parser"]
