"""Body, depth and quantity limits, bearer edge cases, and the one error body."""

# Fixtures are imported from svc_support, so every test parameter redefines one.
# ruff: noqa: F811

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator

import pytest
import structlog
from svc_support import (  # noqa: F401 - fixtures
    SVC_API_KEY,
    StartService,
    auth,
    derive_body,
    events_named,
    start_service,
    svc_backend,
    svc_tls,
)

from plings_hsm.backends.base import BackendHealth, KeyBackend, Signature, WalletInfo
from plings_hsm.core.batch import DerivedKey
from plings_hsm.core.path import BatchPrefix, IdentifierPath
from plings_hsm.service.middleware import json_depth


class BrokenBackend(KeyBackend):
    """A backend whose every call fails with an error the service does not expect."""

    name = "broken"

    def wallets(self) -> list[WalletInfo]:
        return []

    def iter_keys(self, prefix: BatchPrefix, start: int, quantity: int) -> Iterator[DerivedKey]:
        raise RuntimeError("secret detail: /var/lib/token")

    def sign(self, path: IdentifierPath, message: bytes) -> Signature:
        raise RuntimeError("secret detail: /var/lib/token")

    def health(self) -> BackendHealth:
        return BackendHealth(self.name, True, "ok")


def _assert_error_body(body: dict[str, object]) -> None:
    assert body["success"] is False
    assert set(body) == {"success", "error", "requestId"}
    error = body["error"]
    assert isinstance(error, dict)
    assert {"code", "message"} <= set(error)


class TestBodyLimits:
    """Bodies over the byte or depth limit are rejected before parsing, naming the limit."""

    def test_declared_length_413(self, start_service: StartService) -> None:
        svc = start_service(body_max_bytes=1024)
        response = svc.client.post(
            "/api/derive-keys",
            headers={**auth(), "Content-Type": "application/json"},
            content=b" " * 2048,
        )
        assert response.status_code == 413
        assert response.json()["error"]["field"] == "body"
        assert response.json()["error"]["message"] == "body is 2048 bytes; the limit is 1024 bytes"

    def test_chunked_body_413(self, start_service: StartService) -> None:
        svc = start_service(body_max_bytes=1024)

        def chunks() -> Iterator[bytes]:
            for _ in range(8):
                yield b" " * 256

        response = svc.client.post(
            "/api/derive-keys",
            headers={**auth(), "Content-Type": "application/json"},
            content=chunks(),
        )
        assert response.status_code == 413
        assert "over 1024 bytes" in response.json()["error"]["message"]

    def test_default_limit(self, start_service: StartService) -> None:
        svc = start_service()
        response = svc.client.post(
            "/api/derive-keys", headers=auth(), json=derive_body(padding="x" * 70_000)
        )
        assert response.status_code == 413

    def test_deep_body_422(self, start_service: StartService) -> None:
        svc = start_service(json_depth_max=4)
        body = '{"a":' * 5 + "1" + "}" * 5
        response = svc.client.post(
            "/api/derive-keys",
            headers={**auth(), "Content-Type": "application/json"},
            content=body,
        )
        assert response.status_code == 422
        assert response.json()["error"]["field"] == "body"
        assert response.json()["error"]["message"] == (
            "body nests arrays and objects 5 deep; the limit is 4"
        )

    def test_very_deep_body_not_500(self, start_service: StartService) -> None:
        svc = start_service()
        response = svc.client.post(
            "/api/derive-keys",
            headers={**auth(), "Content-Type": "application/json"},
            content="[" * 30_000 + "]" * 30_000,
        )
        assert response.status_code == 422

    def test_slow_body_408(self, start_service: StartService) -> None:
        svc = start_service(body_timeout_s=0.5)

        def slow() -> Iterator[bytes]:
            yield b'{"quantity":'
            time.sleep(1.5)
            yield b" 1}"

        response = svc.client.post(
            "/api/derive-keys",
            headers={**auth(), "Content-Type": "application/json"},
            content=slow(),
        )
        assert response.status_code == 408
        assert response.json()["error"]["message"] == "body not received within 0.5 s"

    def test_brackets_in_strings_ignored(self) -> None:
        assert json_depth(b'{"a": "[[[[{{{{\\"]]]]"}') == 1

    def test_depth_of_array(self) -> None:
        assert json_depth(b"[[1],[2,[3]]]") == 3

    def test_invalid_json_names_body(self, start_service: StartService) -> None:
        svc = start_service()
        response = svc.client.post(
            "/api/derive-keys",
            headers={**auth(), "Content-Type": "application/json"},
            content="{not json",
        )
        assert response.status_code == 422
        assert response.json()["error"]["field"] == "body"


