"""Client addresses: forwarding headers are read only from trusted proxies."""

# Fixtures are imported from svc_support, so every test parameter redefines one.
# ruff: noqa: F811

from __future__ import annotations

import ipaddress

import pytest
import structlog
from svc_support import (  # noqa: F401 - fixtures
    FakeClock,
    StartService,
    auth,
    derive_body,
    events_named,
    start_service,
    svc_backend,
    svc_tls,
)

from plings_hsm.service.client_address import (
    ProxyHeader,
    budget_key,
    parse_networks,
    resolve_client,
)

PROXIES = parse_networks("10.0.0.0/8, 192.0.2.10", "PLINGS_TRUSTED_PROXIES")
XFF = ProxyHeader.X_FORWARDED_FOR
FWD = ProxyHeader.FORWARDED


class TestResolveClient:
    """The rightmost hop that is not a trusted proxy is the client."""

    def test_untrusted_peer_header_ignored(self) -> None:
        assert resolve_client("203.0.113.9", ["198.51.100.1"], PROXIES, XFF) == "203.0.113.9"

    def test_no_proxies_header_ignored(self) -> None:
        assert resolve_client("10.0.0.1", ["198.51.100.1"], (), XFF) == "10.0.0.1"

    def test_trusted_peer_header_read(self) -> None:
        assert resolve_client("10.0.0.1", ["198.51.100.1"], PROXIES, XFF) == "198.51.100.1"

    def test_rightmost_untrusted_hop(self) -> None:
        hops = ["1.1.1.1, 198.51.100.1, 10.0.0.5"]
        assert resolve_client("10.0.0.1", hops, PROXIES, XFF) == "198.51.100.1"

    def test_spoofed_left_hops_ignored(self) -> None:
        hops = ["10.0.0.7", "198.51.100.1"]
        assert resolve_client("10.0.0.1", hops, PROXIES, XFF) == "198.51.100.1"

    def test_all_trusted_leftmost(self) -> None:
        assert resolve_client("10.0.0.1", ["10.0.0.2, 10.0.0.3"], PROXIES, XFF) == "10.0.0.2"

    def test_garbage_hop_charged_to_proxy(self) -> None:
        assert resolve_client("10.0.0.1", ["unknown"], PROXIES, XFF) == "10.0.0.1"

    def test_forwarded_header(self) -> None:
        value = 'for=198.51.100.1;proto=https, for="[2001:db8::7]:4711"'
        assert resolve_client("10.0.0.1", [value], PROXIES, FWD) == "2001:db8::7"

    def test_forwarded_quoted_comma(self) -> None:
        value = 'for=198.51.100.1;by="a,b", for=10.0.0.9'
        assert resolve_client("10.0.0.1", [value], PROXIES, FWD) == "198.51.100.1"

    def test_forwarded_obfuscated_charged_to_proxy(self) -> None:
        assert resolve_client("192.0.2.10", ["for=_hidden"], PROXIES, FWD) == "192.0.2.10"

    def test_other_header_not_read(self) -> None:
        assert resolve_client("10.0.0.1", ["for=198.51.100.1"], PROXIES, XFF) == "10.0.0.1"

    def test_mapped_ipv4(self) -> None:
        assert resolve_client("::ffff:203.0.113.9", [], PROXIES, XFF) == "203.0.113.9"

    def test_ipv6_budget_per_64(self) -> None:
        assert budget_key("2001:db8::1") == budget_key("2001:db8::ffff")

    def test_ipv4_budget_per_address(self) -> None:
        assert budget_key("203.0.113.9") != budget_key("203.0.113.10")

    def test_invalid_network_rejected(self) -> None:
        with pytest.raises(ValueError, match=r"'10\.0\.0\.300' is not an IP address"):
            parse_networks("10.0.0.300", "PLINGS_TRUSTED_PROXIES")


class TestForwardingOverHttps:
    """A client cannot leave its address budget by sending forwarding headers."""

    def test_spoofed_xff_ignored(self, start_service: StartService) -> None:
        svc = start_service(budget_address_requests_per_minute=2, clock=FakeClock())
        statuses = [
            svc.client.get("/health", headers={"X-Forwarded-For": f"198.51.100.{n}"}).status_code
            for n in range(3)
        ]
        assert statuses == [200, 200, 429]

    def test_spoofed_forwarded_ignored(self, start_service: StartService) -> None:
        svc = start_service(
            budget_address_requests_per_minute=2,
            clock=FakeClock(),
            trusted_proxies=(ipaddress.ip_network("127.0.0.1/32"),),
            proxy_header=XFF,
        )
        statuses = [
            svc.client.get("/health", headers={"Forwarded": f"for=198.51.100.{n}"}).status_code
            for n in range(3)
        ]
        assert statuses == [200, 200, 429]

    def test_trusted_proxy_header_used(self, start_service: StartService) -> None:
        svc = start_service(
            budget_address_requests_per_minute=1,
            clock=FakeClock(),
            trusted_proxies=(ipaddress.ip_network("127.0.0.0/8"),),
        )
        statuses = [
            svc.client.get("/health", headers={"X-Forwarded-For": f"198.51.100.{n}"}).status_code
            for n in range(3)
        ]
        assert statuses == [200, 200, 200]

    def test_auth_failure_logs_forwarded_client(self, start_service: StartService) -> None:
        svc = start_service(trusted_proxies=(ipaddress.ip_network("127.0.0.0/8"),))
        with structlog.testing.capture_logs() as events:
            svc.client.post(
                "/api/derive-keys",
                headers={**auth("wrong"), "X-Forwarded-For": "6.6.6.6, 198.51.100.4"},
            )
            (failed,) = events_named(events, "authentication_failed")
        assert failed["client"] == "198.51.100.4"

    def test_failures_limited_per_forwarded_client(self, start_service: StartService) -> None:
        svc = start_service(
            budget_auth_failures_per_minute=1,
            clock=FakeClock(),
            trusted_proxies=(ipaddress.ip_network("127.0.0.0/8"),),
        )
        first = svc.client.post(
            "/api/derive-keys", headers={**auth("wrong"), "X-Forwarded-For": "198.51.100.1"}
        )
        other = svc.client.post(
            "/api/derive-keys",
            headers={**auth(), "X-Forwarded-For": "198.51.100.2"},
            json=derive_body(),
        )
        same = svc.client.post(
            "/api/derive-keys",
            headers={**auth(), "X-Forwarded-For": "198.51.100.1"},
            json=derive_body(),
        )
        assert first.status_code == 401
        assert other.status_code == 200
        assert same.status_code == 429
