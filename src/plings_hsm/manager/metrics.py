"""Prometheus metrics of the key manager, in a registry owned by one app."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from plings_hsm.manager.config import KeyManagementMode

__all__ = ["ManagerMetrics"]

_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ManagerMetrics:
    """Counters and gauges of served requests, comparisons, fallbacks and the migration state.

    Args:
        registry: the registry of one app, so two apps in a process do not collide.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.served = Counter(
            "plings_key_requests",
            "Derive requests served, by the source whose keys were returned",
            ["source"],
            registry=registry,
        )
        self.comparisons = Counter(
            "plings_key_comparisons",
            "Dual-mode requests the HSM was asked for, by outcome (match, mismatch, hsm_error)",
            ["outcome"],
            registry=registry,
        )
        self.mismatched_keys = Counter(
            "plings_key_mismatched_keys",
            "Keys whose HSM public key differed from the env public key",
            registry=registry,
        )
        self.fallbacks = Counter(
            "plings_hsm_fallbacks",
            "Requests in hsm mode served by the env master because the HSM failed",
            registry=registry,
        )
        self.hsm_latency = Histogram(
            "plings_hsm_request_seconds",
            "Time of derive calls to the HSM, successful or not",
            buckets=_LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.percentage = Gauge(
            "plings_migration_percentage", "Current rollout percentage", registry=registry
        )
        self.mode = Gauge(
            "plings_migration_mode",
            "1 for the current key management mode",
            ["mode"],
            registry=registry,
        )
        self.state_version = Gauge(
            "plings_migration_state_version",
            "Version of the migration state in force",
            registry=registry,
        )

    def show_state(self, mode: str, percentage: int, version: int) -> None:
        """Set the state gauges."""
        for known in KeyManagementMode:
            self.mode.labels(mode=known.value).set(1 if known.value == mode else 0)
        self.percentage.set(percentage)
        self.state_version.set(version)
