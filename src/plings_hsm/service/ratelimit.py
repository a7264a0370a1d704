"""Per-process token buckets that charge a cost and return the wait until it fits.

Written here rather than taken from the ``limits`` package for two reasons: a request
costs as many keys as it derives, and the 429 must state how long until that whole cost
fits, which a token bucket computes exactly. And tests pass in a clock instead of
sleeping for a minute. State lives in this process only.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["BUCKETS_MAX", "Charge", "RateLimiter", "TokenBucket"]

BUCKETS_MAX = 100_000
"""Buckets a limiter keeps; past this the least recently used bucket is dropped."""

SECONDS_PER_MINUTE = 60.0


@dataclass(frozen=True, slots=True)
class Charge:
    """Outcome of charging a bucket: whether it was accepted, and if not, the wait."""

    accepted: bool
    retry_after_s: int = 0
    remaining: int = 0


class TokenBucket:
    """A bucket of ``per_minute`` tokens that refills at ``per_minute / 60`` a second.

    A full bucket lets a burst of ``per_minute`` through; after that the rate is the
    refill rate. A charge is all or nothing.
    """

    __slots__ = ("capacity", "refill_per_s", "tokens", "updated_at")

    def __init__(self, per_minute: int, now: float) -> None:
        self.capacity = float(per_minute)
        self.refill_per_s = per_minute / SECONDS_PER_MINUTE
        self.tokens = float(per_minute)
        self.updated_at = now

    def _refill(self, now: float) -> None:
        elapsed = max(0.0, now - self.updated_at)
        self.tokens = min(self.capacity, self.tokens + elapsed * self.refill_per_s)
        self.updated_at = now

    def check(self, cost: int, now: float) -> Charge:
        """Tell whether ``cost`` tokens are there now, and if not, how long until they are."""
        self._refill(now)
        if cost <= self.tokens:
            return Charge(True, remaining=math.floor(self.tokens - cost))
        missing = cost - self.tokens
        return Charge(False, retry_after_s=max(1, math.ceil(missing / self.refill_per_s)))

    def charge(self, cost: int, now: float) -> Charge:
        """Take ``cost`` tokens if the bucket has them; else take none and return the wait."""
        result = self.check(cost, now)
        if result.accepted:
            self.tokens -= cost
        return result


class RateLimiter:
    """Token buckets by key (an API key id or a peer address), each with its own size.

    Args:
        clock: monotonic seconds; tests pass a clock they move by hand.
        buckets_max: buckets kept before the least recently used ones are dropped.
    """

    def __init__(self, clock: Callable[[], float], buckets_max: int = BUCKETS_MAX) -> None:
        self._clock = clock
        self._buckets_max = buckets_max
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._lock = threading.Lock()

    def charge(self, key: str, per_minute: int, cost: int = 1) -> Charge:
        """Charge ``cost`` to the bucket of ``key``, sized ``per_minute``.

        A bucket whose size changed (a key's budget was edited) starts again full at the
        new size.
        """
        with self._lock:
            now = self._clock()
            bucket = self._buckets.get(key)
            if bucket is None or bucket.capacity != per_minute:
                bucket = TokenBucket(per_minute, now)
                self._buckets[key] = bucket
                self._evict()
            self._buckets.move_to_end(key)
            return bucket.charge(cost, now)

    def peek(self, key: str, cost: int = 1) -> Charge:
        """Tell whether ``cost`` would fit the bucket of ``key`` without charging it."""
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                return Charge(True)
            return bucket.check(cost, self._clock())

    def __len__(self) -> int:
        return len(self._buckets)

    def _evict(self) -> None:
        # The least recently charged bucket has most likely refilled, and a full bucket
        # equals a new one. Dropping a bucket that is not full forgives its debt.
        while len(self._buckets) > self._buckets_max:
            self._buckets.popitem(last=False)
