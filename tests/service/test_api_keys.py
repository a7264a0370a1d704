"""API keys: the hashed store, the apikey commands and their use over HTTPS."""

# Fixtures are imported from svc_support, so every test parameter redefines one.
# ruff: noqa: F811

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import structlog
from svc_support import (  # noqa: F401 - fixtures
    SVC_API_KEY,
    FakeClock,
    StartService,
    auth,
    derive_body,
    events_named,
    key_store,
    start_service,
    svc_backend,
    svc_tls,
)

from plings_hsm.errors import InvalidRequestError
from plings_hsm.service.auth import STORE_KEY_CACHE_S
from plings_hsm.store.api_keys import ApiKeyStore


def _plings_hsm(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from plings_hsm.cli import main; main()", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PLINGS_", "HSM_"))}
    env["PLINGS_HSM_HOME"] = str(tmp_path / "home")
    env["PLINGS_DATABASE_URL"] = f"sqlite:///{tmp_path / 'cli.db'}"
    return env


class TestKeyStore:
    """The store keeps a digest under a public key id and finds a key by it."""

    def test_created_key_verifies(self, key_store: ApiKeyStore) -> None:
        record, key = key_store.create("identifier-api")
        found = key_store.verify(key.reveal())
        assert found is not None
        assert found.key_id == record.key_id

    def test_key_text_not_stored(self, key_store: ApiKeyStore, tmp_path: Path) -> None:
        _, key = key_store.create("identifier-api")
        secret_part = key.reveal().rsplit(b"_", 1)[1]
        raw = (tmp_path / "svc.db").read_bytes()
        assert secret_part not in raw

    def test_digest_stored(self, key_store: ApiKeyStore, tmp_path: Path) -> None:
        record, key = key_store.create("identifier-api")
        with sqlite3.connect(tmp_path / "svc.db") as db:
            (stored,) = db.execute(
                "SELECT key_sha256 FROM api_keys WHERE key_id = ?", (record.key_id,)
            ).fetchone()
        assert stored == hashlib.sha256(key.reveal()).digest()

    def test_key_id_is_prefix(self, key_store: ApiKeyStore) -> None:
        record, key = key_store.create("identifier-api")
        assert key.reveal_text().startswith(f"plk_{record.key_id}_")

    def test_wrong_secret_rejected(self, key_store: ApiKeyStore) -> None:
        _, key = key_store.create("identifier-api")
        text = key.reveal()
        forged = text[:-1] + (b"A" if text[-1:] != b"A" else b"B")
        assert key_store.verify(forged) is None

    def test_malformed_rejected(self, key_store: ApiKeyStore) -> None:
        assert key_store.verify("plk_ÿ_é".encode()) is None

    def test_revoked_rejected(self, key_store: ApiKeyStore) -> None:
        _, key = key_store.create("identifier-api")
        key_store.revoke("identifier-api")
        assert key_store.verify(key.reveal()) is None

    def test_active_name_unique(self, key_store: ApiKeyStore) -> None:
        key_store.create("identifier-api")
        with pytest.raises(InvalidRequestError, match="already has an active API key"):
            key_store.create("identifier-api")

    def test_name_free_after_revoke(self, key_store: ApiKeyStore) -> None:
        key_store.create("identifier-api")
        key_store.revoke("identifier-api")
        record, _ = key_store.create("identifier-api")
        assert record.revoked_at is None

    def test_budget_kept(self, key_store: ApiKeyStore) -> None:
        key_store.create("identifier-api", requests_per_minute=6000, keys_per_minute=2_000_000)
        (record,) = key_store.list_keys()
        assert (record.requests_per_minute, record.keys_per_minute) == (6000, 2_000_000)

    def test_budget_out_of_range(self, key_store: ApiKeyStore) -> None:
        with pytest.raises(InvalidRequestError, match="requests_per_minute 0 is out of range"):
            key_store.create("ops", requests_per_minute=0)

    def test_invalid_name(self, key_store: ApiKeyStore) -> None:
        with pytest.raises(InvalidRequestError, match="name 'a b' is invalid"):
            key_store.create("a b")

    def test_list_hides_revoked(self, key_store: ApiKeyStore) -> None:
        key_store.create("one")
        key_store.create("two")
        key_store.revoke("one")
        names = [record.name for record in key_store.list_keys(include_revoked=False)]
        assert names == ["two"]

    def test_set_budget(self, key_store: ApiKeyStore) -> None:
        key_store.create("identifier-api")
        key_store.set_budget("identifier-api", requests_per_minute=6000, keys_per_minute=None)
        (record,) = key_store.list_keys()
        assert record.requests_per_minute == 6000
        assert record.keys_per_minute is None

    def test_set_budget_unknown(self, key_store: ApiKeyStore) -> None:
        with pytest.raises(InvalidRequestError, match="no active API key"):
            key_store.set_budget("nobody", requests_per_minute=1, keys_per_minute=1)

    def test_mark_used(self, key_store: ApiKeyStore) -> None:
        record, _ = key_store.create("one")
        key_store.mark_used(record.key_id)
        (listed,) = key_store.list_keys()
        assert listed.last_used_at is not None


