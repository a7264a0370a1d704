"""The identifier API over real HTTPS on 127.0.0.1, in front of the real HSM service."""

# Fixtures are imported from migration_support, so every test parameter redefines one.
# ruff: noqa: F811

from __future__ import annotations

import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from migration_support import (  # noqa: F401 - fixtures
    HSM_API_KEY,
    TEST_MASTER_KEY,
    TEST_SEED,
    RunningService,
    hsm_service,
    mig_backend,
    reference_key,
    serve,
    tls_files,
    track,
    wait_until,
)

from plings_hsm.errors import ConfigError
from plings_hsm.identifier.build import IdentifierStack, build_identifier
from plings_hsm.manager.config import KeyManagementMode, ManagerSettings
from plings_hsm.secrets import Secret
from plings_hsm.service.tls import TlsFiles
from plings_hsm.store.db import Store
from plings_hsm.store.migration import change_state

CLIENT_KEY = "identifier-client-key-0123456789"
ADMIN_KEY = "identifier-admin-key-0123456789"
BODY = {"manufacturer": 1, "category": 1, "classId": 1, "batch": 99999, "quantity": 3}


def settings_for(hsm: RunningService, **overrides: object) -> ManagerSettings:
    values: dict[str, object] = {
        "master_key": Secret(TEST_MASTER_KEY),
        "hsm_endpoint": hsm.url,
        "hsm_api_key": HSM_API_KEY,
        "hsm_ca_file": hsm.ca_file,
        "hsm_retries": 0,
        "state_poll_s": 0.1,
        "identifier_api_keys": (Secret(CLIENT_KEY),),
        "admin_api_key": Secret(ADMIN_KEY),
        "rollout_whitelist": frozenset({"vip"}),
    }
    values.update(overrides)
    return ManagerSettings(**values)  # type: ignore[arg-type]


@dataclass
class Identifier:
    """A running identifier API, its stack and an HTTPS client."""

    stack: IdentifierStack
    service: RunningService
    client: httpx.Client
    store: Store

    def derive(self, user_id: str | None = None, **extra: object) -> httpx.Response:
        body: dict[str, object] = {**BODY, **extra}
        if user_id is not None:
            body["userId"] = user_id
        return self.client.post(
            "/api/derive-keys", json=body, headers={"Authorization": f"Bearer {CLIENT_KEY}"}
        )

    def admin(self, method: str, route: str, **kwargs: object) -> httpx.Response:
        return self.client.request(
            method,
            route,
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            **kwargs,  # type: ignore[arg-type]
        )


@pytest.fixture
def identifier(
    hsm_service: RunningService, tls_files: TlsFiles, tmp_path: Path
) -> Iterator[Identifier]:
    """The identifier API in env mode on a fresh SQLite store."""
    store = Store(f"sqlite:///{tmp_path / 'state.db'}")
    stack = build_identifier(settings_for(hsm_service), store)
    service = serve(stack.app, tls_files, name="identifier")
    client = httpx.Client(
        base_url=service.url, verify=ssl.create_default_context(cafile=str(tls_files.ca_cert))
    )
    yield Identifier(stack, service, client, store)
    client.close()
    service.stop()
    stack.close()


class TestDerive:
    """POST /api/derive-keys returns the wire shape and names its source."""

    def test_env_mode_source_env(self, identifier: Identifier) -> None:
        response = identifier.derive("vip")
        assert response.status_code == 200
        assert response.headers["X-Key-Source"] == "env"

    def test_keys_equal_reference(self, identifier: Identifier) -> None:
        for key in identifier.derive("vip").json()["keys"]:
            assert key["publicKey"] == reference_key(TEST_SEED, key["hdPath"])

    def test_dual_inside_source_hsm(self, identifier: Identifier) -> None:
        change_state(identifier.store, actor="test", action="set", changes={"mode": "dual"})
        identifier.stack.manager.refresh()
        assert identifier.derive("vip").headers["X-Key-Source"] == "hsm"

    def test_dual_outside_source_env(self, identifier: Identifier) -> None:
        change_state(identifier.store, actor="test", action="set", changes={"mode": "dual"})
        identifier.stack.manager.refresh()
        assert identifier.derive("not-listed").headers["X-Key-Source"] == "env"

    def test_hsm_mode_source_hsm(self, identifier: Identifier) -> None:
        change_state(identifier.store, actor="test", action="set", changes={"mode": "hsm"})
        assert wait_until(lambda: identifier.stack.manager.state.mode == "hsm", 5)
        assert identifier.derive().headers["X-Key-Source"] == "hsm"

    def test_wrong_client_key_401(self, identifier: Identifier) -> None:
        response = identifier.client.post(
            "/api/derive-keys", json=BODY, headers={"Authorization": f"Bearer {ADMIN_KEY}x"}
        )
        assert response.status_code == 401

    def test_quantity_limit_422(self, identifier: Identifier) -> None:
        response = identifier.derive(quantity=10_001)
        assert response.status_code == 422
        assert response.json()["error"]["field"] == "quantity"

    def test_user_id_must_be_text(self, identifier: Identifier) -> None:
        response = identifier.client.post(
            "/api/derive-keys",
            json={**BODY, "userId": 5},
            headers={"Authorization": f"Bearer {CLIENT_KEY}"},
        )
        assert response.status_code == 422


