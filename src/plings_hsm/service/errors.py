"""The one place that maps errors to HTTP statuses and error bodies."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from plings_hsm.errors import (
    AuthenticationError,
    ConfigError,
    InvalidPathError,
    InvalidRequestError,
    PayloadTooLargeError,
    PlingsHsmError,
    RateLimitedError,
    StoreError,
    TokenError,
    WalletNotFoundError,
)
from plings_hsm.service.json_body import show_value

__all__ = ["client_message", "error_response", "install_error_handlers", "status_of"]

log = structlog.get_logger(__name__)

UNAUTHORIZED_MESSAGE = "missing or invalid API key"
"""The one 401 message, which does not tell which part of a credential was wrong."""

INTERNAL_MESSAGE = "Internal HSM error"
"""The one 500 message; the log has the rest under the request id."""

_STATUS_BY_ERROR: tuple[tuple[type[PlingsHsmError], int, str], ...] = (
    (AuthenticationError, 401, "unauthorized"),
    (RateLimitedError, 429, "rate_limited"),
    (InvalidPathError, 422, "invalid_path"),
    (PayloadTooLargeError, 413, "payload_too_large"),
    (InvalidRequestError, 422, "invalid_request"),
    (WalletNotFoundError, 404, "wallet_not_found"),
    (TokenError, 503, "token_unavailable"),
    (StoreError, 503, "store_unavailable"),
    (ConfigError, 500, "internal_error"),
)

_CODE_BY_STATUS = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    501: "not_implemented",
    422: "invalid_request",
    429: "rate_limited",
    500: "internal_error",
    503: "token_unavailable",
}


_UNAVAILABLE_MESSAGES: tuple[tuple[type[PlingsHsmError], str], ...] = (
    (TokenError, "token unavailable"),
    (StoreError, "state store unavailable"),
)
"""Client messages of 503 errors by error type. The reason names token labels, variables
and paths, so it goes only to the log."""


def client_message(exc: PlingsHsmError, request_id: str) -> str:
    """Return the message of ``exc`` that a client may see.

    A 503 names only what is unavailable and the request id that finds the reason in
    the log. Other errors are about the request itself, so their message is kept.
    """
    if status_of(exc)[0] != 503:
        return str(exc)
    public = next(
        (text for kind, text in _UNAVAILABLE_MESSAGES if isinstance(exc, kind)),
        "service unavailable",
    )
    return f"{public}; the service log has the reason under request id {request_id}"


def status_of(exc: PlingsHsmError) -> tuple[int, str]:
    """Return the HTTP status and error code of a product error."""
    for error_type, status, code in _STATUS_BY_ERROR:
        if isinstance(exc, error_type):
            return status, code
    return 500, "internal_error"


def _request_id(request: Request) -> str:
    return str(getattr(request.state, "request_id", "unknown"))


def error_response(
    request: Request,
    status: int,
    message: str,
    *,
    code: str | None = None,
    field: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """Build the error body ``{success: false, error: {code, message, field?}, requestId}``."""
    error: dict[str, Any] = {
        "code": code or _CODE_BY_STATUS.get(status, "error"),
        "message": message,
    }
    if field is not None:
        error["field"] = field
    body = {"success": False, "error": error, "requestId": _request_id(request)}
    return JSONResponse(body, status_code=status, headers=dict(headers) if headers else None)


def _field_of(location: tuple[Any, ...]) -> str | None:
    parts = [str(part) for part in location if part != "body"]
    return ".".join(parts) or None


async def _on_product_error(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, PlingsHsmError):
        return await _on_unexpected(request, exc)
    status, code = status_of(exc)
    if status == 401:
        return error_response(
            request, 401, UNAUTHORIZED_MESSAGE, headers={"WWW-Authenticate": "Bearer"}
        )
    if status == 500:
        return await _on_unexpected(request, exc)
    if status == 503:
        log.warning(
            "request_failed",
            request_id=_request_id(request),
            error=type(exc).__name__,
            detail=str(exc),
        )
    field = getattr(exc, "field", None)
    headers = None
    if isinstance(exc, RateLimitedError):
        headers = {"Retry-After": str(exc.retry_after_s)}
    message = client_message(exc, _request_id(request))
    return error_response(request, status, message, code=code, field=field, headers=headers)


async def _on_validation(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, RequestValidationError):
        return await _on_unexpected(request, exc)
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        # The location of a JSON syntax error is a byte offset, not a field.
        message = f"request body is not valid JSON: {first.get('ctx', {}).get('error', 'invalid')}"
        return error_response(request, 422, message, code="invalid_json", field="body")
    field = _field_of(tuple(first.get("loc", ())))
    message = _validation_message(first, field)
    return error_response(request, 422, message, code="invalid_request", field=field)


def _validation_message(error: Mapping[str, Any], field: str | None) -> str:
    """Word one pydantic error: the field, its value cut short, the rule and its limit."""
    kind = error.get("type")
    reason = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    if field is None:
        return f"request body is invalid: {reason}"
    if kind == "missing":
        return f"{field} is missing; it is required"
    if kind == "extra_forbidden":
        return (
            f"{field} is not a field of this request; field names are case-sensitive, "
            "e.g. walletVersion"
        )
    return f"{field} {show_value(error.get('input'))} is invalid: {reason}"


async def _on_http(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, StarletteHTTPException):
        return await _on_unexpected(request, exc)
    return error_response(request, exc.status_code, str(exc.detail), headers=exc.headers)


async def _on_not_implemented(request: Request, exc: Exception) -> JSONResponse:
    # Backends raise NotImplementedError, with a message for the client, for a request this
    # version cannot serve, such as a wallet of a scheme it cannot derive.
    log.warning(
        "request_not_implemented",
        request_id=_request_id(request),
        error=type(exc).__name__,
        path=request.url.path,
    )
    return error_response(
        request, 501, str(exc) or "not implemented in this version", code="not_implemented"
    )


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error(
        "request_failed",
        request_id=_request_id(request),
        error=type(exc).__name__,
        path=request.url.path,
        exc_info=exc,
    )
    return error_response(request, 500, INTERNAL_MESSAGE, code="internal_error")


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that turn every exception into the one error body."""
    app.add_exception_handler(PlingsHsmError, _on_product_error)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(NotImplementedError, _on_not_implemented)
    app.add_exception_handler(Exception, _on_unexpected)
