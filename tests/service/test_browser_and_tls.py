"""Browser and transport hygiene: CORS, security headers, no-store, TLS versions."""

# Fixtures are imported from svc_support, so every test parameter redefines one.
# ruff: noqa: F811

from __future__ import annotations

import socket
import ssl
import warnings

import pytest
from svc_support import (  # noqa: F401 - fixtures
    FakeClock,
    StartService,
    auth,
    derive_body,
    sign_body,
    start_service,
    svc_backend,
    svc_tls,
)

from plings_hsm.errors import ConfigError
from plings_hsm.service.config import ServiceConfig, service_config_from_env
from plings_hsm.service.middleware import SECURITY_HEADERS

APP_ORIGIN = "https://app.example.com"
FOREIGN_ORIGIN = "https://evil.example.net"


def _preflight(origin: str) -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }


class TestCors:
    """Only origins in ALLOWED_ORIGINS are allowed, echoed exactly with Vary: Origin."""

    def test_allowed_origin_echoed(self, start_service: StartService) -> None:
        svc = start_service(allowed_origins=(APP_ORIGIN,))
        response = svc.client.post(
            "/api/derive-keys", headers={**auth(), "Origin": APP_ORIGIN}, json=derive_body()
        )
        assert response.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
        assert "Origin" in response.headers["Vary"]

    def test_foreign_origin_not_allowed(self, start_service: StartService) -> None:
        svc = start_service(allowed_origins=(APP_ORIGIN,))
        response = svc.client.post(
            "/api/derive-keys", headers={**auth(), "Origin": FOREIGN_ORIGIN}, json=derive_body()
        )
        assert "Access-Control-Allow-Origin" not in response.headers

    def test_none_by_default(self, start_service: StartService) -> None:
        svc = start_service()
        response = svc.client.get("/health", headers={"Origin": APP_ORIGIN})
        assert "Access-Control-Allow-Origin" not in response.headers

    def test_preflight_allowed(self, start_service: StartService) -> None:
        svc = start_service(allowed_origins=(APP_ORIGIN,))
        response = svc.client.options("/api/derive-keys", headers=_preflight(APP_ORIGIN))
        assert response.status_code == 200
        assert response.headers["Access-Control-Allow-Origin"] == APP_ORIGIN

    def test_preflight_foreign_rejected(self, start_service: StartService) -> None:
        svc = start_service(allowed_origins=(APP_ORIGIN,))
        response = svc.client.options("/api/derive-keys", headers=_preflight(FOREIGN_ORIGIN))
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "cors_rejected"
        assert "Access-Control-Allow-Origin" not in response.headers

    def test_preflights_budgeted(self, start_service: StartService) -> None:
        svc = start_service(
            allowed_origins=(APP_ORIGIN,),
            budget_address_requests_per_minute=2,
            clock=FakeClock(),
        )
        statuses = [
            svc.client.options("/api/derive-keys", headers=_preflight(APP_ORIGIN)).status_code
            for _ in range(3)
        ]
        assert statuses == [200, 200, 429]

    def test_wildcard_with_credentials_refused(self) -> None:
        with pytest.raises(ConfigError, match="'\\*' with PLINGS_CORS_ALLOW_CREDENTIALS"):
            ServiceConfig(allowed_origins=("*",), cors_allow_credentials=True)

    def test_wildcard_with_credentials_refused_from_env(self) -> None:
        env = {"ALLOWED_ORIGINS": "*", "PLINGS_CORS_ALLOW_CREDENTIALS": "true"}
        with pytest.raises(ConfigError):
            service_config_from_env(
                env, api_keys=(), key_store=None, default_wallet=1, quantity_max=10
            )

    def test_origin_with_path_refused(self) -> None:
        with pytest.raises(ConfigError, match="no path and no trailing slash"):
            ServiceConfig(allowed_origins=("https://app.example.com/",))

    def test_origins_read_from_env(self) -> None:
        env = {"ALLOWED_ORIGINS": f"{APP_ORIGIN}, http://localhost:3000"}
        config = service_config_from_env(
            env, api_keys=(), key_store=None, default_wallet=1, quantity_max=10
        )
        assert config.allowed_origins == (APP_ORIGIN, "http://localhost:3000")


