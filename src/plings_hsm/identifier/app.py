"""The identifier API: the application-facing HTTPS service that derives through the key manager."""

from __future__ import annotations

import hmac
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

import structlog
from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from starlette.concurrency import run_in_threadpool

from plings_hsm import __version__
from plings_hsm.backends.base import BackendHealth
from plings_hsm.core.batch import check_instance_range
from plings_hsm.core.path import BatchPrefix
from plings_hsm.errors import (
    AuthenticationError,
    HsmServiceError,
    KeySourceUnavailableError,
    MigrationStateError,
    RateLimitedError,
)
from plings_hsm.manager.key_manager import KeyManager
from plings_hsm.manager.metrics import ManagerMetrics
from plings_hsm.manager.migration import Runbook
from plings_hsm.manager.rollout import PERCENTAGE_MAX
from plings_hsm.secrets import Secret
from plings_hsm.service.client_address import budget_key
from plings_hsm.service.config import (
    AUTH_FAILURES_PER_MINUTE_DEFAULT,
    BODY_MAX_BYTES_DEFAULT,
    JSON_DEPTH_MAX_DEFAULT,
)
from plings_hsm.service.errors import error_response, install_error_handlers
from plings_hsm.service.middleware import BodyLimitMiddleware
from plings_hsm.service.ratelimit import RateLimiter
from plings_hsm.service.schemas import DeriveKeysRequest, DeriveKeysResponse, KeyItem
from plings_hsm.store.migration import latest_gate_readings, step_stats

__all__ = [
    "KEY_SOURCE_HEADER",
    "IdentifierConfig",
    "IdentifierDeriveRequest",
    "create_identifier_app",
]

log = structlog.get_logger(__name__)

KEY_SOURCE_HEADER = "X-Key-Source"
"""Response header naming the source whose keys were returned: ``env`` or ``hsm``."""

USER_ID_MAX_CHARS = 256
"""Longest ``userId`` accepted."""

HSM_HEALTH_CACHE_S = 2.0
"""How long /health reuses the HSM service's last health result, so frequent probes of
this API do not use up the HSM service's per-address budget for /health."""


@dataclass(frozen=True)
class IdentifierConfig:
    """Settings of the identifier API besides its key manager and runbook.

    Args:
        api_keys: bearer keys of the applications that derive keys.
        admin_api_keys: bearer keys of operators; separate from the client keys.
        quantity_max: largest batch a request may ask for.
        default_wallet: walletVersion used when a request omits it.
        env_master_configured: whether PLINGS_MASTER_KEY was set in this process's
            environment at start, reported on /health for ``validate``.
        body_max_bytes: largest request body (PLINGS_BODY_MAX_BYTES), checked before parsing.
        json_depth_max: deepest JSON nesting (PLINGS_JSON_DEPTH_MAX), checked before parsing.
        auth_failures_per_minute: failed authentications a minute from one address, after
            which the address gets 429 on every keyed path until its budget refills.
    """

    api_keys: tuple[Secret, ...]
    admin_api_keys: tuple[Secret, ...]
    quantity_max: int = 10_000
    default_wallet: int = 1
    env_master_configured: bool = False
    body_max_bytes: int = BODY_MAX_BYTES_DEFAULT
    json_depth_max: int = JSON_DEPTH_MAX_DEFAULT
    auth_failures_per_minute: int = AUTH_FAILURES_PER_MINUTE_DEFAULT


class IdentifierDeriveRequest(DeriveKeysRequest):
    """The HSM service's derive request plus the user id that decides the rollout."""

    model_config = ConfigDict(extra="forbid")

    userId: Annotated[StrictStr, Field(min_length=1, max_length=USER_ID_MAX_CHARS)] | None = (  # noqa: N815 - wire name
        None
    )


class RollbackRequest(BaseModel):
    """An operator's rollback with the reason written into the audit log."""

    model_config = ConfigDict(extra="forbid")
    reason: Annotated[StrictStr, Field(min_length=1, max_length=500)] = "rollback via admin API"


class AdvanceRequest(BaseModel):
    """A rollout step: the new percentage, always given, so no step is skipped unseen."""

    model_config = ConfigDict(extra="forbid")
    percentage: Annotated[StrictInt, Field(ge=1, le=PERCENTAGE_MAX)]


class WhitelistRequest(BaseModel):
    """The complete new whitelist of user ids."""

    model_config = ConfigDict(extra="forbid")
    userIds: list[Annotated[StrictStr, Field(min_length=1, max_length=USER_ID_MAX_CHARS)]]  # noqa: N815 - wire name


def _bearer(request: Request) -> bytes | None:
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, token = header.encode("latin-1").partition(b" ")
    if scheme.lower() != b"bearer" or not token.strip():
        return None
    return token.strip()


def _key_accepted(token: bytes | None, keys: tuple[Secret, ...]) -> bool:
    accepted = False
    for key in keys:
        # Compare against every key so the time does not tell which one matched.
        if token is not None and key.equals(token):
            accepted = True
    return accepted


