"""The HSM service over real HTTPS on 127.0.0.1: health, derive-keys, validation and auth."""

from __future__ import annotations

import hashlib
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import TEST_MASTER_KEY, TEST_SEED, TEST_SO_PIN, TEST_USER_PIN, make_token
from slip10_reference import reference_fingerprint, reference_wire

from plings_hsm import __version__
from plings_hsm.backends import EnvBackend, KeyBackend, Pkcs11Backend
from plings_hsm.core import BatchPrefix
from plings_hsm.secrets import Secret
from plings_hsm.service import (
    ServiceConfig,
    ServiceServer,
    create_app,
    ensure_local_tls,
    tls_config,
)

INDEX_MAX = 2**31 - 1
API_KEY = "api-test-key-7c1e5b0d9a"
SECOND_API_KEY = "api-test-key-second-41f2"
WALLET_3_SEED = hashlib.sha256(b"wallet three").digest()
DEFAULT_WALLET = 3
QUANTITY_MAX = 1000
HTTP_TIMEOUT_S = 30.0
TEST_BUDGET_PER_MINUTE = 100_000

BATCH = {"manufacturer": 1, "category": 1, "classId": 1, "batch": 99999}
INTEGER_FIELDS = [
    "manufacturer",
    "category",
    "classId",
    "batch",
    "quantity",
    "walletVersion",
    "startInstance",
]
NOT_INTEGERS = [("string", "1"), ("float", 1.0), ("fraction", 1.5), ("bool", True)]
OUT_OF_RANGE = [("negative", -1), ("two-to-31", 2**31), ("two-to-64", 2**64)]


def assert_no_secrets(text: str) -> None:
    """Fail when ``text`` contains a seed, a master text, an API key or a PIN."""
    assert TEST_SEED.hex() not in text
    assert WALLET_3_SEED.hex() not in text
    assert TEST_MASTER_KEY not in text
    assert API_KEY not in text
    assert SECOND_API_KEY not in text
    assert TEST_USER_PIN not in text
    assert TEST_SO_PIN not in text


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class RunningService:
    """A started service and a client that trusts its local CA."""

    server: ServiceServer
    client: httpx.Client

    def derive(self, body: dict[str, Any], key: str = API_KEY) -> httpx.Response:
        return self.client.post(
            "/api/derive-keys", json=body, headers={"Authorization": f"Bearer {key}"}
        )


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tls")


def _serve(backend: KeyBackend, tls_dir: Path, default_wallet: int) -> Iterator[RunningService]:
    files = ensure_local_tls(tls_dir)
    # The budgets are raised so that the rate limits, tested elsewhere, do not answer 429
    # to the many requests and failed authentications below.
    config = ServiceConfig(
        api_keys=(Secret(API_KEY), Secret(SECOND_API_KEY)),
        default_wallet=default_wallet,
        quantity_max=QUANTITY_MAX,
        budget_requests_per_minute=TEST_BUDGET_PER_MINUTE,
        budget_address_requests_per_minute=TEST_BUDGET_PER_MINUTE,
        budget_auth_failures_per_minute=TEST_BUDGET_PER_MINUTE,
    )
    app = create_app(backend, config)
    server = ServiceServer(
        tls_config(app, "127.0.0.1", _free_port(), files.server_cert, files.server_key)
    )
    server.start()
    verify = ssl.create_default_context(cafile=str(files.ca_cert))
    client = httpx.Client(base_url=server.url, verify=verify, timeout=HTTP_TIMEOUT_S)
    try:
        yield RunningService(server, client)
    finally:
        client.close()
        server.stop()
        backend.close()


@pytest.fixture(scope="module")
def service(tls_dir: Path) -> Iterator[RunningService]:
    """Run the service over a token with wallets 1 (TEST_SEED) and 3, default wallet 3."""
    info = make_token("api-test")
    backend = Pkcs11Backend(info.module, info.label, Secret(TEST_USER_PIN))
    backend.import_master(1, TEST_SEED)
    backend.import_master(3, WALLET_3_SEED)
    yield from _serve(backend, tls_dir, DEFAULT_WALLET)


@pytest.fixture(scope="module")
def env_service(tls_dir: Path) -> Iterator[RunningService]:
    """The service over the env backend with TEST_MASTER_KEY, default wallet 1."""
    yield from _serve(EnvBackend(Secret(TEST_MASTER_KEY)), tls_dir, 1)


