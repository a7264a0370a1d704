"""Budgets: requests and keys a minute per API key, per address before auth, failed auths."""

# Fixtures are imported from svc_support, so every test parameter redefines one.
# ruff: noqa: F811

from __future__ import annotations

import pytest
import structlog
from svc_support import (  # noqa: F401 - fixtures
    FakeClock,
    StartService,
    auth,
    derive_body,
    events_named,
    key_store,
    sign_body,
    start_service,
    svc_backend,
    svc_tls,
)

from plings_hsm.service.ratelimit import RateLimiter, TokenBucket
from plings_hsm.store.api_keys import ApiKeyStore


class TestTokenBucket:
    """A bucket lets a burst of its size through, then refills at size/60 a second."""

    def test_burst_accepted(self) -> None:
        bucket = TokenBucket(100, now=0.0)
        assert bucket.charge(100, now=0.0).accepted

    def test_over_burst_rejected(self) -> None:
        bucket = TokenBucket(100, now=0.0)
        bucket.charge(100, now=0.0)
        assert not bucket.charge(1, now=0.0).accepted

    def test_retry_after_covers_cost(self) -> None:
        bucket = TokenBucket(60, now=0.0)
        bucket.charge(60, now=0.0)
        assert bucket.charge(30, now=0.0).retry_after_s == 30

    def test_refills(self) -> None:
        bucket = TokenBucket(60, now=0.0)
        bucket.charge(60, now=0.0)
        assert bucket.charge(10, now=10.0).accepted

    def test_rejected_charge_takes_nothing(self) -> None:
        bucket = TokenBucket(10, now=0.0)
        bucket.charge(11, now=0.0)
        assert bucket.charge(10, now=0.0).accepted

    def test_refill_capped(self) -> None:
        bucket = TokenBucket(10, now=0.0)
        assert not bucket.charge(11, now=3600.0).accepted


class TestRateLimiter:
    """Buckets are kept per key, resized when a budget changes, and bounded in number."""

    def test_keys_independent(self) -> None:
        limiter = RateLimiter(lambda: 0.0)
        limiter.charge("a", 1)
        assert limiter.charge("b", 1).accepted

    def test_resized_bucket_starts_full(self) -> None:
        limiter = RateLimiter(lambda: 0.0)
        limiter.charge("a", 1)
        assert limiter.charge("a", 5).accepted

    def test_bounded(self) -> None:
        limiter = RateLimiter(lambda: 0.0, buckets_max=3)
        for name in "abcdef":
            limiter.charge(name, 1)
        assert len(limiter) == 3


class TestRequestBudget:
    """An API key gets its requests a minute, then 429 with Retry-After."""

    def test_over_budget_429(self, start_service: StartService) -> None:
        svc = start_service(budget_requests_per_minute=3, clock=FakeClock())
        statuses = [
            svc.client.post("/api/derive-keys", headers=auth(), json=derive_body()).status_code
            for _ in range(4)
        ]
        assert statuses == [200, 200, 200, 429]

    def test_retry_after(self, start_service: StartService) -> None:
        svc = start_service(budget_requests_per_minute=3, clock=FakeClock())
        for _ in range(3):
            svc.client.post("/api/derive-keys", headers=auth(), json=derive_body())
        response = svc.client.post("/api/derive-keys", headers=auth(), json=derive_body())
        assert response.headers["Retry-After"] == "20"

    def test_error_body(self, start_service: StartService) -> None:
        svc = start_service(budget_requests_per_minute=1, clock=FakeClock())
        svc.client.post("/api/derive-keys", headers=auth(), json=derive_body())
        body = svc.client.post("/api/derive-keys", headers=auth(), json=derive_body()).json()
        assert body["error"]["code"] == "rate_limited"
        assert "budget of 1 requests a minute" in body["error"]["message"]

    def test_refilled_after_wait(self, start_service: StartService) -> None:
        clock = FakeClock()
        svc = start_service(budget_requests_per_minute=1, clock=clock)
        svc.client.post("/api/derive-keys", headers=auth(), json=derive_body())
        clock.advance(60)
        response = svc.client.post("/api/derive-keys", headers=auth(), json=derive_body())
        assert response.status_code == 200

    def test_default_is_100(self, start_service: StartService) -> None:
        svc = start_service(clock=FakeClock())
        statuses = [
            svc.client.post("/api/derive-keys", headers=auth(), json=derive_body(quantity=1))
            for _ in range(101)
        ]
        assert [r.status_code for r in statuses].count(200) == 100
        assert statuses[-1].status_code == 429

    def test_store_key_own_budget(
        self, start_service: StartService, key_store: ApiKeyStore
    ) -> None:
        _, big = key_store.create("identifier-api", requests_per_minute=5)
        _, small = key_store.create("ops", requests_per_minute=1)
        svc = start_service(key_store=key_store, clock=FakeClock())
        big_statuses = [
            svc.client.post(
                "/api/derive-keys", headers=auth(big.reveal_text()), json=derive_body()
            ).status_code
            for _ in range(5)
        ]
        small_statuses = [
            svc.client.post(
                "/api/derive-keys", headers=auth(small.reveal_text()), json=derive_body()
            ).status_code
            for _ in range(2)
        ]
        assert big_statuses == [200] * 5
        assert small_statuses == [200, 429]