class TestSecurityHeaders:
    """Every response carries the security headers, errors included."""

    @pytest.mark.parametrize(
        ("method", "path", "with_key"),
        [
            ("GET", "/health", False),
            ("GET", "/openapi.json", True),
            ("GET", "/openapi.json", False),
            ("POST", "/api/derive-keys", True),
            ("POST", "/api/derive-keys", False),
            ("GET", "/no-such-path", True),
        ],
    )
    def test_on_every_response(
        self, start_service: StartService, method: str, path: str, with_key: bool
    ) -> None:
        svc = start_service()
        headers = auth() if with_key else {}
        response = svc.client.request(method, path, headers=headers, json=derive_body())
        for name, value in SECURITY_HEADERS:
            assert response.headers.get(name) == value, name

    def test_on_429(self, start_service: StartService) -> None:
        svc = start_service(budget_address_requests_per_minute=1, clock=FakeClock())
        svc.client.get("/health")
        response = svc.client.get("/health")
        assert response.status_code == 429
        assert response.headers["Strict-Transport-Security"].startswith("max-age=")

    def test_hsts(self, start_service: StartService) -> None:
        svc = start_service()
        value = svc.client.get("/health").headers["Strict-Transport-Security"]
        assert value == "max-age=63072000; includeSubDomains"

    def test_no_store_on_derive(self, start_service: StartService) -> None:
        svc = start_service()
        response = svc.client.post("/api/derive-keys", headers=auth(), json=derive_body())
        assert response.headers["Cache-Control"] == "no-store"

    def test_no_store_on_sign(self, start_service: StartService) -> None:
        svc = start_service()
        response = svc.client.post("/api/sign", headers=auth(), json=sign_body(b"m"))
        assert response.headers["Cache-Control"] == "no-store"

    def test_no_server_header(self, start_service: StartService) -> None:
        svc = start_service()
        assert "server" not in svc.client.get("/health").headers

    def test_docs_ui_not_served(self, start_service: StartService) -> None:
        svc = start_service()
        assert svc.client.get("/docs", headers=auth()).status_code == 404


def _handshake(port: int, cafile: str, version: ssl.TLSVersion) -> str:
    context = ssl.create_default_context(cafile=cafile)
    with warnings.catch_warnings():
        # Python deprecates TLS 1.0 and 1.1; the test sets them to see the server reject them.
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = version
        context.maximum_version = version
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        return str(tls.version())


class TestTls:
    """The service speaks TLS 1.2 and 1.3 only."""

    @pytest.mark.parametrize(
        ("version", "name"),
        [(ssl.TLSVersion.TLSv1_2, "TLSv1.2"), (ssl.TLSVersion.TLSv1_3, "TLSv1.3")],
    )
    def test_modern_versions(
        self, start_service: StartService, version: ssl.TLSVersion, name: str
    ) -> None:
        svc = start_service()
        port = int(svc.url.rsplit(":", 1)[1])
        assert _handshake(port, str(svc.tls.ca_cert), version) == name

    @pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
    def test_old_versions_refused(
        self, start_service: StartService, version: ssl.TLSVersion
    ) -> None:
        svc = start_service()
        port = int(svc.url.rsplit(":", 1)[1])
        with pytest.raises(ssl.SSLError):
            _handshake(port, str(svc.tls.ca_cert), version)

    def test_plain_http_refused(self, start_service: StartService) -> None:
        import httpx

        svc = start_service()
        with pytest.raises(httpx.HTTPError):
            httpx.get(svc.url.replace("https://", "http://") + "/health", timeout=5)