@pytest.fixture(scope="module")
def dead_service(tls_dir: Path) -> Iterator[RunningService]:
    """The service over a pkcs11 backend whose token label does not exist."""
    info = make_token("api-test")
    backend = Pkcs11Backend(info.module, "api-absent", Secret(TEST_USER_PIN))
    yield from _serve(backend, tls_dir, 1)


class TestHealth:
    """/health needs no key and lists wallets by fingerprint, without secrets."""

    def test_ok_without_auth(self, service: RunningService) -> None:
        response = service.client.get("/health")
        assert response.status_code == 200
        body = response.json()
        assert body["status"] == "ok"
        assert body["tokenReachable"] is True
        assert body["backend"] == "pkcs11"
        assert body["version"] == __version__

    def test_wallet_fingerprints(self, service: RunningService) -> None:
        wallets = service.client.get("/health").json()["wallets"]
        assert wallets == [
            {
                "walletVersion": 1,
                "label": "plings_master_v1",
                "scheme": "slip10-ed25519",
                "fingerprint": reference_fingerprint(TEST_SEED, 1),
            },
            {
                "walletVersion": 3,
                "label": "plings_master_v3",
                "scheme": "slip10-ed25519",
                "fingerprint": reference_fingerprint(WALLET_3_SEED, 3),
            },
        ]

    def test_no_secret(self, service: RunningService) -> None:
        response = service.client.get("/health")
        assert_no_secrets(response.text)
        assert_no_secrets(str(response.headers))

    def test_env_fingerprint_equals_token(
        self, service: RunningService, env_service: RunningService
    ) -> None:
        token_wallets = service.client.get("/health").json()["wallets"]
        env_wallets = env_service.client.get("/health").json()["wallets"]
        assert env_wallets[0]["fingerprint"] == token_wallets[0]["fingerprint"]


class TestDeriveKeys:
    """derive-keys returns the wire shape with keys equal to bip_utils."""

    def test_wire_shape(self, service: RunningService) -> None:
        response = service.derive({**BATCH, "quantity": 5, "walletVersion": 1})
        assert response.status_code == 200
        prefix = BatchPrefix(1, 1, 1, 1, 99999)
        assert response.json() == {
            "success": True,
            "count": 5,
            "keys": reference_wire(TEST_SEED, prefix, 1, 5),
        }

    def test_start_instance(self, service: RunningService) -> None:
        body = {**BATCH, "quantity": 3, "walletVersion": 1, "startInstance": 0}
        keys = service.derive(body).json()["keys"]
        assert keys == reference_wire(TEST_SEED, BatchPrefix(1, 1, 1, 1, 99999), 0, 3)

    def test_default_wallet(self, service: RunningService) -> None:
        response = service.derive({**BATCH, "quantity": 2})
        assert response.status_code == 200
        prefix = BatchPrefix(DEFAULT_WALLET, 1, 1, 1, 99999)
        assert response.json()["keys"] == reference_wire(WALLET_3_SEED, prefix, 1, 2)

    def test_null_wallet_rejected(self, service: RunningService) -> None:
        response = service.derive({**BATCH, "quantity": 1, "walletVersion": None})
        assert response.status_code == 422
        assert response.json()["error"]["field"] == "walletVersion"

    def test_last_index(self, service: RunningService) -> None:
        body = {
            "manufacturer": INDEX_MAX,
            "category": INDEX_MAX,
            "classId": INDEX_MAX,
            "batch": INDEX_MAX,
            "walletVersion": 1,
            "startInstance": INDEX_MAX - 1,
            "quantity": 2,
        }
        response = service.derive(body)
        assert response.status_code == 200
        prefix = BatchPrefix(1, INDEX_MAX, INDEX_MAX, INDEX_MAX, INDEX_MAX)
        assert response.json()["keys"] == reference_wire(TEST_SEED, prefix, INDEX_MAX - 1, 2)

    def test_second_api_key(self, service: RunningService) -> None:
        response = service.derive({**BATCH, "quantity": 1}, key=SECOND_API_KEY)
        assert response.status_code == 200

    def test_env_and_token_identical(
        self, service: RunningService, env_service: RunningService
    ) -> None:
        body = {**BATCH, "quantity": 50, "walletVersion": 1, "startInstance": 7}
        from_token = service.derive(body)
        from_env = env_service.derive(body)
        assert from_token.status_code == 200
        assert from_env.status_code == 200
        assert from_token.json() == from_env.json()

    def test_quantity_max(self, service: RunningService) -> None:
        response = service.derive({**BATCH, "quantity": QUANTITY_MAX, "walletVersion": 1})
        assert response.status_code == 200
        assert response.json()["count"] == QUANTITY_MAX

    def test_unknown_wallet_404(self, service: RunningService) -> None:
        response = service.derive({**BATCH, "quantity": 1, "walletVersion": 2})
        assert response.status_code == 404
        body = response.json()
        assert body["success"] is False
        assert body["error"]["code"] == "wallet_not_found"
        assert "2" in body["error"]["message"]
        assert body["requestId"]


