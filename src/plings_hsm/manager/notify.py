"""Webhook notices of migration events, posted as JSON and never allowed to fail a command."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx
import structlog

__all__ = ["MigrationNotice", "Notifier"]

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class MigrationNotice:
    """One migration event: what happened, who did it, from which state to which, and why."""

    event: str
    actor: str
    from_state: str
    to_state: str
    reason: str

    def to_json(self) -> dict[str, object]:
        """Return the body: a Slack-compatible ``text`` plus the fields for other receivers."""
        return {
            "text": (
                f"plings-hsm {self.event}: {self.from_state} -> {self.to_state} "
                f"by {self.actor}. {self.reason}"
            ).strip(),
            "event": self.event,
            "actor": self.actor,
            "from": self.from_state,
            "to": self.to_state,
            "reason": self.reason,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }


class Notifier:
    """Posts notices to webhook URLs; a receiver that is down is logged and skipped.

    Args:
        urls: webhook URLs; query strings may carry tokens, so only the host is logged.
        timeout_s: timeout of each post.
    """

    def __init__(self, urls: Sequence[str], timeout_s: float = 3.0) -> None:
        self.urls = tuple(urls)
        self._timeout_s = timeout_s

    def send(self, notice: MigrationNotice) -> int:
        """Post ``notice`` to every URL and return how many receivers accepted it (2xx)."""
        delivered = 0
        body = notice.to_json()
        for url in self.urls:
            host = httpx.URL(url).host
            try:
                response = httpx.post(url, json=body, timeout=self._timeout_s)
            except httpx.HTTPError as exc:
                log.warning(
                    "webhook_failed", notice=notice.event, host=host, error=type(exc).__name__
                )
                continue
            if response.is_success:
                delivered += 1
                log.info("webhook_sent", notice=notice.event, host=host)
            else:
                log.warning(
                    "webhook_failed", notice=notice.event, host=host, status=response.status_code
                )
        return delivered

    def send_in_background(self, notice: MigrationNotice) -> threading.Thread:
        """Post ``notice`` from a daemon thread, so a request or command does not wait."""
        thread = threading.Thread(target=self.send, args=(notice,), name="webhooks", daemon=True)
        thread.start()
        return thread