class TestHealthAndMetrics:
    """/health is open and secret-free; /metrics needs the admin key."""

    def test_health_reports_mode(self, identifier: Identifier) -> None:
        body = identifier.client.get("/health").json()
        assert (body["status"], body["mode"], body["envMasterLoaded"]) == ("ok", "env", True)
        assert body["hsm"]["reachable"]

    def test_health_has_no_master(self, identifier: Identifier) -> None:
        assert TEST_MASTER_KEY not in identifier.client.get("/health").text

    def test_metrics_need_admin(self, identifier: Identifier) -> None:
        response = identifier.client.get(
            "/metrics", headers={"Authorization": f"Bearer {CLIENT_KEY}"}
        )
        assert response.status_code == 401

    def test_metrics_count_sources(self, identifier: Identifier) -> None:
        identifier.derive("vip")
        text = identifier.admin("GET", "/metrics").text
        assert 'plings_key_requests_total{source="env"} 1.0' in text


class TestAdmin:
    """Admin endpoints change the migration state with the admin key only."""

    def test_client_key_rejected(self, identifier: Identifier) -> None:
        response = identifier.client.post(
            "/admin/migration/rollback", json={}, headers={"Authorization": f"Bearer {CLIENT_KEY}"}
        )
        assert response.status_code == 401

    def test_state_shown(self, identifier: Identifier) -> None:
        body = identifier.admin("GET", "/admin/migration").json()
        assert (body["mode"], body["percentage"]) == ("env", 0)

    def test_advance_outside_dual_409(self, identifier: Identifier) -> None:
        response = identifier.admin("POST", "/admin/migration/advance", json={"percentage": 5})
        assert response.status_code == 409

    def test_rollback_from_dual(self, identifier: Identifier) -> None:
        change_state(identifier.store, actor="test", action="set", changes={"mode": "dual"})
        response = identifier.admin("POST", "/admin/migration/rollback", json={"reason": "drill"})
        assert response.json()["mode"] == "env"
        assert identifier.stack.manager.state.mode == "env"

    def test_whitelist_replaced(self, identifier: Identifier) -> None:
        response = identifier.admin(
            "PUT", "/admin/migration/whitelist", json={"userIds": ["a", "b", "a"]}
        )
        assert response.json()["whitelistSize"] == 2


class TestBuild:
    """Every mode gets what it needs at start, or the start fails with a clear message."""

    def test_dual_without_endpoint_rejected(
        self, tmp_path: Path, hsm_service: RunningService
    ) -> None:
        store = Store(f"sqlite:///{tmp_path / 'state.db'}")
        settings = settings_for(hsm_service, hsm_endpoint=None, mode=KeyManagementMode.DUAL)
        with pytest.raises(ConfigError, match="HSM_ENDPOINT"):
            build_identifier(settings, store)

    def test_env_mode_builds_hsm_too(self, tmp_path: Path, hsm_service: RunningService) -> None:
        store = Store(f"sqlite:///{tmp_path / 'state.db'}")
        stack = track(build_identifier(settings_for(hsm_service), store))
        assert stack.manager.hsm_backend is not None