def _full_body() -> dict[str, Any]:
    return {**BATCH, "quantity": 1, "walletVersion": 1, "startInstance": 1}


class TestValidation:
    """Every integer field is strict and in range, and an error is 422 naming the field."""

    @pytest.mark.parametrize("field", INTEGER_FIELDS)
    @pytest.mark.parametrize(("kind", "value"), NOT_INTEGERS + OUT_OF_RANGE)
    def test_rejects_value(
        self, service: RunningService, field: str, kind: str, value: object
    ) -> None:
        response = service.derive({**_full_body(), field: value})
        assert response.status_code == 422, response.text
        body = response.json()
        assert body["success"] is False
        assert body["error"]["field"] == field
        assert body["requestId"]

    @pytest.mark.parametrize("field", ["manufacturer", "category", "classId", "batch", "quantity"])
    def test_missing_field(self, service: RunningService, field: str) -> None:
        body = _full_body()
        del body[field]
        response = service.derive(body)
        assert response.status_code == 422
        assert response.json()["error"]["field"] == field

    def test_quantity_zero(self, service: RunningService) -> None:
        response = service.derive({**_full_body(), "quantity": 0})
        assert response.status_code == 422
        assert response.json()["error"]["field"] == "quantity"

    def test_quantity_above_max(self, service: RunningService) -> None:
        response = service.derive({**_full_body(), "quantity": QUANTITY_MAX + 1})
        assert response.status_code == 422
        assert response.json()["error"]["field"] == "quantity"
        assert str(QUANTITY_MAX) in response.json()["error"]["message"]

    @pytest.mark.parametrize(
        ("start", "quantity"),
        [(INDEX_MAX, 2), (INDEX_MAX - 9, 11), (INDEX_MAX - QUANTITY_MAX + 2, QUANTITY_MAX)],
    )
    def test_range_crossing_2_31(self, service: RunningService, start: int, quantity: int) -> None:
        response = service.derive({**_full_body(), "startInstance": start, "quantity": quantity})
        assert response.status_code == 422
        assert response.json()["error"]["field"] in {"quantity", "startInstance"}

    def test_range_ending_at_max(self, service: RunningService) -> None:
        response = service.derive({**_full_body(), "startInstance": INDEX_MAX - 9, "quantity": 10})
        assert response.status_code == 200
        assert response.json()["keys"][-1]["instanceNumber"] == INDEX_MAX

    def test_huge_integer_not_500(self, service: RunningService) -> None:
        content = '{"manufacturer": 1' + "0" * 5000 + ', "category": 1, "classId": 1, '
        content += '"batch": 1, "quantity": 1}'
        response = service.client.post(
            "/api/derive-keys",
            content=content,
            headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
        )
        # NOTE: Python's int parser rejects literals above 4300 digits while FastAPI reads
        # the body, before validation, so this is 400 without a field instead of 422.
        assert response.status_code in {400, 422}, response.text
        assert response.json()["success"] is False

    def test_not_an_object(self, service: RunningService) -> None:
        response = service.client.post(
            "/api/derive-keys", json=[1, 2, 3], headers={"Authorization": f"Bearer {API_KEY}"}
        )
        assert response.status_code == 422
        assert response.json()["success"] is False

    def test_message_names_field(self, service: RunningService) -> None:
        response = service.derive({**_full_body(), "classId": "7"})
        assert "classId" in response.json()["error"]["message"]


def _unauthorized_headers() -> list[tuple[str, dict[str, Any]]]:
    return [
        ("missing", {}),
        ("wrong", {"Authorization": "Bearer not-the-key"}),
        ("prefix-of-key", {"Authorization": f"Bearer {API_KEY[:-1]}"}),
        ("key-plus-extra", {"Authorization": f"Bearer {API_KEY}x"}),
        ("empty-header", {"Authorization": ""}),
        ("bearer-only", {"Authorization": "Bearer"}),
        ("basic-scheme", {"Authorization": f"Basic {API_KEY}"}),
        ("bare-key", {"Authorization": API_KEY}),
        ("non-ascii", {"Authorization": b"Bearer \xff\xfe"}),
        ("non-ascii-key-suffix", {"Authorization": API_KEY.encode() + b"\xff"}),
    ]


