"""Fixtures of the migration tests: real tokens, TLS material and HSM services on loopback."""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import base58
import pytest
from bip_utils import Bip32Slip10Ed25519
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from plings_hsm.backends.pkcs11 import Pkcs11Backend
from plings_hsm.backends.token import TokenSession
from plings_hsm.backends.token_init import init_token
from plings_hsm.secrets import Secret
from plings_hsm.service.app import ServiceConfig, create_app
from plings_hsm.service.server import ServiceServer, tls_config
from plings_hsm.service.tls import TlsFiles, ensure_local_tls
from plings_hsm.settings import DEFAULT_PKCS11_MODULES

T = TypeVar("T")

MIG_TOKEN_LABEL = "mig-test"
MIG_USER_PIN = Secret("mig-user-pin-2468")
MIG_SO_PIN = Secret("mig-so-pin-1357")
TEST_SEED = bytes.fromhex("0f" * 8 + "a5" * 8 + "3c" * 16)
"""The root conftest's 32-byte test seed; never a production value."""

TEST_MASTER_KEY = base58.b58encode(TEST_SEED).decode("ascii")
OTHER_TOKEN_LABEL = "mig-other"
OTHER_SEED = bytes.fromhex("77" * 32)
"""A different master: an HSM holding it must be caught by the consistency check."""

HSM_API_KEY = Secret("mig-test-hsm-api-key-0123456789")
LARGE_BUDGET = 1_000_000


def reference_key(seed: bytes, hd_path: str) -> str:
    """Return the base58 public key bip_utils derives at ``hd_path``: the independent check."""
    node = Bip32Slip10Ed25519.FromSeed(seed).DerivePath(hd_path)
    return base58.b58encode(node.PublicKey().RawCompressed().ToBytes()[1:]).decode("ascii")


def pick_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def hsm_service_config(api_key: Secret) -> ServiceConfig:
    """Return a ServiceConfig with the test key and, where the service has budgets, large ones."""
    extra: dict[str, object] = {}
    for item in dataclasses.fields(ServiceConfig):
        if "budget" in item.name and item.type in ("int", int):
            extra[item.name] = LARGE_BUDGET
    return ServiceConfig(api_keys=(api_key,), **extra)  # type: ignore[arg-type]


_TRACKED: list[Closable] = []


class Closable(Protocol):
    """Anything with a close method: key managers, backends, clients."""

    def close(self) -> None: ...


def track(item: T) -> T:
    """Remember ``item`` so :func:`close_tracked` closes it before a server stops."""
    _TRACKED.append(item)  # type: ignore[arg-type]
    return item


def close_tracked() -> None:
    """Close every tracked client, newest first."""
    while _TRACKED:
        _TRACKED.pop().close()


@dataclass
class RunningService:
    """A service on 127.0.0.1 over TLS, and what a client needs to reach it."""

    server: ServiceServer
    url: str
    ca_file: Path
    port: int

    def stop(self) -> None:
        """Close the tracked clients, then stop the server and wait for it."""
        close_tracked()
        self.server.stop()


def serve(
    app: FastAPI, tls: TlsFiles, port: int | None = None, name: str = "svc"
) -> RunningService:
    """Start ``app`` over TLS on 127.0.0.1 in a background thread."""
    chosen = port or pick_port()
    config = tls_config(app, "127.0.0.1", chosen, tls.server_cert, tls.server_key)
    # Tests stop servers with idle kept-alive clients; do not wait 10 s for them.
    config.timeout_graceful_shutdown = 1
    server = ServiceServer(config, name=name)
    server.start()
    return RunningService(server, server.url, tls.ca_cert, chosen)


def faulty_hsm_app(inner: FastAPI, fail_first: int) -> FastAPI:
    """Wrap a real HSM service app so its first ``fail_first`` derive calls return 503.

    This is a fake HSM in part: it injects 5xx responses that a healthy real service never
    gives, to test retries.
    """
    state = {"failed": 0}

    @inner.middleware("http")
    async def inject(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        if request.url.path == "/api/derive-keys" and state["failed"] < fail_first:
            state["failed"] += 1
            return JSONResponse({"success": False}, status_code=503)
        return await call_next(request)

    return inner


def wait_until(condition: Callable[[], bool], timeout_s: float, step_s: float = 0.05) -> bool:
    """Poll ``condition`` until it is true or ``timeout_s`` passes; return the last result."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step_s)
    return condition()


def module_path() -> Path:
    """Return the SoftHSM2 module, skipping the test when it is missing."""
    configured = os.environ.get("PLINGS_PKCS11_MODULE")
    candidates = [Path(configured)] if configured else list(DEFAULT_PKCS11_MODULES)
    for candidate in candidates:
        if candidate.exists():
            return candidate
    if os.environ.get("PLINGS_REQUIRE_TOKEN") == "1":
        pytest.fail("SoftHSM2 is not installed; PLINGS_REQUIRE_TOKEN=1 forbids skipping")
    pytest.skip("SoftHSM2 is not installed (apt-get install softhsm2)")


def make_mig_token(label: str) -> Path:
    """Initialise a token with ``label`` in the test token folder (kept if it exists)."""
    module = module_path()
    conf = Path(os.environ["SOFTHSM2_CONF"])
    if init_token(module, label, MIG_SO_PIN, MIG_USER_PIN, conf):
        session = TokenSession.acquire(module, label, MIG_USER_PIN)
        session.reinitialize()
        session.close()
    return module


def _backend_with_master(label: str, seed: bytes) -> Pkcs11Backend:
    module = make_mig_token(label)
    backend = Pkcs11Backend(module, label, MIG_USER_PIN)
    backend.import_master(1, seed)
    return backend


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A local CA and server certificate for 127.0.0.1."""
    return ensure_local_tls(tmp_path_factory.mktemp("mig-tls"))


@pytest.fixture(scope="session")
def mig_backend() -> Iterator[Pkcs11Backend]:
    """A real SoftHSM2 token labelled mig-test holding TEST_SEED as wallet 1."""
    backend = _backend_with_master(MIG_TOKEN_LABEL, TEST_SEED)
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def other_backend() -> Iterator[Pkcs11Backend]:
    """A real SoftHSM2 token labelled mig-other holding a different master as wallet 1."""
    backend = _backend_with_master(OTHER_TOKEN_LABEL, OTHER_SEED)
    yield backend
    backend.close()


@pytest.fixture
def hsm_service(mig_backend: Pkcs11Backend, tls_files: TlsFiles) -> Iterator[RunningService]:
    """The real HSM service over the mig-test token on a free loopback port."""
    running = serve(create_app(mig_backend, hsm_service_config(HSM_API_KEY)), tls_files, name="hsm")
    yield running
    running.stop()