def _state_body(manager: KeyManager) -> dict[str, object]:
    state = manager.state
    return {
        "mode": state.mode,
        "percentage": state.percentage,
        "whitelistSize": len(state.whitelist),
        "step": state.step,
        "stepNumber": state.step_number,
        "stepStartedAt": state.step_started_at,
        "fallbackEnabled": state.fallback_enabled,
        "envMasterRemoved": state.env_master_removed,
        "expectedFingerprint": state.expected_fingerprint,
        "stateVersion": state.version,
        "updatedBy": state.updated_by,
    }


def _fingerprint_mismatch(
    manager: KeyManager, hsm_health: BackendHealth | None, wallet: int
) -> dict[str, object] | None:
    """Return the wallet and both fingerprints when the HSM shows another than expected."""
    expected = manager.expected_fingerprint(wallet)
    verdict = manager.fingerprint_verdict(wallet)
    actual = None
    if hsm_health is not None:
        actual = next(
            (info.fingerprint for info in hsm_health.wallets if info.version == wallet), None
        )
    if actual is None and verdict is not None:
        actual = verdict.actual
    if (
        expected is None
        or actual is None
        or hmac.compare_digest(expected.encode(), actual.encode())
    ):
        return None
    return {"walletVersion": wallet, "expected": expected, "hsm": actual}


def _install_unavailable_handlers(app: FastAPI) -> None:
    async def unavailable(request: Request, exc: Exception) -> JSONResponse:
        log.warning(
            "request_failed",
            request_id=getattr(request.state, "request_id", "unknown"),
            error=type(exc).__name__,
        )
        return error_response(request, 503, str(exc), code="key_source_unavailable")

    async def conflict(request: Request, exc: Exception) -> JSONResponse:
        return error_response(request, 409, str(exc), code="migration_state_conflict")

    app.add_exception_handler(HsmServiceError, unavailable)
    app.add_exception_handler(KeySourceUnavailableError, unavailable)
    app.add_exception_handler(MigrationStateError, conflict)


