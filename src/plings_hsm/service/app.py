"""The HSM service: a FastAPI app over one key backend, served over TLS only."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any, NoReturn

import base58
import structlog
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from plings_hsm import __version__
from plings_hsm.backends.base import WALLET_FINGERPRINT_HEADER, KeyBackend, Signature
from plings_hsm.core.batch import check_instance_range
from plings_hsm.core.path import BatchPrefix, IdentifierPath
from plings_hsm.errors import (
    AuthenticationError,
    InvalidRequestError,
    RateLimitedError,
    TokenUnavailableError,
    WalletNotFoundError,
)
from plings_hsm.service.auth import ApiClient, Authenticator
from plings_hsm.service.config import ServiceConfig
from plings_hsm.service.errors import install_error_handlers
from plings_hsm.service.middleware import (
    BodyLimitMiddleware,
    ClientGateMiddleware,
    CorsMiddleware,
    RequestContextMiddleware,
)
from plings_hsm.service.ratelimit import RateLimiter
from plings_hsm.service.schemas import (
    DeriveKeysRequest,
    DeriveKeysResponse,
    ErrorResponse,
    HealthResponse,
    SignRequest,
    SignResponse,
    WalletItem,
)
from plings_hsm.service.streaming import NDJSON_MEDIA_TYPE, ndjson_response, wants_ndjson

__all__ = ["SIGN_MESSAGE_MAX_BYTES", "ServiceConfig", "create_app"]

log = structlog.get_logger(__name__)

SIGN_MESSAGE_MAX_BYTES = 16 * 1024
"""Largest message ``/api/sign`` signs, in bytes after base64 decoding."""


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


_COMMON_ERRORS: dict[int | str, dict[str, Any]] = {
    429: {
        **_error("Over a budget; `Retry-After` gives the seconds to wait"),
        "headers": {
            "Retry-After": {
                "description": "Whole seconds until the same request fits the budget",
                "schema": {"type": "integer"},
            }
        },
    },
    500: _error("Internal HSM error; the log has the rest under the requestId"),
}

_API_ERRORS: dict[int | str, dict[str, Any]] = {
    401: _error("Missing or invalid API key; the body never says which"),
    403: _error("CORS preflight from an origin not in ALLOWED_ORIGINS"),
    404: _error("Unknown walletVersion"),
    408: _error("The body did not arrive within 30 s"),
    413: _error("Body over the size limit; `error.field` is `body`"),
    422: _error("A field is invalid or over its limit; `error.field` names it"),
    **_COMMON_ERRORS,
    501: _error("This version cannot derive the wallet's scheme; the message names it"),
    503: _error("The token or the state store is unavailable"),
}

_DERIVE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": (
            "The batch. With `Accept: application/x-ndjson`, one key a line as it is "
            "derived; an error after the first line ends the stream with one error line."
        ),
        "content": {NDJSON_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/KeyItem"}}},
    },
    **_API_ERRORS,
}

_bearer = HTTPBearer(
    auto_error=False,
    description="An API key from `plings-hsm apikey create`, or HSM_API_KEY.",
)


def _client(request: Request) -> ApiClient:
    client = getattr(request.state, "api_client", None)
    if not isinstance(client, ApiClient):
        # The gate middleware authenticates every non-public path; this is the backstop.
        raise AuthenticationError("missing or invalid API key")
    return client


def require_client(
    request: Request,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> ApiClient:
    """Return the client the gate middleware authenticated (declares bearer auth in OpenAPI)."""
    return _client(request)


AuthenticatedClient = Annotated[ApiClient, Depends(require_client)]
"""A route parameter that receives the authenticated client."""


def _decode_message(text: str) -> bytes:
    try:
        message = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise InvalidRequestError(
            f"message of {len(text)} characters is not base64 (RFC 4648, padded)",
            field="message",
        ) from exc
    if len(message) > SIGN_MESSAGE_MAX_BYTES:
        raise InvalidRequestError(
            f"message is {len(message)} bytes; the limit is {SIGN_MESSAGE_MAX_BYTES}",
            field="message",
        )
    return message


def _raise_missing_wallet(backend: KeyBackend, wallet: int, exc: WalletNotFoundError) -> NoReturn:
    """Raise WalletNotFoundError for ``wallet``, or TokenUnavailableError when the token
    lists no wallet at all.

    A token that lists no wallet has lost its objects (its folder was removed or
    replaced), so the missing wallet is a token fault, not a client error. The client's
    message leaves out the token label that the backend's message contains. Blocks on
    the token; call it from a worker thread.
    """
    if not backend.wallets():
        raise TokenUnavailableError(
            f"the token lists no wallet any more while looking up a wallet: {exc}"
        ) from exc
    raise WalletNotFoundError(
        f"walletVersion {wallet} not found; GET /health lists the wallets"
    ) from exc


def _derive_wire(
    backend: KeyBackend, prefix: BatchPrefix, start: int, quantity: int
) -> tuple[list[dict[str, object]], str]:
    # The wire dicts go straight to JSON, on the worker thread: base58 encoding and one
    # pydantic model per key would otherwise cost the event loop about as much as the
    # derivation itself.
    try:
        wire = [key.to_wire() for key in backend.derive_keys(prefix, start, quantity)]
        return wire, backend.fingerprint_of(prefix.wallet)
    except WalletNotFoundError as exc:
        _raise_missing_wallet(backend, prefix.wallet, exc)


def _fingerprint(backend: KeyBackend, wallet: int) -> str:
    try:
        return backend.fingerprint_of(wallet)
    except WalletNotFoundError as exc:
        _raise_missing_wallet(backend, wallet, exc)


def _sign(backend: KeyBackend, path: IdentifierPath, message: bytes) -> tuple[Signature, str]:
    try:
        return backend.sign(path, message), backend.fingerprint_of(path.wallet)
    except WalletNotFoundError as exc:
        _raise_missing_wallet(backend, path.wallet, exc)


def create_app(backend: KeyBackend, config: ServiceConfig) -> FastAPI:
    """Build the HSM service app around ``backend``.

    Raises:
        ValueError: when neither a configured key nor a key store is given; the service
            never runs open.
    """
    if not config.api_keys and config.key_store is None:
        raise ValueError(
            "the HSM service needs at least one API key (set HSM_API_KEY or create one "
            "with 'plings-hsm apikey create')"
        )

    app = FastAPI(
        title="plings-hsm",
        version=__version__,
        description="Derives Plings identifier keys from wallet masters held in a PKCS#11 token.",
        docs_url=None,
        redoc_url=None,
    )
    install_error_handlers(app)
    limiter = RateLimiter(config.clock)
    app.state.limiter = limiter
    app.add_middleware(
        BodyLimitMiddleware,
        body_max_bytes=config.body_max_bytes,
        json_depth_max=config.json_depth_max,
        body_timeout_s=config.body_timeout_s,
    )
    app.add_middleware(
        ClientGateMiddleware,
        config=config,
        authenticator=Authenticator(config),
        limiter=limiter,
    )
    app.add_middleware(
        CorsMiddleware,
        limiter=limiter,
        address_budget=config.budget_address_requests_per_minute,
        allow_origins=config.allowed_origins,
        allow_credentials=config.cors_allow_credentials,
    )
    app.add_middleware(RequestContextMiddleware, config=config)

    def charge_keys(request: Request, client: ApiClient, quantity: int) -> None:
        if quantity > client.keys_per_minute:
            raise InvalidRequestError(
                f"quantity {quantity} is more than API key {client.name!r} may derive in a "
                f"minute ({client.keys_per_minute}); split the batch",
                field="quantity",
            )
        charge = limiter.charge(f"keys:{client.key_id}", client.keys_per_minute, quantity)
        if not charge.accepted:
            log.warning(
                "keys_rate_limited",
                request_id=request.state.request_id,
                key_name=client.name,
                quantity=quantity,
                retry_after_s=charge.retry_after_s,
            )
            raise RateLimitedError(
                f"API key {client.name!r} is over its budget of {client.keys_per_minute} keys "
                f"a minute for {quantity} more; retry after {charge.retry_after_s} s",
                charge.retry_after_s,
            )

    @app.get(
        "/health",
        response_model=HealthResponse,
        responses={503: {"model": HealthResponse}, **_COMMON_ERRORS},
    )
    async def health() -> JSONResponse:
        """Report whether the token responds and which wallets it contains; no auth, no secrets.

        A token that responds but lists no wallet can derive nothing, so it is unavailable.
        """
        result = await run_in_threadpool(backend.health)
        healthy = result.ok and bool(result.wallets)
        if result.ok and not healthy:
            log.warning("health_check_failed", backend=result.backend, reason="no_wallet")
        body = HealthResponse(
            status="ok" if healthy else "unavailable",
            backend=result.backend,
            tokenReachable=result.ok,
            wallets=[WalletItem(**wallet.to_wire()) for wallet in result.wallets],  # type: ignore[arg-type]
            version=__version__,
        )
        return JSONResponse(body.model_dump(), status_code=200 if healthy else 503)

    @app.post("/api/derive-keys", response_model=DeriveKeysResponse, responses=_DERIVE_RESPONSES)
    async def derive_keys(
        body: DeriveKeysRequest, request: Request, client: AuthenticatedClient
    ) -> DeriveKeysResponse | Response:
        """Derive ``quantity`` keys of one batch from ``startInstance`` on.

        With ``Accept: application/x-ndjson`` the keys stream one a line as they are
        derived, so a batch never sits whole in memory.
        """
        check_instance_range(body.startInstance, body.quantity, config.quantity_max)
        wallet = config.default_wallet if body.walletVersion is None else body.walletVersion
        prefix = BatchPrefix(wallet, body.manufacturer, body.category, body.classId, body.batch)
        charge_keys(request, client, body.quantity)

        if wants_ndjson(request):
            fingerprint = await run_in_threadpool(_fingerprint, backend, prefix.wallet)
            keys_iter = backend.iter_keys(prefix, body.startInstance, body.quantity)
            try:
                streamed = await ndjson_response(request, keys_iter)
            except WalletNotFoundError as exc:
                await run_in_threadpool(_raise_missing_wallet, backend, prefix.wallet, exc)
            streamed.headers[WALLET_FINGERPRINT_HEADER] = fingerprint
            return streamed
        wire, fingerprint = await run_in_threadpool(
            _derive_wire, backend, prefix, body.startInstance, body.quantity
        )
        request.state.keys_derived = len(wire)
        return JSONResponse(
            {"success": True, "count": len(wire), "keys": wire},
            headers={WALLET_FINGERPRINT_HEADER: fingerprint},
        )

    @app.post("/api/sign", response_model=SignResponse, responses=_API_ERRORS)
    async def sign(
        body: SignRequest, request: Request, response: Response, client: AuthenticatedClient
    ) -> SignResponse:
        """Sign a base64 message with the Ed25519 key of one instance (RFC 8032)."""
        message = _decode_message(body.message)
        wallet = config.default_wallet if body.walletVersion is None else body.walletVersion
        path = IdentifierPath(
            wallet,
            body.manufacturer,
            body.category,
            body.classId,
            body.batch,
            body.instanceNumber,
        )
        charge_keys(request, client, 1)

        signature, fingerprint = await run_in_threadpool(_sign, backend, path, message)
        request.state.keys_derived = 1
        response.headers[WALLET_FINGERPRINT_HEADER] = fingerprint
        log.info(
            "message_signed",
            request_id=request.state.request_id,
            key_name=client.name,
            path=path.hd_path,
            message_bytes=len(message),
        )
        return SignResponse(
            publicKey=base58.b58encode(signature.public_key).decode("ascii"),
            signature=base64.b64encode(signature.signature).decode("ascii"),
        )

    return app
