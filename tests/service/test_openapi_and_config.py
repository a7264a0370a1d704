"""The OpenAPI document covers every route and error status; settings come from the env."""

# Fixtures are imported from svc_support, so every test parameter redefines one.
# ruff: noqa: F811

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from svc_support import StartService, auth, start_service, svc_backend, svc_tls  # noqa: F401

from plings_hsm.errors import ConfigError
from plings_hsm.service.client_address import ProxyHeader
from plings_hsm.service.config import ServiceConfig, service_config_from_env

API_STATUSES = {"200", "401", "403", "404", "408", "413", "422", "429", "500", "501", "503"}


@pytest.fixture
def openapi(start_service: StartService) -> dict[str, Any]:
    svc = start_service()
    document: dict[str, Any] = svc.client.get("/openapi.json", headers=auth()).json()
    return document


def _from_env(env: dict[str, str]) -> ServiceConfig:
    return service_config_from_env(
        env, api_keys=(), key_store=None, default_wallet=1, quantity_max=10_000
    )


class TestOpenApi:
    """Every route is described with every error status it can return."""

    def test_needs_key(self, start_service: StartService) -> None:
        svc = start_service()
        assert svc.client.get("/openapi.json").status_code == 401

    def test_routes(self, openapi: dict[str, Any]) -> None:
        assert set(openapi["paths"]) == {"/health", "/api/derive-keys", "/api/sign"}

    @pytest.mark.parametrize("path", ["/api/derive-keys", "/api/sign"])
    def test_api_statuses(self, openapi: dict[str, Any], path: str) -> None:
        assert set(openapi["paths"][path]["post"]["responses"]) == API_STATUSES

    def test_health_statuses(self, openapi: dict[str, Any]) -> None:
        assert set(openapi["paths"]["/health"]["get"]["responses"]) == {"200", "429", "500", "503"}

    @pytest.mark.parametrize("path", ["/api/derive-keys", "/api/sign"])
    def test_bearer_declared(self, openapi: dict[str, Any], path: str) -> None:
        assert openapi["paths"][path]["post"]["security"] == [{"HTTPBearer": []}]

    def test_retry_after_described(self, openapi: dict[str, Any]) -> None:
        response = openapi["paths"]["/api/derive-keys"]["post"]["responses"]["429"]
        assert "Retry-After" in response["headers"]

    def test_ndjson_described(self, openapi: dict[str, Any]) -> None:
        content = openapi["paths"]["/api/derive-keys"]["post"]["responses"]["200"]["content"]
        assert "application/x-ndjson" in content

    def test_error_model(self, openapi: dict[str, Any]) -> None:
        schema = openapi["components"]["schemas"]["ErrorResponse"]
        assert set(schema["properties"]) == {"success", "error", "requestId"}


class TestServiceConfigFromEnv:
    """The network settings are read from the environment and checked at start."""

    def test_defaults(self) -> None:
        config = _from_env({})
        assert config.budget_requests_per_minute == 100
        assert config.budget_keys_per_minute == 200_000
        assert config.allowed_origins == ()
        assert config.trusted_proxies == ()

    def test_budgets(self) -> None:
        config = _from_env(
            {"PLINGS_REQUESTS_PER_MINUTE": "6000", "PLINGS_KEYS_PER_MINUTE": "2000000"}
        )
        assert config.budget_requests_per_minute == 6000
        assert config.budget_keys_per_minute == 2_000_000

    def test_trusted_proxies(self) -> None:
        config = _from_env(
            {"PLINGS_TRUSTED_PROXIES": "10.0.0.0/8, ::1", "PLINGS_PROXY_HEADER": "Forwarded"}
        )
        assert config.trusted_proxies == (
            ipaddress.ip_network("10.0.0.0/8"),
            ipaddress.ip_network("::1"),
        )
        assert config.proxy_header is ProxyHeader.FORWARDED

    def test_body_limits(self) -> None:
        config = _from_env({"PLINGS_BODY_MAX_BYTES": "4096", "PLINGS_JSON_DEPTH_MAX": "4"})
        assert (config.body_max_bytes, config.json_depth_max) == (4096, 4)

    @pytest.mark.parametrize(
        ("variable", "value", "message"),
        [
            ("PLINGS_REQUESTS_PER_MINUTE", "0", "PLINGS_REQUESTS_PER_MINUTE '0' is invalid"),
            ("PLINGS_KEYS_PER_MINUTE", "many", "PLINGS_KEYS_PER_MINUTE 'many' is invalid"),
            ("PLINGS_TRUSTED_PROXIES", "proxy.local", "'proxy.local' is not an IP address"),
            ("PLINGS_PROXY_HEADER", "x-real-ip", "PLINGS_PROXY_HEADER 'x-real-ip' is invalid"),
            ("PLINGS_CORS_ALLOW_CREDENTIALS", "maybe", "'maybe' is invalid"),
            ("ALLOWED_ORIGINS", "app.example.com", "is not an origin"),
        ],
    )
    def test_invalid(self, variable: str, value: str, message: str) -> None:
        with pytest.raises(ConfigError, match=message):
            _from_env({variable: value})

    def test_limit_at_least_one(self) -> None:
        with pytest.raises(ConfigError, match="body_max_bytes 0 is out of range"):
            ServiceConfig(body_max_bytes=0)