class TestAdminInput:
    """Admin bodies are explicit: no missing percentage, no ambiguous user id."""

    @pytest.mark.parametrize("body", [{}, {"percentage": None}])
    def test_advance_needs_percentage(
        self, identifier: Identifier, body: dict[str, object]
    ) -> None:
        change_state(identifier.store, actor="test", action="set", changes={"mode": "dual"})
        response = identifier.admin("POST", "/admin/migration/advance", json=body)
        assert response.status_code == 422
        assert response.json()["error"]["field"] == "percentage"
        assert identifier.stack.runbook.status().percentage == 0

    def test_advance_range_names_field(self, identifier: Identifier) -> None:
        change_state(
            identifier.store,
            actor="test",
            action="set",
            changes={"mode": "dual", "percentage": 50, "step": "dual-50"},
        )
        response = identifier.admin("POST", "/admin/migration/advance", json={"percentage": 25})
        message = response.json()["error"]["message"]
        assert response.status_code == 409
        assert "percentage 25 is out of range" in message
        assert "--to" not in message

    @pytest.mark.parametrize(
        ("user_ids", "field", "word"),
        [
            (["a", "a,b"], "userIds.1", "comma"),
            ([" c "], "userIds.0", "spaces"),
            (["ok", "d "], "userIds.1", "spaces"),
        ],
    )
    def test_whitelist_entry_rejected(
        self, identifier: Identifier, user_ids: list[str], field: str, word: str
    ) -> None:
        response = identifier.admin("PUT", "/admin/migration/whitelist", json={"userIds": user_ids})
        assert response.status_code == 422
        assert response.json()["error"]["field"] == field
        assert word in response.json()["error"]["message"]
        assert identifier.stack.runbook.status().whitelist == ("vip",)


class TestBodyLimits:
    """Body size and depth are checked before parsing, and unknown fields are rejected."""

    def test_oversize_body_413(self, identifier: Identifier) -> None:
        body = b'{"userId": "' + b"a" * (5 * 1024 * 1024) + b'"}'
        response = identifier.client.post(
            "/api/derive-keys",
            content=body,
            headers={"Authorization": f"Bearer {CLIENT_KEY}", "Content-Type": "application/json"},
        )
        assert response.status_code == 413
        assert response.json()["error"]["field"] == "body"

    def test_deep_json_422(self, identifier: Identifier) -> None:
        body = "[" * 40 + "]" * 40
        response = identifier.client.post(
            "/api/derive-keys",
            content=body,
            headers={"Authorization": f"Bearer {CLIENT_KEY}", "Content-Type": "application/json"},
        )
        assert response.status_code == 422
        assert response.json()["error"]["field"] == "body"
        assert "deep" in response.json()["error"]["message"]

    def test_unknown_field_422(self, identifier: Identifier) -> None:
        response = identifier.derive("vip", userid="typo")
        assert response.status_code == 422
        assert response.json()["error"]["field"] == "userid"


class TestAuthThrottle:
    """Failed authentications from one address are budgeted, as in the HSM service."""

    def test_failures_then_429(self, identifier: Identifier) -> None:
        wrong = {"Authorization": "Bearer wrong-key-0123456789"}
        statuses = [
            identifier.client.post("/api/derive-keys", json=BODY, headers=wrong).status_code
            for _ in range(10)
        ]
        blocked = identifier.derive("vip")
        assert statuses == [401] * 10
        assert blocked.status_code == 429
        assert int(blocked.headers["Retry-After"]) >= 1

    def test_admin_failures_counted(self, identifier: Identifier) -> None:
        wrong = {"Authorization": "Bearer wrong-admin-0123456789"}
        for _ in range(10):
            identifier.client.get("/admin/migration", headers=wrong)
        response = identifier.admin("GET", "/admin/migration")
        assert response.status_code == 429


def test_rollback_reason_newline_422(identifier: Identifier) -> None:
    change_state(identifier.store, actor="test", action="set", changes={"mode": "dual"})
    response = identifier.admin(
        "POST", "/admin/migration/rollback", json={"reason": "drill\nforged"}
    )
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "reason"
    assert identifier.stack.runbook.status().mode == "dual"


def test_percentage_text_shows_value(identifier: Identifier) -> None:
    change_state(identifier.store, actor="test", action="set", changes={"mode": "dual"})
    response = identifier.admin("POST", "/admin/migration/advance", json={"percentage": "50"})
    message = response.json()["error"]["message"]
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "percentage"
    assert '"50"' in message
    assert "str" not in message.split()
