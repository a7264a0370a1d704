"""Rollout membership: a whitelist of user ids and a percentage of stable hash buckets."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["BUCKET_COUNT", "PERCENTAGE_MAX", "Rollout", "bucket_of", "parse_whitelist"]

BUCKET_COUNT = 100
"""Number of buckets; a bucket is compared with the rollout percentage."""

PERCENTAGE_MAX = 100
"""Largest rollout percentage: every user is inside."""


def bucket_of(user_id: str) -> int:
    """Return the bucket of a user id: the first four bytes of SHA-256, big-endian, mod 100.

    The bucket depends on the user id alone, so a user inside at percentage ``p`` stays
    inside at every larger percentage.
    """
    digest = hashlib.sha256(user_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % BUCKET_COUNT


def parse_whitelist(text: str) -> frozenset[str]:
    """Split comma-separated user ids, dropping surrounding spaces and empty entries."""
    return frozenset(part.strip() for part in text.split(",") if part.strip())


@dataclass(frozen=True, slots=True)
class Rollout:
    """Which requests the HSM takes part in: whitelisted users and buckets below a percentage.

    Args:
        percentage: 0 to 100; a bucket below it is inside.
        whitelist: user ids that are inside whatever the percentage.

    Raises:
        ValueError: when the percentage is outside 0 to 100.
    """

    percentage: int = 0
    whitelist: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if isinstance(self.percentage, bool) or not 0 <= self.percentage <= PERCENTAGE_MAX:
            raise ValueError(
                f"rollout percentage {self.percentage!r} is out of range; allowed 0 to "
                f"{PERCENTAGE_MAX}"
            )

    @classmethod
    def of(cls, percentage: int, whitelist: Iterable[str] = ()) -> Rollout:
        """Build a rollout from a percentage and any iterable of user ids."""
        return cls(percentage, frozenset(whitelist))

    def includes(self, user_id: str | None) -> bool:
        """Return whether a request of ``user_id`` is inside; a request without one is outside."""
        if not user_id:
            return False
        if user_id in self.whitelist:
            return True
        return bucket_of(user_id) < self.percentage
