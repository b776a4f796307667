"""One error shape for every 4xx/5xx: ``{"error": {"code", "message", "details"?}}``.

Routes raise ``ApiError``; FastAPI's validation errors, routing's 404/405 and database outages are
turned into the same shape here. A database that cannot be reached answers 503 with ``Retry-After``
(never a hang: pool acquisition is bounded), and anything unexpected a bare 500 without a trace.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import asyncpg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("vramq.api")

RETRY_AFTER_S = 2

# What an unreachable, restarting or vanished database raises (as opposed to a bad query).
DB_OUTAGE_ERRORS: tuple[type[Exception], ...] = (
    OSError,  # refused, reset, unreachable; TimeoutError (pool acquire, connect) is an OSError too
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,  # class 08 and ConnectionDoesNotExistError
    asyncpg.exceptions.OperatorInterventionError,  # 57: admin shutdown, cannot connect now, crash
    asyncpg.exceptions.InvalidCatalogNameError,  # the database was dropped
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.InterfaceError,  # "connection is closed", pool closing
)

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    411: "length_required",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "too_many_requests",
    500: "internal",
    503: "unavailable",
}


class ErrorDetail(BaseModel):
    code: str
    message: str
    details: dict[str, Any] | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class ApiError(Exception):
    """An error a route means to return: status, a stable machine code, a human message."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers


class DatabaseUnavailable(ApiError):
    def __init__(self, message: str = "the database is unavailable; try again shortly") -> None:
        super().__init__(503, "database_unavailable", message, headers={"Retry-After": str(RETRY_AFTER_S)})


def not_found(what: str = "resource") -> ApiError:
    return ApiError(404, "not_found", f"{what} not found")


def error_response(
    status: int,
    code: str,
    message: str,
    details: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        body["details"] = details
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def _loc(loc: Any) -> str:
    parts = [str(p) for p in loc]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _CODES.get(exc.status_code, "error")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    if exc.status_code == 404 and message == "Not Found":
        message = "no such route"
    return error_response(exc.status_code, code, message, headers=dict(exc.headers or {}) or None)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            return error_response(400, "invalid_json", "the request body is not valid JSON")
        errors.append({"path": _loc(err.get("loc", ())), "message": str(err.get("msg", "invalid"))})
    first = errors[0] if errors else {"path": "", "message": "invalid request"}
    message = f"{first['path']}: {first['message']}" if first["path"] else first["message"]
    return error_response(
        422, "invalid_request", message, details={"path": first["path"], "errors": errors[:20]}
    )


async def _db_outage(request: Request, exc: Exception) -> JSONResponse:
    log.warning("database unavailable: %s: %s", type(exc).__name__, exc)
    err = DatabaseUnavailable()
    return error_response(err.status, err.code, err.message, headers=err.headers)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal", "internal server error")


def install(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    for cls in DB_OUTAGE_ERRORS:
        app.add_exception_handler(cls, _db_outage)
    app.add_exception_handler(Exception, _unexpected)


def is_db_outage(exc: BaseException) -> bool:
    return isinstance(exc, DB_OUTAGE_ERRORS)
