"""Gates between rollout steps: verdicts computed from the requests recorded in the store."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from plings_hsm.store.db import Store
from plings_hsm.store.migration import (
    GateReadingRecord,
    MigrationState,
    StepStats,
    record_gate_reading,
    step_stats,
)

__all__ = ["GateLimits", "GateReading", "p99_ms", "read_gate"]


@dataclass(frozen=True, slots=True)
class GateLimits:
    """Limits a step must meet before the next: enough comparisons, low errors and latency.

    Args:
        min_requests: compared requests the step needs at least.
        max_error_rate: largest share of compared requests the HSM may fail, 0 to 1.
        max_p99_ms: largest 99th percentile of the HSM's derive latency, in milliseconds.
    """

    min_requests: int
    max_error_rate: float
    max_p99_ms: float


@dataclass(frozen=True, slots=True)
class GateReading:
    """A gate verdict of one step with the figures it was made from."""

    step: str
    step_number: int
    stats: StepStats
    error_rate: float
    p99_ms: float
    passed: bool
    reasons: tuple[str, ...]

    @property
    def reason(self) -> str:
        """The failed conditions joined in one sentence, or ``passed``."""
        return "; ".join(self.reasons) if self.reasons else "passed"


def p99_ms(latencies_ms: tuple[float, ...]) -> float:
    """Return the 99th percentile by the nearest-rank method, 0 for no samples."""
    if not latencies_ms:
        return 0.0
    ordered = sorted(latencies_ms)
    rank = max(1, math.ceil(0.99 * len(ordered)))
    return ordered[rank - 1]


def read_gate(store: Store, state: MigrationState, limits: GateLimits) -> GateReading:
    """Compute the gate of the current step from the store and record the reading.

    A mismatch fails the gate whatever else the step shows.
    """
    stats = step_stats(store, state.step_number)
    error_rate = stats.errors / stats.compared if stats.compared else 0.0
    latency = p99_ms(stats.latencies_ms)

    reasons = []
    if stats.mismatches:
        reasons.append(f"{stats.mismatches} mismatched request(s); need 0")
    if stats.compared < limits.min_requests:
        limited = (
            f" ({stats.rate_limited} more were answered 429 by the HSM service)"
            if stats.rate_limited
            else ""
        )
        reasons.append(
            f"{stats.compared} compared requests{limited}; need at least {limits.min_requests}"
        )
    if error_rate > limits.max_error_rate:
        reasons.append(
            f"HSM error rate {error_rate:.4f} is above the limit {limits.max_error_rate:.4f}"
        )
    if latency > limits.max_p99_ms:
        reasons.append(
            f"HSM p99 latency {latency:.1f} ms is above the limit {limits.max_p99_ms:.1f} ms"
        )

    reading = GateReading(
        state.step, state.step_number, stats, error_rate, latency, not reasons, tuple(reasons)
    )
    record_gate_reading(
        store,
        GateReadingRecord(
            at=time.time(),
            step_number=state.step_number,
            step=state.step,
            compared=stats.compared,
            errors=stats.errors,
            mismatches=stats.mismatches,
            error_rate=error_rate,
            p99_ms=latency,
            passed=reading.passed,
            reason=reading.reason,
        ),
    )
    return reading