class TestKeyBudget:
    """A request costs as many keys as it derives, charged before deriving."""

    def test_batch_charged_by_quantity(self, start_service: StartService) -> None:
        svc = start_service(budget_keys_per_minute=10, clock=FakeClock())
        first = svc.client.post("/api/derive-keys", headers=auth(), json=derive_body(quantity=6))
        second = svc.client.post("/api/derive-keys", headers=auth(), json=derive_body(quantity=6))
        assert first.status_code == 200
        assert second.status_code == 429

    def test_retry_after_for_missing_keys(self, start_service: StartService) -> None:
        svc = start_service(budget_keys_per_minute=60, clock=FakeClock())
        svc.client.post("/api/derive-keys", headers=auth(), json=derive_body(quantity=60))
        response = svc.client.post(
            "/api/derive-keys", headers=auth(), json=derive_body(quantity=30)
        )
        assert response.headers["Retry-After"] == "30"

    def test_rejected_batch_not_derived(self, start_service: StartService) -> None:
        svc = start_service(budget_keys_per_minute=10, clock=FakeClock())
        svc.client.post("/api/derive-keys", headers=auth(), json=derive_body(quantity=10))
        with structlog.testing.capture_logs() as events:
            response = svc.client.post(
                "/api/derive-keys", headers=auth(), json=derive_body(quantity=5)
            )
            (completed,) = events_named(
                events, "request_completed", request_id=response.headers["X-Request-ID"]
            )
        assert completed["keys_derived"] == 0

    def test_quantity_over_budget_422(self, start_service: StartService) -> None:
        svc = start_service(budget_keys_per_minute=10, clock=FakeClock())
        response = svc.client.post(
            "/api/derive-keys", headers=auth(), json=derive_body(quantity=11)
        )
        assert response.status_code == 422
        assert response.json()["error"]["field"] == "quantity"

    def test_sign_costs_one_key(self, start_service: StartService) -> None:
        svc = start_service(budget_keys_per_minute=2, clock=FakeClock())
        statuses = [
            svc.client.post("/api/sign", headers=auth(), json=sign_body(b"m")).status_code
            for _ in range(3)
        ]
        assert statuses == [200, 200, 429]


class TestAddressBudget:
    """Requests without a key count against the client address."""

    def test_health_limited(self, start_service: StartService) -> None:
        svc = start_service(budget_address_requests_per_minute=2, clock=FakeClock())
        statuses = [svc.client.get("/health").status_code for _ in range(3)]
        assert statuses == [200, 200, 429]

    def test_keyed_requests_not_charged(self, start_service: StartService) -> None:
        svc = start_service(budget_address_requests_per_minute=1, clock=FakeClock())
        for _ in range(3):
            svc.client.post("/api/derive-keys", headers=auth(), json=derive_body())
        assert svc.client.get("/health").status_code == 200


class TestFailedAuthentication:
    """Failed authentications from one address are limited, then even a good key waits."""

    def test_failures_limited(self, start_service: StartService) -> None:
        svc = start_service(budget_auth_failures_per_minute=3, clock=FakeClock())
        statuses = [
            svc.client.post(
                "/api/derive-keys", headers=auth("wrong"), json=derive_body()
            ).status_code
            for _ in range(4)
        ]
        assert statuses == [401, 401, 401, 429]

    def test_good_key_blocked_too(self, start_service: StartService) -> None:
        svc = start_service(budget_auth_failures_per_minute=2, clock=FakeClock())
        for _ in range(2):
            svc.client.post("/api/derive-keys", headers=auth("wrong"), json=derive_body())
        response = svc.client.post("/api/derive-keys", headers=auth(), json=derive_body())
        assert response.status_code == 429
        assert "failed authentications" in response.json()["error"]["message"]

    def test_unblocked_after_wait(self, start_service: StartService) -> None:
        clock = FakeClock()
        svc = start_service(budget_auth_failures_per_minute=1, clock=clock)
        svc.client.post("/api/derive-keys", headers=auth("wrong"), json=derive_body())
        clock.advance(60)
        response = svc.client.post("/api/derive-keys", headers=auth(), json=derive_body())
        assert response.status_code == 200

    @pytest.mark.parametrize("budget", [10])
    def test_default_failures(self, start_service: StartService, budget: int) -> None:
        svc = start_service(clock=FakeClock())
        statuses = [
            svc.client.post("/api/derive-keys", headers=auth("wrong")).status_code
            for _ in range(budget + 1)
        ]
        assert statuses.count(401) == budget
        assert statuses[-1] == 429
