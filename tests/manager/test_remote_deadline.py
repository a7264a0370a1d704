"""Derive calls to the HSM service keep one total deadline; 429 is its own case."""

# Fixtures are imported from migration_support, so every test parameter redefines one.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from migration_support import (  # noqa: F401 - fixtures
    HSM_API_KEY,
    TEST_MASTER_KEY,
    RunningService,
    hsm_service_config,
    mig_backend,
    serve,
    tls_files,
)

from plings_hsm.backends.env import EnvBackend
from plings_hsm.backends.pkcs11 import Pkcs11Backend
from plings_hsm.backends.remote import RemoteBackend
from plings_hsm.core.path import BatchPrefix
from plings_hsm.errors import HsmRateLimitedError, HsmServiceError
from plings_hsm.manager.config import ManagerSettings, parse_mode
from plings_hsm.manager.key_manager import KeyManager
from plings_hsm.manager.migration import open_state
from plings_hsm.secrets import Secret
from plings_hsm.service.app import create_app
from plings_hsm.service.tls import TlsFiles
from plings_hsm.store.db import Store
from plings_hsm.store.migration import step_stats

PREFIX = BatchPrefix(1, 1, 1, 1, 99999)
HANG_S = 3.0


def wrapped_service(
    backend: Pkcs11Backend, tls: TlsFiles, *, hang: bool = False, limited: int = 0, after: str = ""
) -> tuple[RunningService, dict[str, int]]:
    """Serve the real HSM app with derive calls that hang, or answer 429 ``limited`` times.

    These are injected faults in front of the real service, to test the client's deadline.
    """
    app: FastAPI = create_app(backend, hsm_service_config(HSM_API_KEY))
    seen = {"derive": 0}

    @app.middleware("http")
    async def inject(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        if request.url.path == "/api/derive-keys":
            seen["derive"] += 1
            if hang:
                await asyncio.sleep(HANG_S)
            elif seen["derive"] <= limited:
                headers = {"Retry-After": after} if after else {}
                return JSONResponse({"success": False}, status_code=429, headers=headers)
        return await call_next(request)

    return serve(app, tls, name="wrapped-hsm"), seen


@pytest.fixture
def cleanup() -> Iterator[list[Callable[[], object]]]:
    """Callables run after the test, newest first."""
    actions: list[Callable[[], object]] = []
    yield actions
    for action in reversed(actions):
        action()


def remote_of(service: RunningService, **options: float) -> RemoteBackend:
    return RemoteBackend(service.url, HSM_API_KEY, service.ca_file, **options)  # type: ignore[arg-type]


class TestDeadline:
    """A hung HSM costs one deadline at most, and a read timeout is not retried."""

    def test_read_timeout_not_retried(
        self, mig_backend: Pkcs11Backend, tls_files: TlsFiles, cleanup: list[Callable[[], object]]
    ) -> None:
        service, seen = wrapped_service(mig_backend, tls_files, hang=True)
        cleanup.append(service.stop)
        remote = remote_of(service, timeout_s=0.5, deadline_s=2.0, retries=2, backoff_s=0.01)
        cleanup.append(remote.close)
        started = time.monotonic()
        with pytest.raises(HsmServiceError, match="timed out"):
            remote.derive_keys(PREFIX, 1, 1)
        took_s = time.monotonic() - started
        assert took_s < 1.0
        assert seen["derive"] == 1

    def test_deadline_caps_call_timeout(
        self, mig_backend: Pkcs11Backend, tls_files: TlsFiles, cleanup: list[Callable[[], object]]
    ) -> None:
        service, _seen = wrapped_service(mig_backend, tls_files, hang=True)
        cleanup.append(service.stop)
        remote = remote_of(service, timeout_s=5.0, deadline_s=0.4, retries=2)
        cleanup.append(remote.close)
        started = time.monotonic()
        with pytest.raises(HsmServiceError):
            remote.derive_keys(PREFIX, 1, 1)
        assert time.monotonic() - started < 1.0


class TestRateLimited:
    """429 waits out Retry-After within the deadline, else fails as rate-limited."""

    def test_retry_after_within_deadline(
        self, mig_backend: Pkcs11Backend, tls_files: TlsFiles, cleanup: list[Callable[[], object]]
    ) -> None:
        service, seen = wrapped_service(mig_backend, tls_files, limited=1, after="1")
        cleanup.append(service.stop)
        remote = remote_of(service, deadline_s=3.0)
        cleanup.append(remote.close)
        keys = remote.derive_keys(PREFIX, 1, 2)
        assert len(keys) == 2
        assert seen["derive"] == 2

    def test_retry_after_past_deadline(
        self, mig_backend: Pkcs11Backend, tls_files: TlsFiles, cleanup: list[Callable[[], object]]
    ) -> None:
        service, seen = wrapped_service(mig_backend, tls_files, limited=5, after="30")
        cleanup.append(service.stop)
        remote = remote_of(service, deadline_s=2.0)
        cleanup.append(remote.close)
        started = time.monotonic()
        with pytest.raises(HsmRateLimitedError, match="Retry-After 30"):
            remote.derive_keys(PREFIX, 1, 1)
        assert time.monotonic() - started < 1.0
        assert seen["derive"] == 1


class TestDualMode:
    """In dual mode the env keys never wait past the HSM deadline."""

    def manager(self, tmp_path: Path, remote: RemoteBackend) -> KeyManager:
        store = Store(f"sqlite:///{tmp_path / 'state.db'}")
        settings = ManagerSettings(mode=parse_mode("dual"), rollout_whitelist=frozenset({"inside"}))
        open_state(store, settings, "test")
        return KeyManager(
            store, env_backend=EnvBackend(Secret(TEST_MASTER_KEY)), hsm_backend=remote
        )

    def test_hung_hsm_env_within_deadline(
        self,
        tmp_path: Path,
        mig_backend: Pkcs11Backend,
        tls_files: TlsFiles,
        cleanup: list[Callable[[], object]],
    ) -> None:
        service, _seen = wrapped_service(mig_backend, tls_files, hang=True)
        cleanup.append(service.stop)
        manager = self.manager(tmp_path, remote_of(service, timeout_s=5.0, deadline_s=0.5))
        cleanup.append(manager.close)
        started = time.monotonic()
        served = manager.derive(PREFIX, 1, 1, user_id="inside")
        assert served.source == "env"
        assert time.monotonic() - started < 1.0

    def test_429_counted_apart_from_errors(
        self,
        tmp_path: Path,
        mig_backend: Pkcs11Backend,
        tls_files: TlsFiles,
        cleanup: list[Callable[[], object]],
    ) -> None:
        service, _seen = wrapped_service(mig_backend, tls_files, limited=5, after="30")
        cleanup.append(service.stop)
        manager = self.manager(tmp_path, remote_of(service, deadline_s=1.0))
        cleanup.append(manager.close)
        served = manager.derive(PREFIX, 1, 1, user_id="inside")
        manager.flush()
        stats = step_stats(manager.store, manager.state.step_number)
        assert served.source == "env"
        assert stats.rate_limited == 1
        assert stats.errors == 0
        assert stats.compared == 0
