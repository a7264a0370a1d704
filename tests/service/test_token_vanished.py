"""A token whose objects vanish under the running service is unavailable, not empty."""

# Fixtures are imported from svc_support, so every test parameter redefines one.
# ruff: noqa: F811

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import TEST_SEED, TEST_USER_PIN, TokenInfo, make_token
from svc_support import (  # noqa: F401 - fixtures
    StartService,
    auth,
    derive_body,
    sign_body,
    start_service,
    svc_backend,
    svc_tls,
)

from plings_hsm.backends.pkcs11 import Pkcs11Backend
from plings_hsm.secrets import Secret

VANISH_TOKEN_LABEL = "svc-vanish"


def _token_dir(info: TokenInfo) -> Path:
    """Return the SoftHSM folder of the token labelled ``info.label``."""
    conf = info.softhsm2_conf.read_text(encoding="utf-8")
    tokens = Path(conf.split("directories.tokendir = ", 1)[1].splitlines()[0])
    label = info.label.encode("ascii").ljust(32)
    for folder in tokens.iterdir():
        token_object = folder / "token.object"
        if token_object.is_file() and label in token_object.read_bytes():
            return folder
    raise AssertionError(f"no SoftHSM folder holds token {info.label!r}")


@pytest.fixture
def vanishing() -> Iterator[tuple[Pkcs11Backend, Path]]:
    """A backend on a token with wallet 1, and the token's folder for the test to remove.

    Each test gets the token anew, because make_token initialises a missing label.
    """
    info = make_token(VANISH_TOKEN_LABEL)
    backend = Pkcs11Backend(info.module, info.label, Secret(TEST_USER_PIN))
    backend.import_master(1, TEST_SEED)
    yield backend, _token_dir(info)
    backend.close()


class TestTokenVanished:
    """Removing the token folder under the service turns health, derive and sign into 503."""

    def test_health_503_without_wallets(
        self, start_service: StartService, vanishing: tuple[Pkcs11Backend, Path]
    ) -> None:
        backend, folder = vanishing
        svc = start_service(backend=backend)
        before = svc.client.get("/health")
        shutil.rmtree(folder)
        after = svc.client.get("/health")
        assert before.status_code == 200
        assert after.status_code == 503
        assert after.json()["status"] == "unavailable"
        assert after.json()["wallets"] == []

    def test_derive_503_not_404(
        self, start_service: StartService, vanishing: tuple[Pkcs11Backend, Path]
    ) -> None:
        backend, folder = vanishing
        svc = start_service(backend=backend)
        before = svc.client.post("/api/derive-keys", headers=auth(), json=derive_body())
        shutil.rmtree(folder)
        after = svc.client.post("/api/derive-keys", headers=auth(), json=derive_body())
        assert before.status_code == 200
        assert after.status_code == 503
        assert after.json()["error"]["code"] == "token_unavailable"

    def test_ndjson_derive_503(
        self, start_service: StartService, vanishing: tuple[Pkcs11Backend, Path]
    ) -> None:
        backend, folder = vanishing
        svc = start_service(backend=backend)
        shutil.rmtree(folder)
        response = svc.client.post(
            "/api/derive-keys",
            headers={**auth(), "Accept": "application/x-ndjson"},
            json=derive_body(),
        )
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "token_unavailable"

    def test_sign_503(
        self, start_service: StartService, vanishing: tuple[Pkcs11Backend, Path]
    ) -> None:
        backend, folder = vanishing
        svc = start_service(backend=backend)
        shutil.rmtree(folder)
        response = svc.client.post("/api/sign", headers=auth(), json=sign_body(b"tag"))
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "token_unavailable"

    def test_unknown_wallet_still_404(
        self, start_service: StartService, vanishing: tuple[Pkcs11Backend, Path]
    ) -> None:
        backend, _ = vanishing
        svc = start_service(backend=backend)
        response = svc.client.post(
            "/api/derive-keys", headers=auth(), json=derive_body(walletVersion=7)
        )
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "wallet_not_found"
