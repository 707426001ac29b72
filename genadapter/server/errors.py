"""Errors in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, for every failure.

`install_error_handlers` maps each exception the app or the library can raise to a status and a
code; anything else becomes a 500 `internal_error` in the same shape, never a bare text/plain 500.
"""

from __future__ import annotations

import errno
import logging
import sqlite3

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from ..state import CorruptStateError, IncompatibleStateError
from ..text import DocumentError
from .resident import MemoryCapExceeded
from .store import MemoryBudgetExceeded, SessionNameTaken, UnknownSession
from .uploads import BadIdempotencyKey, UploadAbandoned
from .worker import ServerShuttingDown

log = logging.getLogger(__name__)


# A full disk or an exhausted quota: the storage's failure, not the server's (507).
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def storage_exhausted(e: BaseException | None) -> bool:
    """Whether `e`, or an exception it was raised from, says the disk or the quota is full (an
    OSError with ENOSPC, EDQUOT or EFBIG; SQLite's SQLITE_FULL)."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
            return True
        if (
            isinstance(e, sqlite3.Error)
            and getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
        ):
            return True
        e = e.__cause__ or e.__context__
    return False


def error_response(
    status: int, message: str, code: str | None = None, param=None, headers=None
) -> JSONResponse:
    """A JSON response in OpenAI's error shape."""
    kind = "invalid_request_error" if 400 <= status < 500 else "server_error"
    if status == 401:
        kind = "authentication_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class ApiError(HTTPException):
    """An error the client is told about: status, message, OpenAI-style code and param."""

    def __init__(self, status: int, message: str, code: str | None = None, param=None):
        super().__init__(status, message)
        self.code, self.param = code, param


class BodyTooLarge(ApiError):
    def __init__(self, limit: int):
        super().__init__(413, f"request body is larger than {limit} bytes", "body_too_large")


class LimitBody:
    """ASGI middleware: refuse request bodies over `limit` bytes, announced or streamed."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            response = error_response(413, str(BodyTooLarge(self.limit).detail), "body_too_large")
            return await response(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, limited_receive, send)


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that give every exception a status, a code and the error shape."""

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        code = getattr(e, "code", None)
        if code is None:  # Starlette's own: unknown route, wrong method
            code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        headers = {"WWW-Authenticate": "Bearer"} if e.status_code == 401 else None
        return error_response(
            e.status_code, str(e.detail), code, getattr(e, "param", None), headers
        )

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        if first.get("type") == "json_invalid":
            detail = first.get("ctx", {}).get("error", "")
            return error_response(422, f"malformed JSON body: {detail}", "invalid_json")
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg')}" if where else str(first.get("msg", "invalid"))
        return error_response(422, message, "invalid_body", where or None)

    @app.exception_handler(UnknownSession)
    async def unknown_session(request: Request, e: UnknownSession):
        return error_response(404, "no such session", "session_not_found", "session_id")

    @app.exception_handler(SessionNameTaken)
    async def name_taken(request: Request, e: SessionNameTaken):
        return error_response(409, str(e), "session_name_taken", "name")

    @app.exception_handler(MemoryBudgetExceeded)
    async def over_budget(request: Request, e: MemoryBudgetExceeded):
        return error_response(413, str(e), "memory_budget_exceeded")

    @app.exception_handler(MemoryCapExceeded)
    async def over_cap(request: Request, e: MemoryCapExceeded):
        return error_response(429, str(e), "memory_cap_exceeded", headers={"Retry-After": "1"})

    @app.exception_handler(DocumentError)
    async def bad_document(request: Request, e: DocumentError):
        return error_response(422, str(e), "invalid_document")

    @app.exception_handler(CorruptStateError)
    async def corrupt_state(request: Request, e: CorruptStateError):
        log.error("%s", e)
        return error_response(500, str(e), "corrupt_state")

    @app.exception_handler(IncompatibleStateError)
    async def incompatible_state(request: Request, e: IncompatibleStateError):
        log.error("%s", e)
        message = f"the session's saved state does not fit the model this server runs: {e}"
        return error_response(409, message, "incompatible_session")

    @app.exception_handler(BadIdempotencyKey)
    async def bad_key(request: Request, e: BadIdempotencyKey):
        return error_response(422, str(e), "invalid_header", "Idempotency-Key")

    # A client gone mid-upload: one log line (uploads.py, or here for a body cut short), and a
    # response nobody reads (499, as nginx logs a request its client closed).
    @app.exception_handler(UploadAbandoned)
    async def abandoned(request: Request, e: UploadAbandoned):
        return error_response(499, str(e), "client_closed_request")

    @app.exception_handler(ClientDisconnect)
    async def disconnected(request: Request, e: ClientDisconnect):
        log.warning("%s %s: the client left before its body was read", request.method,
                    request.url.path)  # fmt: skip
        return error_response(499, "the client left", "client_closed_request")

    @app.exception_handler(ServerShuttingDown)
    async def shutting_down(request: Request, e: ServerShuttingDown):
        return error_response(503, str(e), "shutting_down")

    # Storage errors: a full disk is a 507 with one log line; any other is a server bug (a 500
    # with its traceback in the log). Writes are atomic, so a failed one changed nothing.
    async def storage_error(request: Request, e: Exception):
        if storage_exhausted(e):
            log.error("%s %s: out of storage: %s", request.method, request.url.path, e)
            message = f"the server's storage is full ({e}); nothing was changed: retry later"
            return error_response(507, message, "insufficient_storage")
        log.error("%s %s failed", request.method, request.url.path, exc_info=e)
        return internal_response(e)

    app.add_exception_handler(OSError, storage_error)
    app.add_exception_handler(sqlite3.Error, storage_error)

    # Starlette runs this one for any exception no handler above took; it then re-raises the
    # exception, so the server log still gets its traceback.
    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        return internal_response(e)


def internal_response(e: Exception) -> JSONResponse:
    """500 internal_error naming the exception."""
    message = f"internal server error ({type(e).__name__}: {e})"
    return error_response(500, message[:1000], "internal_error")
