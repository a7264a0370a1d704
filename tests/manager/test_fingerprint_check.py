"""The key manager serves HSM keys only from an HSM whose wallet fingerprint is the expected one."""

# Fixtures are imported from migration_support, so every test parameter redefines one.
# ruff: noqa: F811

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from migration_support import (  # noqa: F401 - fixtures
    HSM_API_KEY,
    TEST_MASTER_KEY,
    RunningService,
    close_tracked,
    hsm_service,
    hsm_service_config,
    mig_backend,
    other_backend,
    serve,
    tls_files,
    track,
    wait_until,
)
from structlog.testing import capture_logs

from plings_hsm.backends.env import EnvBackend
from plings_hsm.backends.pkcs11 import Pkcs11Backend
from plings_hsm.backends.remote import RemoteBackend
from plings_hsm.core.path import BatchPrefix
from plings_hsm.errors import FingerprintMismatchError
from plings_hsm.manager.config import ManagerSettings, parse_mode
from plings_hsm.manager.key_manager import KeyManager
from plings_hsm.manager.migration import open_state
from plings_hsm.secrets import Secret
from plings_hsm.service.app import create_app
from plings_hsm.service.tls import TlsFiles
from plings_hsm.store.audit import list_audit
from plings_hsm.store.db import Store
from plings_hsm.store.migration import change_state, load_state, step_stats

PREFIX = BatchPrefix(1, 1, 1, 1, 99999)


def env_fingerprint() -> str:
    env = EnvBackend(Secret(TEST_MASTER_KEY))
    try:
        return env.wallet_fingerprint(1)
    finally:
        env.close()


def hsm_store(tmp_path: Path, expected: str = "") -> Store:
    store = Store(f"sqlite:///{tmp_path / 'state.db'}")
    open_state(store, ManagerSettings(mode=parse_mode("hsm")), "test")
    if expected:
        change_state(store, actor="test", action="set", changes={"expected_fingerprint": expected})
    return store


def manager_for(store: Store, service: RunningService, *, env: bool) -> KeyManager:
    remote = RemoteBackend(service.url, HSM_API_KEY, service.ca_file, retries=0, timeout_s=2.0)
    manager = KeyManager(
        store,
        env_backend=EnvBackend(Secret(TEST_MASTER_KEY)) if env else None,
        hsm_backend=remote,
        poll_s=0.05,
    )
    return track(manager)


@pytest.fixture(autouse=True)
def close_managers() -> Iterator[None]:
    """Close the managers each test built."""
    yield
    close_tracked()


@pytest.fixture
def other_service(other_backend: Pkcs11Backend, tls_files: TlsFiles) -> Iterator[RunningService]:
    """The real HSM service over a token that contains a different master."""
    running = serve(
        create_app(other_backend, hsm_service_config(HSM_API_KEY)), tls_files, name="other-fp"
    )
    yield running
    running.stop()


