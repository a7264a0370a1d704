"""The key manager in env, dual and hsm modes against the real HSM service and a real store."""

# Fixtures are imported from migration_support, so every test parameter redefines one.
# ruff: noqa: F811

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from migration_support import (  # noqa: F401 - fixtures
    HSM_API_KEY,
    TEST_MASTER_KEY,
    TEST_SEED,
    RunningService,
    close_tracked,
    hsm_service,
    hsm_service_config,
    mig_backend,
    other_backend,
    pick_port,
    reference_key,
    serve,
    tls_files,
    track,
    wait_until,
)
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from plings_hsm.backends.env import EnvBackend
from plings_hsm.backends.pkcs11 import Pkcs11Backend
from plings_hsm.backends.remote import RemoteBackend
from plings_hsm.core.path import BatchPrefix
from plings_hsm.errors import ConfigError, HsmServiceError, KeySourceUnavailableError
from plings_hsm.manager.config import KeyManagementMode, ManagerSettings, parse_mode
from plings_hsm.manager.key_manager import CIRCUIT_FAILURES, CIRCUIT_OPEN_S, KeyManager
from plings_hsm.manager.metrics import ManagerMetrics
from plings_hsm.manager.migration import open_state
from plings_hsm.secrets import Secret
from plings_hsm.service.app import create_app
from plings_hsm.service.tls import TlsFiles
from plings_hsm.store.audit import list_audit
from plings_hsm.store.db import Store
from plings_hsm.store.migration import change_state, load_state, step_stats

PREFIX = BatchPrefix(1, 1, 1, 1, 99999)
INSIDE_USER = "vip-user"


def open_store(tmp_path: Path, mode: str = "env", percentage: int = 0) -> Store:
    store = Store(f"sqlite:///{tmp_path / 'state.db'}")
    settings = ManagerSettings(
        mode=parse_mode(mode),
        rollout_percentage=percentage,
        rollout_whitelist=frozenset({INSIDE_USER}),
    )
    open_state(store, settings, "test")
    return store


@pytest.fixture(autouse=True)
def close_managers() -> Iterator[None]:
    """Close the managers of tests that stopped no server."""
    yield
    close_tracked()


def make_manager(
    store: Store,
    service: RunningService | None,
    *,
    env: bool = True,
    registry: CollectorRegistry | None = None,
) -> KeyManager:
    remote = (
        RemoteBackend(service.url, HSM_API_KEY, service.ca_file, retries=0, timeout_s=2.0)
        if service is not None
        else None
    )
    manager = KeyManager(
        store,
        env_backend=EnvBackend(Secret(TEST_MASTER_KEY)) if env else None,
        hsm_backend=remote,
        poll_s=0.05,
        metrics=ManagerMetrics(registry) if registry is not None else None,
    )
    return track(manager)


@pytest.fixture
def other_service(other_backend: Pkcs11Backend, tls_files: TlsFiles) -> Iterator[RunningService]:
    """The real HSM service over a token that contains a different master."""
    running = serve(
        create_app(other_backend, hsm_service_config(HSM_API_KEY)), tls_files, name="other"
    )
    yield running
    running.stop()


class TestModeNames:
    """Mode names and their old aliases."""

    @pytest.mark.parametrize(
        ("text", "mode"),
        [("vercel", "env"), ("softhsm", "hsm"), ("DUAL", "dual"), ("env", "env")],
    )
    def test_aliases(self, text: str, mode: str) -> None:
        assert parse_mode(text) is KeyManagementMode(mode)

    def test_unknown_rejected(self) -> None:
        with pytest.raises(ConfigError, match="KEY_MANAGEMENT_MODE 'cloud'"):
            parse_mode("cloud")

    def test_settings_read_rollout(self) -> None:
        settings = ManagerSettings.from_env(
            {
                "KEY_MANAGEMENT_MODE": "vercel",
                "HSM_ROLLOUT_PERCENTAGE": "25",
                "HSM_ROLLOUT_WHITELIST": "a,b",
            }
        )
        assert (settings.mode, settings.rollout_percentage, settings.rollout_whitelist) == (
            KeyManagementMode.ENV,
            25,
            frozenset({"a", "b"}),
        )

    def test_settings_reject_percentage(self) -> None:
        with pytest.raises(ConfigError, match="HSM_ROLLOUT_PERCENTAGE 101"):
            ManagerSettings.from_env({"HSM_ROLLOUT_PERCENTAGE": "101"})


