"""Rollout membership by whitelist and by stable SHA-256 buckets."""

from __future__ import annotations

import hashlib

import pytest

from plings_hsm.manager.rollout import Rollout, bucket_of, parse_whitelist

USER_IDS = [f"user-{number}" for number in range(1000)]


class TestBucket:
    """The bucket is the first four SHA-256 bytes, big-endian, modulo 100."""

    def test_matches_definition(self) -> None:
        digest = hashlib.sha256(b"alice").digest()
        assert bucket_of("alice") == int.from_bytes(digest[:4], "big") % 100

    def test_utf8_user_id(self) -> None:
        digest = hashlib.sha256("zoë".encode()).digest()
        assert bucket_of("zoë") == int.from_bytes(digest[:4], "big") % 100

    def test_range(self) -> None:
        assert all(0 <= bucket_of(user) < 100 for user in USER_IDS)


class TestRollout:
    """Who is inside at a percentage and a whitelist."""

    def test_half_takes_400_to_600(self) -> None:
        inside = sum(Rollout(50).includes(user) for user in USER_IDS)
        assert 400 <= inside <= 600

    def test_inclusion_is_monotonic(self) -> None:
        for user in USER_IDS:
            first = next((p for p in range(101) if Rollout(p).includes(user)), None)
            assert first is not None
            assert all(Rollout(p).includes(user) for p in range(first, 101))

    def test_zero_takes_nobody(self) -> None:
        assert not any(Rollout(0).includes(user) for user in USER_IDS)

    def test_hundred_takes_everybody(self) -> None:
        assert all(Rollout(100).includes(user) for user in USER_IDS)

    def test_whitelist_inside_at_zero(self) -> None:
        assert Rollout.of(0, ["vip"]).includes("vip")

    def test_missing_user_outside(self) -> None:
        assert not Rollout(100).includes(None)

    def test_empty_user_outside(self) -> None:
        assert not Rollout(100).includes("")

    @pytest.mark.parametrize("percentage", [-1, 101])
    def test_rejects_out_of_range(self, percentage: int) -> None:
        with pytest.raises(ValueError, match="out of range"):
            Rollout(percentage)


class TestParseWhitelist:
    """Comma-separated user ids with spaces and empty entries dropped."""

    def test_splits_and_strips(self) -> None:
        assert parse_whitelist(" a, b,,c ") == frozenset({"a", "b", "c"})

    def test_empty_text(self) -> None:
        assert parse_whitelist("") == frozenset()
