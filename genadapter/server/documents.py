"""A document as the server receives it: the upload's bytes (plain text, JSON or multipart),
then its token chunks, within the server's limits."""

from __future__ import annotations

import re

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from .errors import ApiError
from .validation import DocumentBody


async def read_document(request: Request, max_bytes: int) -> tuple[bytes, str | None, bool]:
    """A document upload's bytes, name, and whether that name is the upload's file name; ApiError
    413 for a document over `max_bytes` (document_too_large)."""
    data, name, from_file = await _read(request, max_bytes)
    if len(data) > max_bytes:
        message = f"document is {len(data)} bytes; the limit is {max_bytes}"
        raise ApiError(413, message, "document_too_large")
    return data, name, from_file


async def _read(request: Request, max_bytes: int) -> tuple[bytes, str | None, bool]:
    """A text/plain (or markdown, octet-stream) body, JSON {"text", "name"}, or a multipart
    `file`; a name given (JSON `name`, `?name=`) comes before the file's. ApiError 415 for another
    content type, 422 for a multipart upload without `file`."""
    kind = request.headers.get("content-type", "text/plain").split(";")[0].strip().lower()
    name = request.query_params.get("name")
    if kind == "application/json":
        try:
            body = DocumentBody.model_validate_json(await request.body())
        except ValidationError as e:
            raise RequestValidationError(e.errors(include_url=False)) from e
        return body.text.encode("utf-8"), body.name or name, False
    if kind == "multipart/form-data":
        form = await request.form(max_part_size=max_bytes + 1)
        upload = form.get("file")
        if isinstance(upload, UploadFile):
            data = await upload.read()
            return data, name or upload.filename, name is None and upload.filename is not None
        if isinstance(upload, str):
            return upload.encode("utf-8"), name, False
        raise ApiError(422, "a multipart upload needs a 'file' field", "missing_file", "file")
    if kind in ("text/plain", "text/markdown", "application/octet-stream"):
        return await request.body(), name, False
    raise ApiError(
        415,
        f'unsupported content type {kind!r}: send text/plain, JSON {{"text": ...}}, '
        "or a multipart file upload",
        "unsupported_media_type",
    )


def tokenize_document(model, data: bytes, limit: int) -> list[list[int]]:
    """The token chunks of a document, as absorbing reads them (model.chunks); ApiError 413
    past `limit` tokens, DocumentError for text that is not UTF-8 or is empty."""
    chunks, tokens = [], 0
    for chunk in model.chunks(data):
        tokens += len(chunk)
        if tokens > limit:
            raise ApiError(413, f"document is over {limit} tokens, the limit", "document_too_large")
        chunks.append(chunk)
    return chunks


def entry_name_of_file(filename: str) -> str | None:
    """An entry name made from an upload's file name: its last path part, each run of other
    characters than letters, digits, '.', '_' and '-' made one '-', leading ones dropped, at most
    128 characters ("my notes.txt" -> "my-notes.txt"); None when nothing is left."""
    base = re.split(r"[\\/]", filename)[-1]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", base)
    name = re.sub(r"^[^A-Za-z0-9]+", "", name)[:128]
    return name or None