class TestEnvMode:
    """env mode serves the env master and never calls the HSM."""

    def test_serves_env(self, tmp_path: Path) -> None:
        manager = make_manager(open_store(tmp_path), None)
        served = manager.derive(PREFIX, 1, 3, user_id=INSIDE_USER)
        assert served.source == "env"
        assert served.keys[0].public_key_base58 == reference_key(
            TEST_SEED, served.keys[0].path.hd_path
        )

    def test_needs_a_backend(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="PLINGS_MASTER_KEY"):
            KeyManager(open_store(tmp_path), env_backend=None, hsm_backend=None)

    def test_without_master_unavailable(self, tmp_path: Path, hsm_service: RunningService) -> None:
        manager = make_manager(open_store(tmp_path), hsm_service, env=False)
        with pytest.raises(KeySourceUnavailableError, match="PLINGS_MASTER_KEY"):
            manager.derive(PREFIX, 1, 1)


class TestDualMode:
    """dual serves env unless the HSM agrees for a request inside the rollout."""

    def test_inside_served_by_hsm(self, tmp_path: Path, hsm_service: RunningService) -> None:
        manager = make_manager(open_store(tmp_path, "dual"), hsm_service)
        served = manager.derive(PREFIX, 1, 5, user_id=INSIDE_USER)
        assert served.source == "hsm"
        for key in served.keys:
            assert key.public_key_base58 == reference_key(TEST_SEED, key.path.hd_path)

    def test_outside_served_by_env(self, tmp_path: Path, hsm_service: RunningService) -> None:
        manager = make_manager(open_store(tmp_path, "dual"), hsm_service)
        assert manager.derive(PREFIX, 1, 1, user_id="someone-else").source == "env"

    def test_no_user_served_by_env(self, tmp_path: Path, hsm_service: RunningService) -> None:
        manager = make_manager(open_store(tmp_path, "dual", percentage=100), hsm_service)
        assert manager.derive(PREFIX, 1, 1).source == "env"

    def test_comparison_recorded(self, tmp_path: Path, hsm_service: RunningService) -> None:
        store = open_store(tmp_path, "dual")
        manager = make_manager(store, hsm_service)
        manager.derive(PREFIX, 1, 2, user_id=INSIDE_USER)
        manager.flush()
        stats = step_stats(store, manager.state.step_number)
        assert (stats.compared, stats.matches) == (1, 1)
        assert len(stats.latencies_ms) == 1

    def test_hsm_down_serves_env(self, tmp_path: Path, tls_files: TlsFiles) -> None:
        store = open_store(tmp_path, "dual")
        dead = RunningService(None, f"https://127.0.0.1:{pick_port()}", tls_files.ca_cert, 0)  # type: ignore[arg-type]
        manager = make_manager(store, dead)
        served = manager.derive(PREFIX, 1, 2, user_id=INSIDE_USER)
        manager.flush()
        assert served.source == "env"
        assert step_stats(store, manager.state.step_number).errors == 1

    def test_mismatch_serves_env(self, tmp_path: Path, other_service: RunningService) -> None:
        manager = make_manager(open_store(tmp_path, "dual", 100), other_service)
        served = manager.derive(PREFIX, 1, 3, user_id=INSIDE_USER)
        assert served.source == "env"
        assert served.keys[0].public_key_base58 == reference_key(
            TEST_SEED, served.keys[0].path.hd_path
        )

    def test_mismatch_rolls_back(self, tmp_path: Path, other_service: RunningService) -> None:
        store = open_store(tmp_path, "dual", 100)
        manager = make_manager(store, other_service)
        manager.derive(PREFIX, 1, 3, user_id=INSIDE_USER)
        assert wait_until(lambda: load_state(store).mode == "env", 10)  # type: ignore[union-attr]

    def test_mismatch_switches_instance_at_once(
        self, tmp_path: Path, other_service: RunningService
    ) -> None:
        manager = make_manager(open_store(tmp_path, "dual", 100), other_service)
        manager.derive(PREFIX, 1, 1, user_id=INSIDE_USER)
        assert manager.state.mode == "env"

    def test_mismatch_recorded_with_keys(
        self, tmp_path: Path, other_service: RunningService
    ) -> None:
        store = open_store(tmp_path, "dual", 100)
        manager = make_manager(store, other_service)
        step_number = manager.state.step_number
        manager.derive(PREFIX, 1, 1, user_id=INSIDE_USER)
        assert step_stats(store, step_number).mismatches == 1

    def test_mismatch_audited(self, tmp_path: Path, other_service: RunningService) -> None:
        store = open_store(tmp_path, "dual", 100)
        manager = make_manager(store, other_service)
        manager.derive(PREFIX, 1, 1, user_id=INSIDE_USER)
        wait_until(lambda: load_state(store).mode == "env", 10)  # type: ignore[union-attr]
        with store.session() as session:
            entries = list_audit(session, action="rolled_back")
        assert entries
        assert "m/44'/501'/1'/1'/1'/1'/99999'/1'" in entries[0].detail