class TestApikeyCommands:
    """``plings-hsm apikey`` creates a key once, lists it without the key, and revokes it."""

    def test_create_prints_key_once(self, cli_env: dict[str, str]) -> None:
        result = _plings_hsm(cli_env, "apikey", "create", "identifier-api")
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("plk_")

    def test_list_shows_no_key(self, cli_env: dict[str, str]) -> None:
        created = _plings_hsm(
            cli_env, "apikey", "create", "identifier-api", "--requests-per-minute", "6000"
        )
        listed = _plings_hsm(cli_env, "apikey", "list")
        secret_part = created.stdout.strip().rsplit("_", 1)[1]
        assert "identifier-api" in listed.stdout
        assert "6000 requests/min" in listed.stdout
        assert secret_part not in listed.stdout

    def test_revoke(self, cli_env: dict[str, str], tmp_path: Path) -> None:
        _plings_hsm(cli_env, "apikey", "create", "ops")
        result = _plings_hsm(cli_env, "apikey", "revoke", "ops")
        assert result.returncode == 0, result.stderr
        assert "revoked" in result.stdout

    def test_budget(self, cli_env: dict[str, str]) -> None:
        _plings_hsm(cli_env, "apikey", "create", "identifier-api")
        result = _plings_hsm(
            cli_env, "apikey", "budget", "identifier-api", "--keys-per-minute", "2000000"
        )
        assert result.returncode == 0, result.stderr
        assert "default requests/min, 2000000 keys/min" in result.stdout

    def test_revoke_unknown_exits_5(self, cli_env: dict[str, str]) -> None:
        result = _plings_hsm(cli_env, "apikey", "revoke", "nobody")
        assert result.returncode == 5
        assert "no active API key has name or key id 'nobody'" in result.stderr


