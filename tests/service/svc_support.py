"""Helpers of the service tests: a real token with wallet 1, TLS material, a running service."""

from __future__ import annotations

import base64
import socket
import ssl
import time
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import TEST_SEED, TEST_USER_PIN, make_token

from plings_hsm.backends.base import KeyBackend
from plings_hsm.backends.pkcs11 import Pkcs11Backend
from plings_hsm.secrets import Secret
from plings_hsm.service.app import create_app
from plings_hsm.service.config import ServiceConfig
from plings_hsm.service.server import ServiceServer, tls_config
from plings_hsm.service.tls import TlsFiles, ensure_local_tls
from plings_hsm.store.api_keys import ApiKeyStore
from plings_hsm.store.db import Store

SVC_TOKEN_LABEL = "svc-test"
SVC_API_KEY = "svc-test-api-key-0123456789abcdef"
HTTP_TIMEOUT_S = 30.0


class FakeClock:
    """A monotonic clock that moves only when a test advances it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds``."""
        self.now += seconds


@dataclass
class RunningService:
    """A service on 127.0.0.1 over TLS and an HTTPS client that trusts its CA."""

    server: ServiceServer
    client: httpx.Client
    tls: TlsFiles

    @property
    def url(self) -> str:
        """Base URL of the service."""
        return self.server.url


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def auth(key: str = SVC_API_KEY) -> dict[str, str]:
    """Return the Authorization header for ``key``."""
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="session")
def svc_backend() -> Iterator[Pkcs11Backend]:
    """The pkcs11 backend on token svc-test, with TEST_SEED imported as wallet 1."""
    info = make_token(SVC_TOKEN_LABEL)
    backend = Pkcs11Backend(info.module, info.label, Secret(TEST_USER_PIN))
    backend.import_master(1, TEST_SEED)
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def svc_tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """The local CA and a server certificate for 127.0.0.1."""
    return ensure_local_tls(tmp_path_factory.mktemp("svc-tls"))


@pytest.fixture
def key_store(tmp_path: Path) -> Iterator[ApiKeyStore]:
    """An API-key store in a fresh SQLite file."""
    store = Store(f"sqlite:///{tmp_path / 'svc.db'}")
    yield ApiKeyStore(store)
    store.close()


StartService = Callable[..., RunningService]


@pytest.fixture
def start_service(svc_backend: Pkcs11Backend, svc_tls: TlsFiles) -> Iterator[StartService]:
    """Start services with ServiceConfig fields given as keywords; all stop after the test."""
    running: list[RunningService] = []

    def start(backend: KeyBackend | None = None, **fields: object) -> RunningService:
        fields.setdefault("api_keys", (Secret(SVC_API_KEY),))
        config = ServiceConfig(**fields)  # type: ignore[arg-type]
        app = create_app(backend or svc_backend, config)
        server = ServiceServer(
            tls_config(app, "127.0.0.1", _free_port(), svc_tls.server_cert, svc_tls.server_key),
            name="svc-test",
        )
        server.start()
        verify = ssl.create_default_context(cafile=str(svc_tls.ca_cert))
        client = httpx.Client(base_url=server.url, verify=verify, timeout=HTTP_TIMEOUT_S)
        service = RunningService(server, client, svc_tls)
        running.append(service)
        return service

    yield start
    for service in running:
        service.client.close()
        service.server.stop()


def derive_body(**overrides: object) -> dict[str, object]:
    """Return a derive request of batch 1.1.C1.99999, with ``overrides`` applied."""
    body: dict[str, object] = {
        "manufacturer": 1,
        "category": 1,
        "classId": 1,
        "batch": 99999,
        "quantity": 3,
        "walletVersion": 1,
    }
    body.update(overrides)
    return body


def sign_body(message: bytes, **overrides: object) -> dict[str, object]:
    """Return a sign request for instance 1 of batch 1.1.C1.99999."""
    body: dict[str, object] = {
        "manufacturer": 1,
        "category": 1,
        "classId": 1,
        "batch": 99999,
        "instanceNumber": 1,
        "walletVersion": 1,
        "message": base64.b64encode(message).decode("ascii"),
    }
    body.update(overrides)
    return body


def events_named(
    events: list[MutableMapping[str, Any]],
    name: str,
    count: int = 1,
    timeout_s: float = 5.0,
    request_id: str | None = None,
) -> list[MutableMapping[str, Any]]:
    """Return the captured events called ``name``, waiting until ``count`` have arrived.

    With ``request_id``, only that request's events count: an earlier request's access
    event can arrive after the capture started.

    The access log is written after the last body byte is sent, so the client can see the
    response a moment before the event exists.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        found = [
            event
            for event in events
            if event.get("event") == name
            and (request_id is None or event.get("request_id") == request_id)
        ]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.01)