class TestAuthentication:
    """Every missing or wrong bearer key is 401 with one body, never a 500."""

    @pytest.mark.parametrize(
        ("case", "headers"), _unauthorized_headers(), ids=[c for c, _ in _unauthorized_headers()]
    )
    def test_rejected(self, service: RunningService, case: str, headers: dict[str, Any]) -> None:
        response = service.client.post(
            "/api/derive-keys", json={**BATCH, "quantity": 1}, headers=headers
        )
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"] == "Bearer"
        body = response.json()
        body.pop("requestId")
        assert body == {
            "success": False,
            "error": {"code": "unauthorized", "message": "missing or invalid API key"},
        }

    def test_request_id_matches_header(self, service: RunningService) -> None:
        response = service.client.post("/api/derive-keys", json={**BATCH, "quantity": 1})
        assert response.json()["requestId"] == response.headers["X-Request-ID"]

    def test_lowercase_scheme_accepted(self, service: RunningService) -> None:
        response = service.client.post(
            "/api/derive-keys",
            json={**BATCH, "quantity": 1},
            headers={"Authorization": f"bearer {API_KEY}"},
        )
        assert response.status_code == 200

    def test_auth_checked_before_body(self, service: RunningService) -> None:
        response = service.client.post("/api/derive-keys", json={"quantity": "many"})
        assert response.status_code == 401

    def test_auth_checked_before_json(self, service: RunningService) -> None:
        response = service.client.post(
            "/api/derive-keys", content="{not json", headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 401

    def test_rejection_has_no_key(self, service: RunningService) -> None:
        response = service.client.post(
            "/api/derive-keys",
            json={**BATCH, "quantity": 1},
            headers={"Authorization": f"Bearer {API_KEY}x"},
        )
        assert_no_secrets(response.text)


class TestTokenUnavailable:
    """A token that cannot be reached gives 503 on derive-keys and on /health."""

    def test_derive_503(self, dead_service: RunningService) -> None:
        response = dead_service.derive({**BATCH, "quantity": 1})
        assert response.status_code == 503
        body = response.json()
        assert body["success"] is False
        assert body["error"]["code"] == "token_unavailable"
        assert_no_secrets(response.text)

    def test_health_503(self, dead_service: RunningService) -> None:
        response = dead_service.client.get("/health")
        assert response.status_code == 503
        body = response.json()
        assert body["status"] == "unavailable"
        assert body["tokenReachable"] is False
        assert body["wallets"] == []

    def test_still_401_without_key(self, dead_service: RunningService) -> None:
        response = dead_service.client.post("/api/derive-keys", json={**BATCH, "quantity": 1})
        assert response.status_code == 401


class TestConcurrency:
    """Many concurrent HTTPS requests on one service all return the env derivation."""

    def test_parallel_requests(self, service: RunningService) -> None:
        thread_count = 8
        requests_per_thread = 10
        quantity = 50
        env = EnvBackend(Secret(TEST_MASTER_KEY))
        try:
            expected = {
                start: [
                    key.to_wire()
                    for key in env.derive_keys(BatchPrefix(1, 1, 1, 1, 99999), start, quantity)
                ]
                for start in range(0, requests_per_thread * quantity, quantity)
            }
        finally:
            env.close()
        statuses: list[int] = []
        mismatches: list[int] = []
        errors: list[BaseException] = []
        lock = threading.Lock()
        barrier = threading.Barrier(thread_count)

        def work() -> None:
            try:
                barrier.wait(timeout=10)
                for start in expected:
                    body = {**BATCH, "quantity": quantity, "walletVersion": 1}
                    response = service.derive({**body, "startInstance": start})
                    with lock:
                        statuses.append(response.status_code)
                        if response.json().get("keys") != expected[start]:
                            mismatches.append(start)
            except BaseException as exc:  # reported to the main thread, which asserts on it
                with lock:
                    errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(thread_count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)

        assert errors == []
        assert not any(thread.is_alive() for thread in threads)
        assert statuses == [200] * (thread_count * requests_per_thread)
        assert mismatches == []
