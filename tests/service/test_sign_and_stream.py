"""POST /api/sign round trips with a standard Ed25519 library; NDJSON streams a batch."""

# Fixtures are imported from svc_support, so every test parameter redefines one.
# ruff: noqa: F811

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import base58
import pytest
import structlog
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from svc_support import (  # noqa: F401 - fixtures
    StartService,
    auth,
    derive_body,
    events_named,
    sign_body,
    start_service,
    svc_backend,
    svc_tls,
)

from plings_hsm.backends.base import BackendHealth, KeyBackend, Signature, WalletInfo
from plings_hsm.backends.pkcs11 import Pkcs11Backend
from plings_hsm.core.batch import DerivedKey
from plings_hsm.core.path import BatchPrefix, IdentifierPath
from plings_hsm.errors import TokenUnavailableError

NDJSON = {"Accept": "application/x-ndjson"}


class FailingStreamBackend(KeyBackend):
    """Yields real keys from ``inner``, then fails after ``good`` of them."""

    name = "failing"

    def __init__(self, inner: KeyBackend, good: int) -> None:
        self.inner = inner
        self.good = good
        self.closed = False

    def wallets(self) -> list[WalletInfo]:
        return self.inner.wallets()

    def iter_keys(self, prefix: BatchPrefix, start: int, quantity: int) -> Iterator[DerivedKey]:
        try:
            for index, key in enumerate(self.inner.iter_keys(prefix, start, quantity)):
                if index == self.good:
                    raise TokenUnavailableError("token 'svc-test' call timed out after 30 s")
                yield key
        finally:
            self.closed = True

    def sign(self, path: IdentifierPath, message: bytes) -> Signature:
        return self.inner.sign(path, message)

    def health(self) -> BackendHealth:
        return self.inner.health()


class TestSign:
    """A signature from /api/sign verifies with cryptography's Ed25519."""

    def test_round_trip(self, start_service: StartService) -> None:
        svc = start_service()
        message = b"plings tag 1.1.C1.99999.00001 \x00\xff"
        body = svc.client.post("/api/sign", headers=auth(), json=sign_body(message)).json()
        public_key = Ed25519PublicKey.from_public_bytes(base58.b58decode(body["publicKey"]))
        public_key.verify(base64.b64decode(body["signature"]), message)
        assert body["success"] is True

    def test_other_message_fails(self, start_service: StartService) -> None:
        svc = start_service()
        body = svc.client.post("/api/sign", headers=auth(), json=sign_body(b"one")).json()
        public_key = Ed25519PublicKey.from_public_bytes(base58.b58decode(body["publicKey"]))
        with pytest.raises(InvalidSignature):
            public_key.verify(base64.b64decode(body["signature"]), b"two")

    def test_key_is_derived_key(self, start_service: StartService) -> None:
        svc = start_service()
        signed = svc.client.post("/api/sign", headers=auth(), json=sign_body(b"m")).json()
        derived = svc.client.post(
            "/api/derive-keys", headers=auth(), json=derive_body(quantity=1)
        ).json()
        assert signed["publicKey"] == derived["keys"][0]["publicKey"]

    def test_response_fields(self, start_service: StartService) -> None:
        svc = start_service()
        body = svc.client.post("/api/sign", headers=auth(), json=sign_body(b"m")).json()
        assert set(body) == {"success", "publicKey", "signature"}
        assert len(base64.b64decode(body["signature"])) == 64

    def test_empty_message(self, start_service: StartService) -> None:
        svc = start_service()
        body = svc.client.post("/api/sign", headers=auth(), json=sign_body(b"")).json()
        public_key = Ed25519PublicKey.from_public_bytes(base58.b58decode(body["publicKey"]))
        public_key.verify(base64.b64decode(body["signature"]), b"")

    def test_invalid_base64(self, start_service: StartService) -> None:
        svc = start_service()
        body = {**sign_body(b""), "message": "not base64!"}
        response = svc.client.post("/api/sign", headers=auth(), json=body)
        assert response.status_code == 422
        assert response.json()["error"]["field"] == "message"

    def test_message_too_long(self, start_service: StartService) -> None:
        svc = start_service()
        response = svc.client.post("/api/sign", headers=auth(), json=sign_body(b"x" * 16385))
        assert response.status_code == 422
        assert response.json()["error"]["message"] == ("message is 16385 bytes; the limit is 16384")

    def test_instance_out_of_range(self, start_service: StartService) -> None:
        svc = start_service()
        response = svc.client.post(
            "/api/sign", headers=auth(), json=sign_body(b"m", instanceNumber=2**31)
        )
        assert response.status_code == 422
        assert response.json()["error"]["field"] == "instanceNumber"

    def test_unknown_wallet_404(self, start_service: StartService) -> None:
        svc = start_service()
        response = svc.client.post(
            "/api/sign", headers=auth(), json=sign_body(b"m", walletVersion=77)
        )
        assert response.status_code == 404

    def test_needs_key(self, start_service: StartService) -> None:
        svc = start_service()
        assert svc.client.post("/api/sign", json=sign_body(b"m")).status_code == 401