class TestHsmModeFingerprint:
    """In hsm mode the HSM serves only after its fingerprint equals the expected one."""

    def test_matching_hsm_serves(self, tmp_path: Path, hsm_service: RunningService) -> None:
        store = hsm_store(tmp_path, env_fingerprint())
        manager = manager_for(store, hsm_service, env=False)
        assert manager.derive(PREFIX, 1, 2).source == "hsm"

    def test_other_master_withheld_without_env(
        self, tmp_path: Path, other_service: RunningService
    ) -> None:
        store = hsm_store(tmp_path, env_fingerprint())
        manager = manager_for(store, other_service, env=False)
        with pytest.raises(FingerprintMismatchError):
            manager.derive(PREFIX, 1, 2)

    def test_no_expected_fingerprint_withheld(
        self, tmp_path: Path, hsm_service: RunningService
    ) -> None:
        manager = manager_for(hsm_store(tmp_path), hsm_service, env=False)
        with pytest.raises(FingerprintMismatchError):
            manager.derive(PREFIX, 1, 1)

    def test_other_master_serves_env(self, tmp_path: Path, other_service: RunningService) -> None:
        manager = manager_for(hsm_store(tmp_path), other_service, env=True)
        served = manager.derive(PREFIX, 1, 2)
        assert served.source == "env"

    def test_other_master_rolls_back(self, tmp_path: Path, other_service: RunningService) -> None:
        store = hsm_store(tmp_path)
        manager = manager_for(store, other_service, env=True)
        manager.derive(PREFIX, 1, 1)
        assert wait_until(lambda: (load_state(store) or manager.state).mode == "env", 5)

    def test_mismatch_recorded_and_audited(
        self, tmp_path: Path, other_service: RunningService
    ) -> None:
        store = hsm_store(tmp_path)
        manager = manager_for(store, other_service, env=True)
        with capture_logs() as logs:
            manager.derive(PREFIX, 1, 1)
        assert step_stats(store, manager.state.step_number).mismatches == 1
        with store.session() as session:
            assert len(list_audit(session, action="hsm_fingerprint_mismatch")) == 1
        assert any(entry["event"] == "hsm_fingerprint_mismatch" for entry in logs)

    def test_checked_at_start(self, tmp_path: Path, other_service: RunningService) -> None:
        store = hsm_store(tmp_path)
        manager = manager_for(store, other_service, env=True)
        manager.start()
        try:
            verdict = manager.fingerprint_verdict(1)
            assert verdict is not None
            assert not verdict.matches
            assert wait_until(lambda: (load_state(store) or manager.state).mode == "env", 5)
        finally:
            manager.stop()

    def test_changed_hsm_detected_by_peer(
        self,
        tmp_path: Path,
        hsm_service: RunningService,
        other_service: RunningService,
    ) -> None:
        store = hsm_store(tmp_path, env_fingerprint())
        manager = manager_for(store, hsm_service, env=False)
        assert manager.derive(PREFIX, 1, 1).source == "hsm"
        # Point the same backend at the other service, as a load balancer switch would.
        remote = manager.hsm_backend
        assert isinstance(remote, RemoteBackend)
        other = RemoteBackend(other_service.url, HSM_API_KEY, other_service.ca_file, retries=0)
        remote._client, other._client = other._client, remote._client
        try:
            with pytest.raises(FingerprintMismatchError):
                manager.derive(PREFIX, 1, 1)
        finally:
            remote._client, other._client = other._client, remote._client
            other.close()


class TestEnvModeWithoutMaster:
    """After a rollback an instance without the env master serves from the verified HSM."""

    def rolled_back_store(self, tmp_path: Path) -> Store:
        store = hsm_store(tmp_path, env_fingerprint())
        change_state(
            store,
            actor="test",
            action="set",
            changes={"env_master_removed": True, "step": "hsm-env-removed"},
        )
        change_state(
            store,
            actor="test",
            action="rolled_back",
            changes={"mode": "env", "step": "env", "env_master_removed": False},
        )
        return store

    def test_serves_verified_hsm(self, tmp_path: Path, hsm_service: RunningService) -> None:
        manager = manager_for(self.rolled_back_store(tmp_path), hsm_service, env=False)
        served = manager.derive(PREFIX, 1, 2)
        assert served.source == "hsm"
        assert manager.serving_source() == "hsm"

    def test_other_master_withheld(self, tmp_path: Path, other_service: RunningService) -> None:
        manager = manager_for(self.rolled_back_store(tmp_path), other_service, env=False)
        with pytest.raises(FingerprintMismatchError):
            manager.derive(PREFIX, 1, 1)
        assert manager.serving_source() is None

    def test_with_master_serves_env(self, tmp_path: Path, hsm_service: RunningService) -> None:
        manager = manager_for(self.rolled_back_store(tmp_path), hsm_service, env=True)
        assert manager.derive(PREFIX, 1, 1).source == "env"
        assert manager.serving_source() == "env"
