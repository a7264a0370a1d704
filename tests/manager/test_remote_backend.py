"""The remote backend against the real HSM service over TLS on 127.0.0.1."""

# Fixtures are imported from migration_support, so every test parameter redefines one.
# ruff: noqa: F811

from __future__ import annotations

from pathlib import Path

import base58
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from migration_support import (  # noqa: F401 - fixtures
    HSM_API_KEY,
    TEST_SEED,
    RunningService,
    faulty_hsm_app,
    hsm_service,
    hsm_service_config,
    mig_backend,
    pick_port,
    reference_key,
    serve,
    tls_files,
)
from structlog.testing import capture_logs

from plings_hsm.backends.pkcs11 import Pkcs11Backend
from plings_hsm.backends.remote import RemoteBackend
from plings_hsm.core.path import BatchPrefix
from plings_hsm.errors import (
    AuthenticationError,
    ConfigError,
    HsmServiceError,
    InvalidRequestError,
    WalletNotFoundError,
)
from plings_hsm.secrets import Secret
from plings_hsm.service.app import create_app
from plings_hsm.service.tls import TlsFiles, ensure_local_tls

PREFIX = BatchPrefix(1, 1, 1, 1, 99999)


def remote_for(
    service: RunningService, api_key: Secret = HSM_API_KEY, **options: float
) -> RemoteBackend:
    return RemoteBackend(service.url, api_key, service.ca_file, **options)  # type: ignore[arg-type]


class TestDerive:
    """Derive calls return the keys of the token's master."""

    def test_keys_equal_reference(self, hsm_service: RunningService) -> None:
        remote = remote_for(hsm_service)
        keys = remote.derive_keys(PREFIX, 1, 20)
        remote.close()
        for key in keys:
            assert key.public_key_base58 == reference_key(TEST_SEED, key.path.hd_path)

    def test_paths_follow_request(self, hsm_service: RunningService) -> None:
        remote = remote_for(hsm_service)
        keys = remote.derive_keys(PREFIX, 7, 3)
        remote.close()
        assert [key.path.instance for key in keys] == [7, 8, 9]

    def test_reuses_connection(self, hsm_service: RunningService) -> None:
        remote = remote_for(hsm_service)
        for _ in range(5):
            remote.derive_keys(PREFIX, 1, 1)
        pool = remote._client._transport._pool  # type: ignore[attr-defined]
        open_connections = len(pool.connections)
        remote.close()
        assert open_connections == 1


class TestErrors:
    """Client errors map to product errors and are not retried."""

    def test_wrong_key_is_authentication_error(self, hsm_service: RunningService) -> None:
        remote = remote_for(hsm_service, Secret("wrong-key"))
        with pytest.raises(AuthenticationError):
            remote.derive_keys(PREFIX, 1, 1)
        remote.close()

    def test_unknown_wallet(self, hsm_service: RunningService) -> None:
        remote = remote_for(hsm_service)
        with pytest.raises(WalletNotFoundError):
            remote.derive_keys(BatchPrefix(77, 1, 1, 1, 1), 1, 1)
        remote.close()

    def test_quantity_limit_names_field(self, hsm_service: RunningService) -> None:
        remote = remote_for(hsm_service)
        with pytest.raises(InvalidRequestError) as caught:
            remote.derive_keys(PREFIX, 1, 10_001)
        remote.close()
        assert caught.value.field == "quantity"

    def test_4xx_not_retried(self, hsm_service: RunningService) -> None:
        remote = remote_for(hsm_service, Secret("wrong-key"))
        with capture_logs() as logs, pytest.raises(AuthenticationError):
            remote.derive_keys(PREFIX, 1, 1)
        remote.close()
        assert not [entry for entry in logs if entry["event"] == "remote_call_retried"]

    def test_rejects_plain_http(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="https"):
            RemoteBackend("http://127.0.0.1:1", HSM_API_KEY, None)


class TestRetries:
    """Connection errors and 5xx responses are retried with backoff."""

    def test_5xx_retried_then_served(self, mig_backend: Pkcs11Backend, tls_files: TlsFiles) -> None:
        app = faulty_hsm_app(create_app(mig_backend, hsm_service_config(HSM_API_KEY)), fail_first=2)
        service = serve(app, tls_files, name="faulty-hsm")
        remote = remote_for(service, retries=2, backoff_s=0.01)
        try:
            with capture_logs() as logs:
                keys = remote.derive_keys(PREFIX, 1, 2)
        finally:
            remote.close()
            service.stop()
        assert len(keys) == 2
        assert len([entry for entry in logs if entry["event"] == "remote_call_retried"]) == 2

    def test_5xx_beyond_retries_fails(
        self, mig_backend: Pkcs11Backend, tls_files: TlsFiles
    ) -> None:
        app = faulty_hsm_app(create_app(mig_backend, hsm_service_config(HSM_API_KEY)), fail_first=5)
        service = serve(app, tls_files, name="faulty-hsm")
        remote = remote_for(service, retries=1, backoff_s=0.01)
        try:
            with pytest.raises(HsmServiceError, match="2 attempt"):
                remote.derive_keys(PREFIX, 1, 1)
        finally:
            remote.close()
            service.stop()

    def test_refused_connection_fails(self, tls_files: TlsFiles) -> None:
        remote = RemoteBackend(
            f"https://127.0.0.1:{pick_port()}",
            HSM_API_KEY,
            tls_files.ca_cert,
            retries=2,
            backoff_s=0.01,
        )
        with pytest.raises(HsmServiceError, match="3 attempt"):
            remote.derive_keys(PREFIX, 1, 1)
        remote.close()


class TestTls:
    """The service certificate is verified against the configured CA."""

    def test_other_ca_rejected(self, hsm_service: RunningService, tmp_path: Path) -> None:
        other = ensure_local_tls(tmp_path)
        remote = RemoteBackend(hsm_service.url, HSM_API_KEY, other.ca_cert, retries=0)
        with pytest.raises(HsmServiceError, match="ConnectError"):
            remote.derive_keys(PREFIX, 1, 1)
        remote.close()


class TestHealth:
    """Health and wallets come from the service's /health."""

    def test_health_ok(self, hsm_service: RunningService) -> None:
        remote = remote_for(hsm_service)
        health = remote.health()
        remote.close()
        assert health.ok

    def test_fingerprint_equals_token(
        self, hsm_service: RunningService, mig_backend: Pkcs11Backend
    ) -> None:
        remote = remote_for(hsm_service)
        fingerprint = remote.wallet_fingerprint(1)
        remote.close()
        assert fingerprint == mig_backend.wallet_fingerprint(1)

    def test_unreachable_reports_not_ok(self, tls_files: TlsFiles) -> None:
        remote = RemoteBackend(f"https://127.0.0.1:{pick_port()}", HSM_API_KEY, tls_files.ca_cert)
        health = remote.health()
        remote.close()
        assert not health.ok


class TestSign:
    """Signing through the service gives a signature the instance's public key verifies."""

    def test_signature_verifies(self, hsm_service: RunningService) -> None:
        remote = remote_for(hsm_service)
        path = PREFIX.instance(4)
        signature = remote.sign(path, b"tag 4")
        remote.close()
        public_key = Ed25519PublicKey.from_public_bytes(signature.public_key)
        public_key.verify(signature.signature, b"tag 4")
        assert base58.b58encode(signature.public_key).decode() == reference_key(
            TEST_SEED, path.hd_path
        )
