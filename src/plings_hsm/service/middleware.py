"""ASGI middleware of the HSM service: request context, client gate, body limits and CORS.

Raw ASGI rather than Starlette's ``BaseHTTPMiddleware``, so that the access log is
written when a streamed body has ended and the limits act before the body is parsed.
Starlette's own ``RequestBodyLimitMiddleware`` returns 413 in plain text without the
limit, and the depth check needs the whole body anyway, so the body limit is here too.
Order, outside in: context, CORS, gate, body limits, then the FastAPI router.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Sequence
from typing import Any

import anyio
import structlog
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from plings_hsm.errors import PlingsHsmError
from plings_hsm.service.auth import Authenticator, bearer_token
from plings_hsm.service.client_address import budget_key, resolve_client
from plings_hsm.service.config import BODY_TIMEOUT_S_DEFAULT, ServiceConfig
from plings_hsm.service.errors import (
    INTERNAL_MESSAGE,
    UNAUTHORIZED_MESSAGE,
    client_message,
    error_response,
    status_of,
)
from plings_hsm.service.json_body import JsonBodyError, parse_json_body
from plings_hsm.service.ratelimit import RateLimiter

__all__ = [
    "PUBLIC_PATHS",
    "SECURITY_HEADERS",
    "BodyLimitMiddleware",
    "ClientGateMiddleware",
    "CorsMiddleware",
    "RequestContextMiddleware",
    "json_depth",
]

log = structlog.get_logger(__name__)

PUBLIC_PATHS = frozenset({"/health"})
"""Paths served without an API key; every other path needs one, the OpenAPI document and
unknown paths too."""

SECURITY_HEADERS: tuple[tuple[str, str], ...] = (
    ("Strict-Transport-Security", "max-age=63072000; includeSubDomains"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    (
        "Content-Security-Policy",
        "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    ),
    ("Cross-Origin-Opener-Policy", "same-origin"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
    ("X-Permitted-Cross-Domain-Policies", "none"),
)
"""Headers on every response; the service serves JSON only, so the policies forbid all else."""

ROUTE_LOG_MAX_CHARS = 120
"""An unmatched path is cut to this length in the access log."""

_JSON_STRING_RE = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_JSON_BRACKET_RE = re.compile(rb"[\[\]{}]")


def json_depth(body: bytes) -> int:
    """Return the deepest nesting of arrays and objects in ``body``, without parsing it.

    String literals are skipped, so brackets inside them do not count. Malformed JSON
    gets a depth too, which may be larger than the parser would see; the parser then
    rejects it anyway.
    """
    depth = deepest = 0
    for match in _JSON_BRACKET_RE.finditer(_JSON_STRING_RE.sub(b'""', body)):
        if match.group() in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth = max(0, depth - 1)
    return deepest


def _state(scope: Scope) -> dict[str, Any]:
    state: dict[str, Any] = scope.setdefault("state", {})
    return state


async def _send_error(
    scope: Scope,
    receive: Receive,
    send: Send,
    status: int,
    message: str,
    *,
    code: str | None = None,
    field: str | None = None,
    headers: dict[str, str] | None = None,
) -> None:
    response = error_response(
        Request(scope), status, message, code=code, field=field, headers=headers
    )
    await response(scope, receive, send)


class _Outcome:
    __slots__ = ("complete", "status")

    def __init__(self) -> None:
        self.status = 0
        self.complete = False


class RequestContextMiddleware:
    """Give each request an id and a client address, add the security headers, log it once.

    Also turns an exception that escapes the app into the one 500 body, with the
    headers, while the response has not started.

    Args:
        app: the next ASGI app.
        config: the service configuration (trusted proxies and their header).
    """

    def __init__(self, app: ASGIApp, config: ServiceConfig) -> None:
        self.app = app
        self.config = config

    def _client_address(self, scope: Scope) -> str:
        peer = scope.get("client")
        peer_host = str(peer[0]) if peer else "unknown"
        headers = Headers(scope=scope)
        return resolve_client(
            peer_host,
            headers.getlist(self.config.proxy_header.value),
            self.config.trusted_proxies,
            self.config.proxy_header,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        request_id = uuid.uuid4().hex
        state = _state(scope)
        state["request_id"] = request_id
        state["keys_derived"] = 0
        state["client_address"] = self._client_address(scope)
        no_store = scope["path"] not in PUBLIC_PATHS
        outcome = _Outcome()
        started = time.perf_counter()

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                outcome.status = int(message["status"])
                headers = MutableHeaders(scope=message)
                headers["X-Request-ID"] = request_id
                for name, value in SECURITY_HEADERS:
                    headers[name] = value
                if no_store:
                    headers["Cache-Control"] = "no-store"
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                outcome.complete = True
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception as exc:
            log.error(
                "request_failed",
                request_id=request_id,
                error=type(exc).__name__,
                path=scope["path"][:ROUTE_LOG_MAX_CHARS],
                exc_info=exc,
            )
            if outcome.status:
                raise
            await _send_error(
                scope, receive, send_with_headers, 500, INTERNAL_MESSAGE, code="internal_error"
            )
        finally:
            self._log_access(scope, outcome, started)

    @staticmethod
    def _log_access(scope: Scope, outcome: _Outcome, started: float) -> None:
        state = _state(scope)
        client = state.get("api_client")
        route = scope.get("route")
        log.info(
            "request_completed",
            request_id=state["request_id"],
            client=state["client_address"],
            key_name=client.name if client is not None else None,
            method=scope["method"],
            route=getattr(route, "path", None) or scope["path"][:ROUTE_LOG_MAX_CHARS],
            status=outcome.status,
            complete=outcome.complete,
            keys_derived=state.get("keys_derived", 0),
            duration_ms=round((time.perf_counter() - started) * 1000, 2),
        )


class ClientGateMiddleware:
    """Authenticate and budget each request before its body is read.

    Public paths cost one request of the client address's budget. Every other path
    needs an API key: the address must be under its failed-authentication budget, the
    key must be active, and the request costs one of the key's requests.

    Args:
        app: the next ASGI app.
        config: the service configuration (budgets).
        authenticator: finds the client of a bearer token.
        limiter: the process's token buckets.
    """

    def __init__(
        self,
        app: ASGIApp,
        config: ServiceConfig,
        authenticator: Authenticator,
        limiter: RateLimiter,
    ) -> None:
        self.app = app
        self.config = config
        self.authenticator = authenticator
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        state = _state(scope)
        address: str = state["client_address"]
        address_key = budget_key(address)
        if scope["path"] in PUBLIC_PATHS:
            charge = self.limiter.charge(
                f"address:{address_key}", self.config.budget_address_requests_per_minute
            )
            if not charge.accepted:
                await self._too_many(
                    scope,
                    receive,
                    send,
                    f"address {address} is over its budget of "
                    f"{self.config.budget_address_requests_per_minute} requests a minute",
                    charge.retry_after_s,
                    budget="address_requests",
                )
                return
            await self.app(scope, receive, send)
            return

        failures = self.limiter.peek(f"auth-failures:{address_key}")
        if not failures.accepted:
            await self._too_many(
                scope,
                receive,
                send,
                f"address {address} is over its budget of "
                f"{self.config.budget_auth_failures_per_minute} failed authentications a minute",
                failures.retry_after_s,
                budget="auth_failures",
            )
            return

        token = bearer_token(Headers(scope=scope).get("authorization"))
        try:
            client = self.authenticator.authenticate_in_memory(token)
            if client is None and token is not None and self.authenticator.uses_store:
                client = await run_in_threadpool(self.authenticator.authenticate, token)
        except PlingsHsmError as exc:
            status, code = status_of(exc)
            log.warning(
                "authentication_unavailable",
                request_id=state["request_id"],
                error=type(exc).__name__,
                detail=str(exc),
            )
            # The store's message names its URL; the client gets only the request id.
            public = client_message(exc, state["request_id"])
            await _send_error(
                scope,
                receive,
                send,
                status,
                f"API keys cannot be checked now: {public}",
                code=code,
            )
            return

        if client is None:
            self.limiter.charge(
                f"auth-failures:{address_key}", self.config.budget_auth_failures_per_minute
            )
            # A fixed shape that fail2ban can match: client first, then the event name.
            log.warning(
                "authentication_failed",
                client=address,
                request_id=state["request_id"],
                reason="missing" if token is None else "invalid",
                path=scope["path"][:ROUTE_LOG_MAX_CHARS],
            )
            await _send_error(
                scope,
                receive,
                send,
                401,
                UNAUTHORIZED_MESSAGE,
                code="unauthorized",
                headers={"WWW-Authenticate": "Bearer"},
            )
            return

        state["api_client"] = client
        charge = self.limiter.charge(f"requests:{client.key_id}", client.requests_per_minute)
        if not charge.accepted:
            await self._too_many(
                scope,
                receive,
                send,
                f"API key {client.name!r} is over its budget of "
                f"{client.requests_per_minute} requests a minute",
                charge.retry_after_s,
                budget="requests",
            )
            return
        await self.app(scope, receive, send)

    async def _too_many(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        message: str,
        retry_after_s: int,
        *,
        budget: str,
    ) -> None:
        state = _state(scope)
        client = state.get("api_client")
        log.warning(
            "request_rate_limited",
            request_id=state["request_id"],
            client=state["client_address"],
            key_name=client.name if client is not None else None,
            budget=budget,
            retry_after_s=retry_after_s,
        )
        await _send_error(
            scope,
            receive,
            send,
            429,
            f"{message}; retry after {retry_after_s} s",
            code="rate_limited",
            headers={"Retry-After": str(retry_after_s)},
        )


class BodyLimitMiddleware:
    """Read the request body up to a byte limit, check that it is strict JSON, replay it.

    A ``Content-Length`` over the limit is rejected before any byte is read; a chunked
    body is counted as it arrives. Both get 413. A body nested too deep gets 422, and a
    body still incomplete after ``body_timeout_s`` gets 408. A body that is not strict
    JSON (see :func:`parse_json_body`) gets 422 naming the field where one can be named,
    because the framework's own parser returned 400 without a field for some of them.

    Args:
        app: the next ASGI app.
        body_max_bytes: largest body accepted.
        json_depth_max: deepest nesting of arrays and objects accepted.
        body_timeout_s: time the whole body may take to arrive.
    """

    def __init__(
        self,
        app: ASGIApp,
        body_max_bytes: int,
        json_depth_max: int,
        body_timeout_s: float = BODY_TIMEOUT_S_DEFAULT,
    ) -> None:
        self.app = app
        self.body_max_bytes = body_max_bytes
        self.json_depth_max = json_depth_max
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.body_max_bytes:
            await self._too_large(scope, receive, send, f"is {int(declared)} bytes")
            return

        body = bytearray()
        more_body = True
        with anyio.move_on_after(self.body_timeout_s) as deadline:
            while more_body:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                if len(body) > self.body_max_bytes:
                    await self._too_large(
                        scope, receive, send, f"is over {self.body_max_bytes} bytes"
                    )
                    return
                more_body = bool(message.get("more_body"))
        if deadline.cancelled_caught:
            log.warning(
                "request_body_timed_out",
                request_id=_state(scope)["request_id"],
                bytes_received=len(body),
                timeout_s=self.body_timeout_s,
            )
            await _send_error(
                scope,
                receive,
                send,
                408,
                f"body not received within {self.body_timeout_s:g} s",
                code="request_timeout",
                field="body",
            )
            return

        depth = json_depth(bytes(body))
        if depth > self.json_depth_max:
            await _send_error(
                scope,
                receive,
                send,
                422,
                f"body nests arrays and objects {depth} deep; the limit is {self.json_depth_max}",
                code="too_deep",
                field="body",
            )
            return

        if body:
            try:
                parse_json_body(bytes(body))
            except JsonBodyError as exc:
                log.info(
                    "request_body_rejected",
                    request_id=_state(scope)["request_id"],
                    code=exc.code,
                    field=exc.field,
                )
                await _send_error(
                    scope, receive, send, 422, str(exc), code=exc.code, field=exc.field
                )
                return

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send, size: str) -> None:
        await _send_error(
            scope,
            receive,
            send,
            413,
            f"body {size}; the limit is {self.body_max_bytes} bytes",
            code="payload_too_large",
            field="body",
        )


class CorsMiddleware(CORSMiddleware):
    """Starlette's CORS middleware, returning the one error body for a rejected preflight.

    Allowed origins are echoed exactly with ``Vary: Origin``; other origins get no
    ``Access-Control-Allow-Origin`` at all. A preflight needs no key, so it costs one
    request of the client address's budget, like ``/health``.

    Args:
        app: the next ASGI app.
        limiter: the process's token buckets.
        address_budget: requests a minute of one client address.
        allow_origins: origins echoed in ``Access-Control-Allow-Origin``.
        allow_credentials: send ``Access-Control-Allow-Credentials: true``.
    """

    def __init__(
        self,
        app: ASGIApp,
        limiter: RateLimiter,
        address_budget: int,
        allow_origins: Sequence[str],
        allow_credentials: bool,
    ) -> None:
        super().__init__(
            app,
            allow_origins=allow_origins,
            allow_methods=("GET", "POST"),
            allow_headers=("Authorization", "Content-Type", "Accept"),
            allow_credentials=allow_credentials,
            expose_headers=("X-Request-ID", "Retry-After"),
        )
        self.limiter = limiter
        self.address_budget = address_budget

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "OPTIONS":
            headers = Headers(scope=scope)
            if "origin" in headers and "access-control-request-method" in headers:
                address = _state(scope)["client_address"]
                charge = self.limiter.charge(f"address:{budget_key(address)}", self.address_budget)
                if not charge.accepted:
                    await _send_error(
                        scope,
                        receive,
                        send,
                        429,
                        f"address {address} is over its budget of {self.address_budget} "
                        f"requests a minute; retry after {charge.retry_after_s} s",
                        code="rate_limited",
                        headers={"Retry-After": str(charge.retry_after_s)},
                    )
                    return
                response = self.preflight_response(request_headers=headers)
                if response.status_code != 200:
                    response = self._rejected(scope, headers, response)
                await response(scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    @staticmethod
    def _rejected(scope: Scope, headers: Headers, starlette_response: Response) -> Response:
        reasons = bytes(starlette_response.body).decode("ascii", "replace")
        kept = {
            name: value
            for name, value in starlette_response.headers.items()
            if name.lower() not in {"content-type", "content-length"}
        }
        return error_response(
            Request(scope),
            403,
            f"CORS preflight from origin {headers['origin']!r} rejected: "
            f"{reasons.removeprefix('Disallowed CORS ')} not allowed",
            code="cors_rejected",
            headers=kept,
        )
