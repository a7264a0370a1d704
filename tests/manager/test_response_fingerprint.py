"""Each HSM derive response names its wallet fingerprint, and the manager checks it."""

# Fixtures are imported from migration_support, so every test parameter redefines one.
# ruff: noqa: F811

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
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
    serve,
    tls_files,
    track,
)
from slip10_reference import reference_fingerprint

from plings_hsm.backends.base import (
    WALLET_FINGERPRINT_HEADER,
    BackendHealth,
    KeyBackend,
    Signature,
    WalletInfo,
)
from plings_hsm.backends.env import EnvBackend
from plings_hsm.backends.pkcs11 import Pkcs11Backend
from plings_hsm.backends.remote import RemoteBackend
from plings_hsm.core.batch import DerivedKey
from plings_hsm.core.path import BatchPrefix, IdentifierPath
from plings_hsm.errors import FingerprintMismatchError
from plings_hsm.manager.config import ManagerSettings, parse_mode
from plings_hsm.manager.key_manager import KeyManager
from plings_hsm.manager.migration import open_state
from plings_hsm.secrets import Secret
from plings_hsm.service.app import create_app
from plings_hsm.service.tls import TlsFiles
from plings_hsm.store.db import Store
from plings_hsm.store.migration import change_state

PREFIX = BatchPrefix(1, 1, 1, 1, 99999)


class FakeSwitchedReplicaBackend(KeyBackend):
    """Fault injection: /health shows the right master, derivation uses another.

    It stands for two replicas behind one TLS-terminating balancer, one of which contains
    another master. A real token cannot be made to respond this way.
    """

    name = "fake-switched-replica"

    def __init__(self, healthy: KeyBackend, other: KeyBackend) -> None:
        self._healthy = healthy
        self._other = other

    def wallets(self) -> list[WalletInfo]:
        return self._healthy.wallets()

    def health(self) -> BackendHealth:
        return self._healthy.health()

    def iter_keys(self, prefix: BatchPrefix, start: int, quantity: int) -> Iterator[DerivedKey]:
        return self._other.iter_keys(prefix, start, quantity)

    def sign(self, path: IdentifierPath, message: bytes) -> Signature:
        return self._other.sign(path, message)

    def fingerprint_of(self, wallet: int) -> str:
        return self._other.fingerprint_of(wallet)


@pytest.fixture(autouse=True)
def close_managers() -> Iterator[None]:
    """Close the managers each test built."""
    yield
    close_tracked()


@pytest.fixture
def switched_service(
    mig_backend: Pkcs11Backend, other_backend: Pkcs11Backend, tls_files: TlsFiles
) -> Iterator[RunningService]:
    """A real HSM service app over the fault-injecting backend."""
    backend = FakeSwitchedReplicaBackend(mig_backend, other_backend)
    running = serve(
        create_app(backend, hsm_service_config(HSM_API_KEY)), tls_files, name="switched"
    )
    yield running
    running.stop()


def _manager(tmp_path: Path, service: RunningService, *, env: bool) -> KeyManager:
    store = Store(f"sqlite:///{tmp_path / 'state.db'}")
    open_state(store, ManagerSettings(mode=parse_mode("hsm")), "test")
    expected = reference_fingerprint(TEST_SEED, 1)
    change_state(store, actor="test", action="set", changes={"expected_fingerprint": expected})
    remote = RemoteBackend(service.url, HSM_API_KEY, service.ca_file, retries=0, timeout_s=2.0)
    return track(
        KeyManager(
            store,
            env_backend=EnvBackend(Secret(TEST_MASTER_KEY)) if env else None,
            hsm_backend=remote,
            poll_s=0.05,
        )
    )


class TestFingerprintHeader:
    """The HSM service names the fingerprint of the wallet each response came from."""

    def test_derive_names_fingerprint(self, hsm_service: RunningService) -> None:
        verify = ssl.create_default_context(cafile=str(hsm_service.ca_file))
        with httpx.Client(verify=verify) as client:
            response = client.post(
                f"{hsm_service.url}/api/derive-keys",
                headers={"Authorization": f"Bearer {HSM_API_KEY.reveal_text()}"},
                json={"manufacturer": 1, "category": 1, "classId": 1, "batch": 1, "quantity": 1},
            )
        assert response.status_code == 200
        assert response.headers[WALLET_FINGERPRINT_HEADER] == reference_fingerprint(TEST_SEED, 1)


class TestSwitchedReplica:
    """A replica whose responses name another master is caught on its first response."""

    def test_keys_withheld_without_env(
        self, tmp_path: Path, switched_service: RunningService
    ) -> None:
        manager = _manager(tmp_path, switched_service, env=False)
        with pytest.raises(FingerprintMismatchError):
            manager.derive(PREFIX, 1, 2)

    def test_env_served_with_env(self, tmp_path: Path, switched_service: RunningService) -> None:
        manager = _manager(tmp_path, switched_service, env=True)
        served = manager.derive(PREFIX, 1, 2)
        env = EnvBackend(Secret(TEST_MASTER_KEY))
        try:
            expected = env.derive_keys(PREFIX, 1, 2)
        finally:
            env.close()
        assert served.source == "env"
        assert [key.public_key for key in served.keys] == [key.public_key for key in expected]
