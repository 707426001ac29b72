"""Errors in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, for every failure.

`install_error_handlers` maps each exception the app or the library can raise to a status and a
code; anything else becomes a 500 `internal_error` in the same shape, never a bare text/plain 500.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..state import CorruptStateError, IncompatibleStateError
from ..text import DocumentError
from .resident import MemoryCapExceeded
from .store import MemoryBudgetExceeded, SessionNameTaken, UnknownSession
from .worker import ServerShuttingDown

log = logging.getLogger(__name__)


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

    @app.exception_handler(ServerShuttingDown)
    async def shutting_down(request: Request, e: ServerShuttingDown):
        return error_response(503, str(e), "shutting_down")

    # Starlette runs this one for any exception no handler above took; it then re-raises the
    # exception, so the server log still gets its traceback.
    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        message = f"internal server error ({type(e).__name__}: {e})"
        return error_response(500, message[:1000], "internal_error")