class TestStoreKeysOverHttps:
    """The service accepts store keys and HSM_API_KEY, and rejects revoked keys at once."""

    def test_store_key_accepted(self, start_service: StartService, key_store: ApiKeyStore) -> None:
        _, key = key_store.create("identifier-api")
        svc = start_service(key_store=key_store)
        response = svc.client.post(
            "/api/derive-keys", headers=auth(key.reveal_text()), json=derive_body()
        )
        assert response.status_code == 200

    def test_hsm_api_key_still_accepted(
        self, start_service: StartService, key_store: ApiKeyStore
    ) -> None:
        key_store.create("identifier-api")
        svc = start_service(key_store=key_store)
        response = svc.client.post(
            "/api/derive-keys", headers=auth(SVC_API_KEY), json=derive_body()
        )
        assert response.status_code == 200

    def test_revoked_key_rejected(
        self, start_service: StartService, key_store: ApiKeyStore
    ) -> None:
        _, key = key_store.create("identifier-api")
        clock = FakeClock()
        svc = start_service(key_store=key_store, clock=clock)
        headers = auth(key.reveal_text())
        before = svc.client.post("/api/derive-keys", headers=headers, json=derive_body())
        key_store.revoke("identifier-api")
        cached = svc.client.post("/api/derive-keys", headers=headers, json=derive_body())
        clock.advance(STORE_KEY_CACHE_S)
        after = svc.client.post("/api/derive-keys", headers=headers, json=derive_body())
        assert before.status_code == 200
        assert cached.status_code == 200
        assert after.status_code == 401

    def test_revoked_key_equal_to_configured_key(
        self, start_service: StartService, key_store: ApiKeyStore
    ) -> None:
        _, key = key_store.create("identifier-api")
        clock = FakeClock()
        svc = start_service(key_store=key_store, clock=clock, api_keys=(key,))
        headers = auth(key.reveal_text())
        before = svc.client.post("/api/derive-keys", headers=headers, json=derive_body())
        key_store.revoke("identifier-api")
        clock.advance(STORE_KEY_CACHE_S)
        after = svc.client.post("/api/derive-keys", headers=headers, json=derive_body())
        assert before.status_code == 200
        assert after.status_code == 401

    def test_store_key_keeps_own_budget(
        self, start_service: StartService, key_store: ApiKeyStore
    ) -> None:
        _, key = key_store.create("identifier-api", requests_per_minute=1)
        svc = start_service(key_store=key_store, api_keys=(key,))
        headers = auth(key.reveal_text())
        with structlog.testing.capture_logs() as events:
            first = svc.client.post("/api/derive-keys", headers=headers, json=derive_body())
            second = svc.client.post("/api/derive-keys", headers=headers, json=derive_body())
            completed = events_named(events, "request_completed", count=2)
        assert first.status_code == 200
        assert second.status_code == 429
        assert completed[0]["key_name"] == "identifier-api"

    def test_budget_change_applies(
        self, start_service: StartService, key_store: ApiKeyStore
    ) -> None:
        _, key = key_store.create("identifier-api", requests_per_minute=1)
        clock = FakeClock()
        svc = start_service(key_store=key_store, clock=clock)
        headers = auth(key.reveal_text())
        first = svc.client.post("/api/derive-keys", headers=headers, json=derive_body())
        limited = svc.client.post("/api/derive-keys", headers=headers, json=derive_body())
        key_store.set_budget("identifier-api", requests_per_minute=50, keys_per_minute=None)
        clock.advance(STORE_KEY_CACHE_S)
        after = svc.client.post("/api/derive-keys", headers=headers, json=derive_body())
        assert [first.status_code, limited.status_code, after.status_code] == [200, 429, 200]

    def test_last_used_recorded(self, start_service: StartService, key_store: ApiKeyStore) -> None:
        _, key = key_store.create("identifier-api")
        svc = start_service(key_store=key_store)
        svc.client.post("/api/derive-keys", headers=auth(key.reveal_text()), json=derive_body())
        (record,) = key_store.list_keys()
        assert record.last_used_at is not None

    def test_access_log_names_client(
        self, start_service: StartService, key_store: ApiKeyStore
    ) -> None:
        _, key = key_store.create("identifier-api")
        svc = start_service(key_store=key_store)
        with structlog.testing.capture_logs() as events:
            svc.client.post("/api/derive-keys", headers=auth(key.reveal_text()), json=derive_body())
            (completed,) = events_named(events, "request_completed")
        assert completed["key_name"] == "identifier-api"

    def test_store_failure_503(
        self, start_service: StartService, key_store: ApiKeyStore, tmp_path: Path
    ) -> None:
        _, key = key_store.create("identifier-api")
        svc = start_service(key_store=key_store)
        with sqlite3.connect(tmp_path / "svc.db") as db:
            db.execute("DROP TABLE api_keys")
        response = svc.client.post(
            "/api/derive-keys", headers=auth(key.reveal_text()), json=derive_body()
        )
        assert response.status_code == 503
        assert str(tmp_path) not in response.text

    def test_service_needs_some_key(self, svc_backend: object) -> None:
        from plings_hsm.service.app import create_app
        from plings_hsm.service.config import ServiceConfig

        with pytest.raises(ValueError, match="at least one API key"):
            create_app(svc_backend, ServiceConfig())  # type: ignore[arg-type]
