"""A 503 names only what is unavailable and the request id; the reason goes to the log."""

# Fixtures are imported from svc_support, so every test parameter redefines one.
# ruff: noqa: F811

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from conftest import TEST_USER_PIN, make_token
from svc_support import (  # noqa: F401 - fixtures
    SVC_TOKEN_LABEL,
    StartService,
    auth,
    derive_body,
    events_named,
    key_store,
    sign_body,
    start_service,
    svc_backend,
    svc_tls,
)

from plings_hsm.backends.pkcs11 import Pkcs11Backend
from plings_hsm.secrets import Secret
from plings_hsm.store.api_keys import ApiKeyStore

ABSENT_LABEL = "svc-absent-label"
MISSING_MODULE = Path("/nonexistent/libmissing-pkcs11.so")


@pytest.fixture
def absent_token_backend() -> Iterator[Pkcs11Backend]:
    """A backend on a label that no token carries."""
    info = make_token(SVC_TOKEN_LABEL)
    backend = Pkcs11Backend(info.module, ABSENT_LABEL, Secret(TEST_USER_PIN))
    yield backend
    backend.close()


@pytest.fixture
def missing_module_backend() -> Iterator[Pkcs11Backend]:
    """A backend whose PKCS#11 module file does not exist."""
    backend = Pkcs11Backend(MISSING_MODULE, ABSENT_LABEL, Secret(TEST_USER_PIN))
    yield backend
    backend.close()


def _assert_generic(text: str, message: str, request_id: str) -> None:
    assert message.startswith("token unavailable; ")
    assert request_id in message
    assert ABSENT_LABEL not in text
    assert str(MISSING_MODULE) not in text
    assert "SOFTHSM_USER_PIN" not in text
    assert "PLINGS_" not in text


class TestUnavailableMessages:
    """Token and store failures return a generic 503 message and log the reason."""

    def test_absent_token_derive(
        self, start_service: StartService, absent_token_backend: Pkcs11Backend
    ) -> None:
        svc = start_service(backend=absent_token_backend)
        with structlog.testing.capture_logs() as events:
            response = svc.client.post("/api/derive-keys", headers=auth(), json=derive_body())
            request_id = response.headers["X-Request-ID"]
            (failed,) = events_named(events, "request_failed", request_id=request_id)
        assert response.status_code == 503
        _assert_generic(response.text, response.json()["error"]["message"], request_id)
        assert failed["error"] == "TokenNotFoundError"
        assert ABSENT_LABEL in failed["detail"]

    def test_missing_module_sign(
        self, start_service: StartService, missing_module_backend: Pkcs11Backend
    ) -> None:
        svc = start_service(backend=missing_module_backend)
        with structlog.testing.capture_logs() as events:
            response = svc.client.post("/api/sign", headers=auth(), json=sign_body(b"tag"))
            request_id = response.headers["X-Request-ID"]
            (failed,) = events_named(events, "request_failed", request_id=request_id)
        assert response.status_code == 503
        _assert_generic(response.text, response.json()["error"]["message"], request_id)
        assert failed["error"] == "Pkcs11ModuleError"

    def test_missing_module_ndjson(
        self, start_service: StartService, missing_module_backend: Pkcs11Backend
    ) -> None:
        svc = start_service(backend=missing_module_backend)
        response = svc.client.post(
            "/api/derive-keys",
            headers={**auth(), "Accept": "application/x-ndjson"},
            json=derive_body(),
        )
        request_id = response.headers["X-Request-ID"]
        assert response.status_code == 503
        _assert_generic(response.text, response.json()["error"]["message"], request_id)

    def test_store_failure_generic(
        self, start_service: StartService, key_store: ApiKeyStore, tmp_path: Path
    ) -> None:
        _, key = key_store.create("identifier-api")
        svc = start_service(key_store=key_store)
        with sqlite3.connect(tmp_path / "svc.db") as db:
            db.execute("DROP TABLE api_keys")
        response = svc.client.post(
            "/api/derive-keys", headers=auth(key.reveal_text()), json=derive_body()
        )
        message = response.json()["error"]["message"]
        assert response.status_code == 503
        assert message.startswith("API keys cannot be checked now: state store unavailable; ")
        assert response.headers["X-Request-ID"] in message
        assert str(tmp_path) not in response.text
        assert "svc.db" not in response.text

    def test_unknown_wallet_hides_label(self, start_service: StartService) -> None:
        svc = start_service()
        response = svc.client.post(
            "/api/derive-keys", headers=auth(), json=derive_body(walletVersion=77)
        )
        assert response.status_code == 404
        assert SVC_TOKEN_LABEL not in response.text
        assert response.json()["error"]["message"].startswith("walletVersion 77 not found")