class TestQuantityLimit:
    """quantity over its limit is 422 naming the field, the value and the limit."""

    def test_over_default(self, start_service: StartService) -> None:
        svc = start_service()
        response = svc.client.post(
            "/api/derive-keys", headers=auth(), json=derive_body(quantity=10_001)
        )
        assert response.status_code == 422
        assert response.json()["error"]["field"] == "quantity"
        assert response.json()["error"]["message"] == (
            "quantity 10001 is out of range; allowed 1 to 10000"
        )

    def test_configured(self, start_service: StartService) -> None:
        svc = start_service(quantity_max=5)
        response = svc.client.post("/api/derive-keys", headers=auth(), json=derive_body(quantity=6))
        assert response.json()["error"]["message"] == "quantity 6 is out of range; allowed 1 to 5"

    def test_rejected_before_derivation(self, start_service: StartService) -> None:
        svc = start_service(quantity_max=5)
        with structlog.testing.capture_logs() as events:
            svc.client.post("/api/derive-keys", headers=auth(), json=derive_body(quantity=6))
            (completed,) = events_named(events, "request_completed")
        assert completed["keys_derived"] == 0


class TestBearerEdgeCases:
    """Malformed, empty and non-ASCII bearer tokens get the one 401, never a 500."""

    @pytest.mark.parametrize(
        "header",
        [
            b"Bearer \xff\xfe\xfd",
            "Bearer cl\u00e9".encode("latin-1"),
            b"Bearer",
            b"",
            b"Basic " + SVC_API_KEY.encode("ascii"),
            SVC_API_KEY.encode("ascii"),
            b"Bearer " + SVC_API_KEY.encode("ascii") + b"x",
            b"Bearer plk_0123456789abcdef_" + b"A" * 43,
        ],
    )
    def test_rejected_401(self, start_service: StartService, header: bytes) -> None:
        svc = start_service()
        response = svc.client.post(
            "/api/derive-keys", headers={"Authorization": header}, json=derive_body()
        )
        assert response.status_code == 401
        assert response.json()["error"]["message"] == "missing or invalid API key"
        assert response.headers["WWW-Authenticate"] == "Bearer"

    def test_missing_header_same_body(self, start_service: StartService) -> None:
        svc = start_service()
        missing = svc.client.post("/api/derive-keys", json=derive_body()).json()
        wrong = svc.client.post(
            "/api/derive-keys", headers=auth("wrong"), json=derive_body()
        ).json()
        assert missing["error"] == wrong["error"]

    def test_unknown_path_needs_key(self, start_service: StartService) -> None:
        svc = start_service()
        assert svc.client.get("/api/admin").status_code == 401

    def test_auth_before_json(self, start_service: StartService) -> None:
        svc = start_service()
        response = svc.client.post(
            "/api/derive-keys",
            headers={"Content-Type": "application/json"},
            content="{not json",
        )
        assert response.status_code == 401