class TestHsmMode:
    """hsm serves the HSM and falls back to env only while allowed."""

    def test_serves_hsm(self, tmp_path: Path, hsm_service: RunningService) -> None:
        manager = make_manager(open_store(tmp_path, "hsm"), hsm_service)
        served = manager.derive(PREFIX, 1, 2)
        assert served.source == "hsm"

    def test_falls_back_to_env(self, tmp_path: Path, tls_files: TlsFiles) -> None:
        store = open_store(tmp_path, "hsm")
        dead = RunningService(None, f"https://127.0.0.1:{pick_port()}", tls_files.ca_cert, 0)  # type: ignore[arg-type]
        registry = CollectorRegistry()
        manager = make_manager(store, dead, registry=registry)
        served = manager.derive(PREFIX, 1, 1)
        manager.flush()
        assert served.source == "env"
        assert registry.get_sample_value("plings_hsm_fallbacks_total") == 1.0
        assert step_stats(store, manager.state.step_number).fallbacks == 1

    def test_fallback_audited_once(self, tmp_path: Path, tls_files: TlsFiles) -> None:
        store = open_store(tmp_path, "hsm")
        dead = RunningService(None, f"https://127.0.0.1:{pick_port()}", tls_files.ca_cert, 0)  # type: ignore[arg-type]
        manager = make_manager(store, dead)
        for _ in range(3):
            manager.derive(PREFIX, 1, 1)
        with store.session() as session:
            assert len(list_audit(session, action="hsm_fallback_started")) == 1

    def test_no_fallback_when_disabled(self, tmp_path: Path, tls_files: TlsFiles) -> None:
        store = open_store(tmp_path, "hsm")
        change_state(store, actor="op", action="set", changes={"fallback_enabled": False})
        dead = RunningService(None, f"https://127.0.0.1:{pick_port()}", tls_files.ca_cert, 0)  # type: ignore[arg-type]
        manager = make_manager(store, dead)
        with pytest.raises(HsmServiceError):
            manager.derive(PREFIX, 1, 1)

    def test_no_fallback_without_master(self, tmp_path: Path, tls_files: TlsFiles) -> None:
        dead = RunningService(None, f"https://127.0.0.1:{pick_port()}", tls_files.ca_cert, 0)  # type: ignore[arg-type]
        manager = make_manager(open_store(tmp_path, "hsm"), dead, env=False)
        with pytest.raises(HsmServiceError):
            manager.derive(PREFIX, 1, 1)


class TestFollowing:
    """Running managers see a stored change within a poll interval."""

    def test_sees_mode_change(self, tmp_path: Path, hsm_service: RunningService) -> None:
        store = open_store(tmp_path)
        manager = make_manager(store, hsm_service)
        manager.start()
        try:
            change_state(store, actor="op", action="set", changes={"mode": "hsm"})
            assert wait_until(lambda: manager.state.mode == "hsm", 5)
            assert manager.derive(PREFIX, 1, 1).source == "hsm"
        finally:
            manager.stop()

    def test_drops_removed_master(self, tmp_path: Path, hsm_service: RunningService) -> None:
        store = open_store(tmp_path, "hsm")
        manager = make_manager(store, hsm_service)
        change_state(store, actor="op", action="set", changes={"env_master_removed": True})
        manager.refresh()
        assert not manager.env_available


class TestHsmPause:
    """Consecutive HSM failures pause HSM calls instead of adding retries to every request."""

    def test_pauses_after_failures(self, tmp_path: Path, tls_files: TlsFiles) -> None:
        dead = RunningService(None, f"https://127.0.0.1:{pick_port()}", tls_files.ca_cert, 0)  # type: ignore[arg-type]
        manager = make_manager(open_store(tmp_path, "dual"), dead)
        with capture_logs() as logs:
            for _ in range(CIRCUIT_FAILURES + 20):
                assert manager.derive(PREFIX, 1, 1, user_id=INSIDE_USER).source == "env"
        paused = [entry for entry in logs if entry["event"] == "hsm_calls_paused"]
        failed = [entry for entry in logs if entry["event"] == "hsm_compare_failed"]
        assert len(paused) == 1
        assert len(failed) == CIRCUIT_FAILURES

    def test_resumes_after_pause(
        self, tmp_path: Path, mig_backend: Pkcs11Backend, tls_files: TlsFiles
    ) -> None:
        port = pick_port()
        dead = RunningService(None, f"https://127.0.0.1:{port}", tls_files.ca_cert, port)  # type: ignore[arg-type]
        manager = make_manager(open_store(tmp_path, "dual"), dead)
        for _ in range(CIRCUIT_FAILURES):
            manager.derive(PREFIX, 1, 1, user_id=INSIDE_USER)
        service = serve(
            create_app(mig_backend, hsm_service_config(HSM_API_KEY)),
            tls_files,
            port=port,
            name="late-hsm",
        )
        try:
            assert wait_until(
                lambda: manager.derive(PREFIX, 1, 1, user_id=INSIDE_USER).source == "hsm",
                CIRCUIT_OPEN_S + 5,
                step_s=0.2,
            )
        finally:
            service.stop()
