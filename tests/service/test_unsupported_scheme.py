"""A wallet whose scheme this version cannot derive is 501 in the error body."""

# Fixtures are imported from svc_support, so every test parameter redefines one.
# ruff: noqa: F811

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from conftest import TEST_SEED, TEST_USER_PIN, make_token
from pkcs11 import Attribute, KeyType, ObjectClass
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

UNSUPPORTED_WALLET = 9


@pytest.fixture(scope="module")
def hmac_backend() -> Iterator[Pkcs11Backend]:
    """A backend on a token with wallet 1 and an hsm-hmac-sha512 master as wallet 9.

    The wallet 9 master is a non-extractable generic secret, which is how this version
    recognises the hsm-hmac-sha512 scheme.
    """
    info = make_token("svc-hmac")
    backend = Pkcs11Backend(info.module, info.label, Secret(TEST_USER_PIN))
    backend.import_master(1, TEST_SEED)

    def create_master(session: Any) -> None:
        found = list(session.get_objects({Attribute.LABEL: "plings_master_v9"}))
        if found:
            return
        session.create_object(
            {
                Attribute.CLASS: ObjectClass.SECRET_KEY,
                Attribute.KEY_TYPE: KeyType.GENERIC_SECRET,
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.LABEL: "plings_master_v9",
                Attribute.VALUE: bytes(range(64)),
            }
        )

    backend.token.call(create_master)
    yield backend
    backend.close()


class TestUnsupportedScheme:
    """Derive and sign on an hsm-hmac-sha512 wallet return 501 with the scheme named."""

    def test_derive_501(self, start_service: StartService, hmac_backend: Pkcs11Backend) -> None:
        svc = start_service(backend=hmac_backend)
        response = svc.client.post(
            "/api/derive-keys", headers=auth(), json=derive_body(walletVersion=UNSUPPORTED_WALLET)
        )
        error = response.json()["error"]
        assert response.status_code == 501
        assert error["code"] == "not_implemented"
        assert "hsm-hmac-sha512" in error["message"]
        assert response.json()["requestId"] == response.headers["X-Request-ID"]

    def test_ndjson_derive_501(
        self, start_service: StartService, hmac_backend: Pkcs11Backend
    ) -> None:
        svc = start_service(backend=hmac_backend)
        response = svc.client.post(
            "/api/derive-keys",
            headers={**auth(), "Accept": "application/x-ndjson"},
            json=derive_body(walletVersion=UNSUPPORTED_WALLET),
        )
        assert response.status_code == 501
        assert response.json()["error"]["code"] == "not_implemented"

    def test_sign_501(self, start_service: StartService, hmac_backend: Pkcs11Backend) -> None:
        svc = start_service(backend=hmac_backend)
        response = svc.client.post(
            "/api/sign",
            headers=auth(),
            json=sign_body(b"tag", walletVersion=UNSUPPORTED_WALLET),
        )
        assert response.status_code == 501
        assert "hsm-hmac-sha512" in response.json()["error"]["message"]

    def test_other_wallet_derives(
        self, start_service: StartService, hmac_backend: Pkcs11Backend
    ) -> None:
        svc = start_service(backend=hmac_backend)
        response = svc.client.post("/api/derive-keys", headers=auth(), json=derive_body())
        assert response.status_code == 200

    @pytest.mark.parametrize("route", ["/api/derive-keys", "/api/sign"])
    def test_openapi_lists_501(
        self, start_service: StartService, hmac_backend: Pkcs11Backend, route: str
    ) -> None:
        svc = start_service(backend=hmac_backend)
        document = svc.client.get("/openapi.json", headers=auth()).json()
        assert "501" in document["paths"][route]["post"]["responses"]