def create_identifier_app(
    manager: KeyManager, runbook: Runbook, metrics: ManagerMetrics, config: IdentifierConfig
) -> FastAPI:
    """Build the identifier API around a started key manager.

    Raises:
        ValueError: when no client or no admin API key is configured; the API never runs open.
    """
    if not config.api_keys:
        raise ValueError("the identifier API needs a client API key (PLINGS_IDENTIFIER_API_KEYS)")
    if not config.admin_api_keys:
        raise ValueError("the identifier API needs an admin API key (PLINGS_ADMIN_API_KEY)")

    app = FastAPI(
        title="plings-hsm identifier API",
        version=__version__,
        description="Derives Plings identifier keys through the key manager (env, dual or hsm).",
    )
    install_error_handlers(app)
    _install_unavailable_handlers(app)
    app.add_middleware(
        BodyLimitMiddleware,
        body_max_bytes=config.body_max_bytes,
        json_depth_max=config.json_depth_max,
    )
    limiter = RateLimiter(time.monotonic)

    @app.middleware("http")
    async def request_context(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        request_id = uuid.uuid4().hex
        request.state.request_id = request_id
        started = time.perf_counter()
        response = await call_next(request)
        response.headers["X-Request-ID"] = request_id
        log.info(
            "request_completed",
            request_id=request_id,
            method=request.method,
            route=request.url.path,
            status=response.status_code,
            key_source=response.headers.get(KEY_SOURCE_HEADER, ""),
            duration_ms=round((time.perf_counter() - started) * 1000, 2),
        )
        return response

    def _require(request: Request, keys: tuple[Secret, ...], role: str) -> None:
        address = request.client.host if request.client else "unknown"
        failures_key = f"auth-failures:{budget_key(address)}"
        failures = limiter.peek(failures_key)
        if not failures.accepted:
            raise RateLimitedError(
                f"address {address} is over its budget of {config.auth_failures_per_minute} "
                "failed authentications a minute",
                failures.retry_after_s,
            )
        token = _bearer(request)
        if not _key_accepted(token, keys):
            limiter.charge(failures_key, config.auth_failures_per_minute)
            # A fixed shape that fail2ban can match: client first, then the event name.
            log.warning(
                "authentication_failed",
                client=address,
                request_id=request.state.request_id,
                role=role,
                reason="missing" if token is None else "invalid",
            )
            raise AuthenticationError("missing or invalid API key")

    def require_client(request: Request) -> None:
        _require(request, config.api_keys, "client")

    def require_admin(request: Request) -> None:
        _require(request, config.admin_api_keys, "admin")

    hsm_health_cache: list[tuple[float, BackendHealth]] = []

    async def cached_hsm_health() -> BackendHealth | None:
        hsm = manager.hsm_backend
        if hsm is None:
            return None
        now = time.monotonic()
        if hsm_health_cache and now - hsm_health_cache[0][0] < HSM_HEALTH_CACHE_S:
            return hsm_health_cache[0][1]
        result = await run_in_threadpool(hsm.health)
        hsm_health_cache[:] = [(now, result)]
        return result

    @app.get("/health")
    async def health() -> JSONResponse:
        """Report the mode in force and whether its key sources are reachable; no auth."""
        hsm = manager.hsm_backend
        hsm_health = await cached_hsm_health()
        state = manager.state
        hsm_ok = hsm_health is not None and hsm_health.ok
        serving = manager.serving_source()
        ok = serving == "env" or (serving == "hsm" and hsm_ok)
        mismatch = _fingerprint_mismatch(manager, hsm_health, config.default_wallet)
        status = "ok" if ok else "unavailable"
        if mismatch is not None and state.mode != "env":
            # The HSM contains another master, so never report ready while it may serve.
            ok = False
            status = "fingerprint_mismatch"
        body = {
            "status": status,
            **_state_body(manager),
            "serving": serving if ok else None,
            "envMasterLoaded": manager.env_available,
            "envMasterConfigured": config.env_master_configured,
            "hsm": {
                "configured": hsm is not None,
                "reachable": hsm_ok,
                "fingerprintMismatch": mismatch,
                "wallets": [wallet.to_wire() for wallet in hsm_health.wallets]
                if hsm_health
                else [],
            },
            "version": __version__,
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.post(
        "/api/derive-keys",
        response_model=DeriveKeysResponse,
        dependencies=[Depends(require_client)],
    )
    async def derive_keys(
        body: IdentifierDeriveRequest, request: Request, response: Response
    ) -> DeriveKeysResponse:
        """Derive ``quantity`` keys of one batch; ``X-Key-Source`` names the source that served."""
        check_instance_range(body.startInstance, body.quantity, config.quantity_max)
        wallet = config.default_wallet if body.walletVersion is None else body.walletVersion
        prefix = BatchPrefix(wallet, body.manufacturer, body.category, body.classId, body.batch)

        served = await run_in_threadpool(
            lambda: manager.derive(
                prefix,
                body.startInstance,
                body.quantity,
                user_id=body.userId,
                request_id=request.state.request_id,
            )
        )
        response.headers[KEY_SOURCE_HEADER] = served.source
        items = [KeyItem(**key.to_wire()) for key in served.keys]  # type: ignore[arg-type]
        return DeriveKeysResponse(count=len(items), keys=items)

    @app.get("/metrics", dependencies=[Depends(require_admin)])
    async def export_metrics() -> Response:
        """Export the Prometheus metrics of this instance (admin key)."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/admin/migration", dependencies=[Depends(require_admin)])
    async def migration_state() -> JSONResponse:
        """Return the migration state in force, the current step's counts and recent gates."""
        state = manager.state
        stats = await run_in_threadpool(step_stats, manager.store, state.step_number)
        readings = await run_in_threadpool(latest_gate_readings, manager.store, 5)
        return JSONResponse(
            {
                **_state_body(manager),
                "currentStep": {
                    "served": stats.served,
                    "compared": stats.compared,
                    "matches": stats.matches,
                    "mismatches": stats.mismatches,
                    "hsmErrors": stats.errors,
                    "hsmRateLimited": stats.rate_limited,
                    "fallbacks": stats.fallbacks,
                },
                "gates": [
                    {
                        "step": reading.step,
                        "passed": reading.passed,
                        "compared": reading.compared,
                        "errorRate": reading.error_rate,
                        "p99Ms": reading.p99_ms,
                        "reason": reading.reason,
                        "at": reading.at,
                    }
                    for reading in readings
                ],
            }
        )

    @app.post("/admin/migration/rollback", dependencies=[Depends(require_admin)])
    async def rollback(body: RollbackRequest) -> JSONResponse:
        """Roll every service back to env, as ``plings-hsm rollback`` does."""
        after = await run_in_threadpool(runbook.rollback, body.reason)
        manager.refresh()
        return JSONResponse({"mode": after.mode, "step": after.step, "stateVersion": after.version})

    @app.post("/admin/migration/advance", dependencies=[Depends(require_admin)])
    async def advance(body: AdvanceRequest) -> JSONResponse:
        """Raise the rollout percentage, as ``plings-hsm migrate advance`` does."""
        after = await run_in_threadpool(runbook.advance, body.percentage)
        manager.refresh()
        return JSONResponse(
            {"mode": after.mode, "percentage": after.percentage, "stateVersion": after.version}
        )

    @app.put("/admin/migration/whitelist", dependencies=[Depends(require_admin)])
    async def whitelist(body: WhitelistRequest) -> JSONResponse:
        """Replace the rollout whitelist."""
        after = await run_in_threadpool(runbook.set_whitelist, tuple(body.userIds))
        manager.refresh()
        return JSONResponse({"whitelistSize": len(after.whitelist), "stateVersion": after.version})

    return app