class TestNdjsonStream:
    """Accept: application/x-ndjson returns one key a line, equal to the JSON batch."""

    def test_lines_equal_json_batch(self, start_service: StartService) -> None:
        svc = start_service()
        batch = derive_body(quantity=1000, startInstance=5)
        expected = svc.client.post("/api/derive-keys", headers=auth(), json=batch).json()
        with svc.client.stream(
            "POST", "/api/derive-keys", headers={**auth(), **NDJSON}, json=batch
        ) as response:
            lines = [json.loads(line) for line in response.iter_lines() if line]
        assert lines == expected["keys"]

    def test_media_type(self, start_service: StartService) -> None:
        svc = start_service()
        response = svc.client.post(
            "/api/derive-keys", headers={**auth(), **NDJSON}, json=derive_body()
        )
        assert response.headers["Content-Type"] == "application/x-ndjson"
        assert response.headers["Cache-Control"] == "no-store"

    def test_streams_in_chunks(self, start_service: StartService) -> None:
        svc = start_service()
        with svc.client.stream(
            "POST",
            "/api/derive-keys",
            headers={**auth(), **NDJSON},
            json=derive_body(quantity=2000),
        ) as response:
            chunks = list(response.iter_raw())
        assert len(chunks) > 1

    def test_access_log_counts_keys(self, start_service: StartService) -> None:
        svc = start_service()
        with structlog.testing.capture_logs() as events:
            svc.client.post(
                "/api/derive-keys", headers={**auth(), **NDJSON}, json=derive_body(quantity=600)
            )
            (completed,) = events_named(events, "request_completed")
        assert completed["keys_derived"] == 600
        assert completed["complete"] is True

    def test_unknown_wallet_404(self, start_service: StartService) -> None:
        svc = start_service()
        response = svc.client.post(
            "/api/derive-keys", headers={**auth(), **NDJSON}, json=derive_body(walletVersion=77)
        )
        assert response.status_code == 404
        assert response.json()["success"] is False

    def test_error_mid_stream_last_line(
        self, start_service: StartService, svc_backend: Pkcs11Backend
    ) -> None:
        backend = FailingStreamBackend(svc_backend, good=300)
        svc = start_service(backend=backend)
        response = svc.client.post(
            "/api/derive-keys", headers={**auth(), **NDJSON}, json=derive_body(quantity=1000)
        )
        lines = [json.loads(line) for line in response.text.splitlines()]
        assert len(lines) == 301
        assert lines[-1]["success"] is False
        assert lines[-1]["error"]["code"] == "token_unavailable"
        assert lines[-1]["requestId"] == response.headers["X-Request-ID"]

    def test_iterator_closed(self, start_service: StartService, svc_backend: Pkcs11Backend) -> None:
        backend = FailingStreamBackend(svc_backend, good=10_000)
        svc = start_service(backend=backend)
        svc.client.post(
            "/api/derive-keys", headers={**auth(), **NDJSON}, json=derive_body(quantity=500)
        )
        assert backend.closed

    def test_json_without_accept(self, start_service: StartService) -> None:
        svc = start_service()
        response = svc.client.post("/api/derive-keys", headers=auth(), json=derive_body())
        assert response.json()["count"] == 3
