"""The HSM service: a FastAPI app over one key backend, served over TLS only."""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog
from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from plings_hsm import __version__
from plings_hsm.backends.base import KeyBackend
from plings_hsm.core.batch import check_instance_range
from plings_hsm.core.path import BatchPrefix
from plings_hsm.errors import AuthenticationError
from plings_hsm.secrets import Secret
from plings_hsm.service.errors import install_error_handlers
from plings_hsm.service.schemas import (
    DeriveKeysRequest,
    DeriveKeysResponse,
    ErrorResponse,
    HealthResponse,
    KeyItem,
    WalletItem,
)

__all__ = ["ServiceConfig", "create_app"]

log = structlog.get_logger(__name__)

_ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    401: {"model": ErrorResponse, "description": "Missing or invalid API key"},
    404: {"model": ErrorResponse, "description": "Unknown walletVersion"},
    422: {"model": ErrorResponse, "description": "A field is invalid; `error.field` names it"},
    500: {"model": ErrorResponse, "description": "Internal HSM error; see the log by requestId"},
    503: {"model": ErrorResponse, "description": "The token is unavailable"},
}


@dataclass(frozen=True)
class ServiceConfig:
    """What the service needs besides its backend.

    Args:
        api_keys: accepted bearer keys; HSM_API_KEY is one of them.
        default_wallet: walletVersion used when a request omits it.
        quantity_max: largest batch a request may ask for.
    """

    api_keys: tuple[Secret, ...]
    default_wallet: int = 1
    quantity_max: int = 10_000


def _bearer_token(request: Request) -> bytes | None:
    header = request.headers.get("authorization")
    if header is None:
        return None
    # Starlette decodes headers as latin-1; encoding back gives the bytes on the wire.
    raw = header.encode("latin-1")
    scheme, _, token = raw.partition(b" ")
    if scheme.lower() != b"bearer" or not token.strip():
        return None
    return token.strip()


def create_app(backend: KeyBackend, config: ServiceConfig) -> FastAPI:
    """Build the HSM service app around ``backend``.

    Raises:
        ValueError: when no API key is configured; the service never runs open.
    """
    if not config.api_keys:
        raise ValueError("the HSM service needs at least one API key (set HSM_API_KEY)")

    app = FastAPI(
        title="plings-hsm",
        version=__version__,
        description="Derives Plings identifier keys from wallet masters held in a PKCS#11 token.",
    )
    install_error_handlers(app)

    @app.middleware("http")
    async def request_context(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        request_id = uuid.uuid4().hex
        request.state.request_id = request_id
        request.state.keys_derived = 0
        started = time.perf_counter()
        response = await call_next(request)
        response.headers["X-Request-ID"] = request_id
        log.info(
            "request_completed",
            request_id=request_id,
            method=request.method,
            route=request.url.path,
            status=response.status_code,
            keys_derived=request.state.keys_derived,
            duration_ms=round((time.perf_counter() - started) * 1000, 2),
        )
        return response

    def require_api_key(request: Request) -> None:
        token = _bearer_token(request)
        accepted = False
        for key in config.api_keys:
            # Compare against every key so the time does not tell which one matched.
            if token is not None and key.equals(token):
                accepted = True
        if not accepted:
            log.warning(
                "authentication_failed",
                request_id=request.state.request_id,
                client=request.client.host if request.client else "unknown",
                reason="missing" if token is None else "invalid",
            )
            raise AuthenticationError("missing or invalid API key")

    @app.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
    async def health() -> JSONResponse:
        """Report whether the token answers and which wallets it holds; no auth, no secrets."""
        result = await run_in_threadpool(backend.health)
        body = HealthResponse(
            status="ok" if result.ok else "unavailable",
            backend=result.backend,
            tokenReachable=result.ok,
            wallets=[WalletItem(**wallet.to_wire()) for wallet in result.wallets],  # type: ignore[arg-type]
            version=__version__,
        )
        return JSONResponse(body.model_dump(), status_code=200 if result.ok else 503)

    @app.post(
        "/api/derive-keys",
        response_model=DeriveKeysResponse,
        responses=_ERROR_RESPONSES,
        dependencies=[Depends(require_api_key)],
    )
    async def derive_keys(body: DeriveKeysRequest, request: Request) -> DeriveKeysResponse:
        """Derive ``quantity`` keys of one batch from ``startInstance`` on."""
        check_instance_range(body.startInstance, body.quantity, config.quantity_max)
        wallet = config.default_wallet if body.walletVersion is None else body.walletVersion
        prefix = BatchPrefix(wallet, body.manufacturer, body.category, body.classId, body.batch)

        keys = await run_in_threadpool(
            backend.derive_keys, prefix, body.startInstance, body.quantity
        )
        request.state.keys_derived = len(keys)
        items = [KeyItem(**key.to_wire()) for key in keys]  # type: ignore[arg-type]
        return DeriveKeysResponse(count=len(items), keys=items)

    return app
