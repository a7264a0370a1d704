"""The identifier API over real HTTPS refuses HSM keys from an HSM holding another master."""

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
    RunningService,
    hsm_service,
    hsm_service_config,
    mig_backend,
    other_backend,
    serve,
    tls_files,
)
from test_identifier_api import BODY, CLIENT_KEY, settings_for

from plings_hsm.backends.env import EnvBackend
from plings_hsm.backends.pkcs11 import Pkcs11Backend
from plings_hsm.identifier.build import build_identifier
from plings_hsm.manager.config import KeyManagementMode
from plings_hsm.manager.migration import open_state
from plings_hsm.secrets import Secret
from plings_hsm.service.app import create_app
from plings_hsm.service.tls import TlsFiles
from plings_hsm.store.db import Store
from plings_hsm.store.migration import change_state


@pytest.fixture
def other_service(other_backend: Pkcs11Backend, tls_files: TlsFiles) -> Iterator[RunningService]:
    """The real HSM service over a token that contains a different master."""
    running = serve(
        create_app(other_backend, hsm_service_config(HSM_API_KEY)), tls_files, name="other-id"
    )
    yield running
    running.stop()


@pytest.fixture
def client_of(tls_files: TlsFiles) -> Iterator[list[httpx.Client]]:
    """HTTPS clients that trust the test CA, closed after the test."""
    clients: list[httpx.Client] = []
    yield clients
    for client in clients:
        client.close()


def test_hsm_mode_other_master_503(
    other_service: RunningService,
    tls_files: TlsFiles,
    tmp_path: Path,
    client_of: list[httpx.Client],
) -> None:
    env = EnvBackend(Secret(TEST_MASTER_KEY))
    expected = env.wallet_fingerprint(1)
    env.close()
    store = Store(f"sqlite:///{tmp_path / 'state.db'}")
    settings = settings_for(other_service, master_key=None, mode=KeyManagementMode.HSM)
    open_state(store, settings, "test")
    change_state(store, actor="test", action="set", changes={"expected_fingerprint": expected})
    stack = build_identifier(settings, store)
    service = serve(stack.app, tls_files, name="identifier-fp")
    client = httpx.Client(
        base_url=service.url, verify=ssl.create_default_context(cafile=str(tls_files.ca_cert))
    )
    client_of.append(client)
    try:
        derived = client.post(
            "/api/derive-keys", json=BODY, headers={"Authorization": f"Bearer {CLIENT_KEY}"}
        )
        health = client.get("/health")
    finally:
        service.stop()
        stack.close()

    assert derived.status_code == 503
    assert "X-Key-Source" not in derived.headers
    assert health.status_code == 503
    assert health.json()["status"] == "fingerprint_mismatch"
    assert health.json()["hsm"]["fingerprintMismatch"]["expected"] == expected


def test_env_mode_without_master_serves_hsm(
    hsm_service: RunningService,
    tls_files: TlsFiles,
    tmp_path: Path,
    client_of: list[httpx.Client],
) -> None:
    env = EnvBackend(Secret(TEST_MASTER_KEY))
    expected = env.wallet_fingerprint(1)
    env.close()
    store = Store(f"sqlite:///{tmp_path / 'state.db'}")
    settings = settings_for(hsm_service, master_key=None, mode=KeyManagementMode.HSM)
    open_state(store, settings, "test")
    change_state(store, actor="test", action="set", changes={"expected_fingerprint": expected})
    stack = build_identifier(settings, store)
    change_state(store, actor="test", action="rolled_back", changes={"mode": "env", "step": "env"})
    stack.manager.refresh()
    service = serve(stack.app, tls_files, name="identifier-no-master")
    client = httpx.Client(
        base_url=service.url, verify=ssl.create_default_context(cafile=str(tls_files.ca_cert))
    )
    client_of.append(client)
    try:
        derived = client.post(
            "/api/derive-keys", json=BODY, headers={"Authorization": f"Bearer {CLIENT_KEY}"}
        )
        health = client.get("/health")
    finally:
        service.stop()
        stack.close()

    assert derived.status_code == 200
    assert derived.headers["X-Key-Source"] == "hsm"
    assert health.status_code == 200
    assert health.json()["mode"] == "env"
    assert health.json()["serving"] == "hsm"