class TestErrorModel:
    """Every error has one body; an unexpected error is 500 with the request id only."""

    def test_validation_names_field(self, start_service: StartService) -> None:
        svc = start_service()
        response = svc.client.post(
            "/api/derive-keys", headers=auth(), json=derive_body(manufacturer="1")
        )
        assert response.status_code == 422
        assert response.json()["error"]["field"] == "manufacturer"

    @pytest.mark.parametrize(
        ("method", "path", "headers", "status"),
        [
            ("POST", "/api/derive-keys", {}, 401),
            ("GET", "/nothing", {"Authorization": f"Bearer {SVC_API_KEY}"}, 404),
            ("GET", "/api/derive-keys", {"Authorization": f"Bearer {SVC_API_KEY}"}, 405),
            ("POST", "/api/derive-keys", {"Authorization": f"Bearer {SVC_API_KEY}"}, 422),
        ],
    )
    def test_shape(
        self,
        start_service: StartService,
        method: str,
        path: str,
        headers: dict[str, str],
        status: int,
    ) -> None:
        svc = start_service()
        response = svc.client.request(method, path, headers=headers, json={"quantity": 0})
        assert response.status_code == status
        _assert_error_body(response.json())

    def test_request_id_matches_header(self, start_service: StartService) -> None:
        svc = start_service()
        response = svc.client.post("/api/derive-keys", json=derive_body())
        assert response.json()["requestId"] == response.headers["X-Request-ID"]

    def test_unexpected_error_500(self, start_service: StartService) -> None:
        svc = start_service(backend=BrokenBackend())
        response = svc.client.post("/api/derive-keys", headers=auth(), json=derive_body())
        assert response.status_code == 500
        assert response.json()["error"] == {
            "code": "internal_error",
            "message": "Internal HSM error",
        }

    def test_unexpected_error_detail_only_in_log(self, start_service: StartService) -> None:
        svc = start_service(backend=BrokenBackend())
        with structlog.testing.capture_logs() as events:
            response = svc.client.post("/api/derive-keys", headers=auth(), json=derive_body())
            (failed,) = events_named(events, "request_failed")
        assert "secret detail" not in response.text
        assert failed["request_id"] == response.json()["requestId"]
        assert failed["error"] == "RuntimeError"

    def test_unexpected_error_has_headers(self, start_service: StartService) -> None:
        svc = start_service(backend=BrokenBackend())
        body = {**derive_body(), "instanceNumber": 1, "message": ""}
        del body["quantity"]
        response = svc.client.post("/api/sign", headers=auth(), json=body)
        assert response.status_code == 500
        assert response.headers["X-Content-Type-Options"] == "nosniff"


class TestAccessLog:
    """One access event a request; authentication failures have their own fail2ban form."""

    def test_one_event_per_request(self, start_service: StartService) -> None:
        svc = start_service()
        with structlog.testing.capture_logs() as events:
            response = svc.client.post(
                "/api/derive-keys", headers=auth(), json=derive_body(quantity=7)
            )
            (completed,) = events_named(events, "request_completed")
        assert completed["request_id"] == response.headers["X-Request-ID"]
        assert completed["key_name"] == "HSM_API_KEY"
        assert completed["route"] == "/api/derive-keys"
        assert completed["status"] == 200
        assert completed["keys_derived"] == 7
        assert completed["duration_ms"] >= 0

    def test_no_key_material_logged(self, start_service: StartService) -> None:
        svc = start_service()
        with structlog.testing.capture_logs() as events:
            response = svc.client.post(
                "/api/derive-keys", headers=auth(), json=derive_body(quantity=2)
            )
            svc.client.post("/api/derive-keys", headers=auth("wrong-key"), json=derive_body())
            events_named(events, "request_completed", count=2)
        logged = json.dumps(events, default=str)
        assert SVC_API_KEY not in logged
        assert "wrong-key" not in logged
        for key in response.json()["keys"]:
            assert key["publicKey"] not in logged

    def test_fail2ban_filter_matches(self, start_service: StartService) -> None:
        svc = start_service()
        with structlog.testing.capture_logs() as events:
            svc.client.post("/api/derive-keys", headers=auth("wrong"), json=derive_body())
            (failed,) = events_named(events, "authentication_failed")
        line = structlog.processors.JSONRenderer()(None, "warning", dict(failed))
        # The failregex of docs/fail2ban.md with <ADDR> as fail2ban expands it, simplified.
        failregex = r'^(?=.*"event": "authentication_failed").*"client": "<ADDR>"'
        pattern = failregex.replace("<ADDR>", r"(?P<host>[0-9a-fA-F:.]+)")
        match = re.search(pattern, str(line))
        assert match is not None
        assert match.group("host") == "127.0.0.1"
