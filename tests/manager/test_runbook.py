"""Runbook steps on a real SQLite store: gates, finalize, removal and webhook notices."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
from migration_support import pick_port

from plings_hsm.cli.exit_codes import exit_code_of
from plings_hsm.errors import GateFailedError, MigrationStateError
from plings_hsm.manager.config import ManagerSettings
from plings_hsm.manager.gates import GateLimits, read_gate
from plings_hsm.manager.migration import REMOVE_CONFIRMATION, Runbook
from plings_hsm.manager.notify import MigrationNotice, Notifier
from plings_hsm.store.audit import list_audit
from plings_hsm.store.db import Store
from plings_hsm.store.migration import RequestRecord, load_state, record_requests


class _Receiver(BaseHTTPRequestHandler):
    bodies: ClassVar[list[dict[str, object]]] = []

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        _Receiver.bodies.append(json.loads(self.rfile.read(length)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        return


@pytest.fixture
def receiver() -> Iterator[str]:
    """A tiny HTTP receiver on 127.0.0.1 that keeps the JSON bodies it gets."""
    _Receiver.bodies = []
    server = HTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()
    server.server_close()


def make_runbook(tmp_path: Path, urls: tuple[str, ...] = (), min_requests: int = 3) -> Runbook:
    store = Store(f"sqlite:///{tmp_path / 'state.db'}")
    settings = ManagerSettings(soak_s=0.2, state_poll_s=0.05, gate_min_requests=min_requests)
    return Runbook(store, settings, Notifier(urls, timeout_s=1.0), "tester")


def add_matches(runbook: Runbook, count: int, latency_ms: float = 5.0) -> None:
    state = runbook.status()
    record_requests(
        runbook.store,
        [
            RequestRecord(
                at=time.time(),
                step_number=state.step_number,
                step=state.step,
                outcome="match",
                keys=1,
                hsm_latency_ms=latency_ms,
            )
            for _ in range(count)
        ],
    )


def pass_to_100(tmp_path: Path) -> Runbook:
    """Start and pass the gates of 5, 25 and 50 %, then stand at 100 % with no gate read."""
    runbook = make_runbook(tmp_path, min_requests=0)
    runbook.start("fingerprint")
    for step in (5, 25, 50):
        read_gate(runbook.store, runbook.advance(step), runbook.limits)
    runbook.advance(100)
    runbook.limits = GateLimits(3, 0.01, 500.0)
    return runbook


class TestRun:
    """run passes steps only through gates and rolls back on a failed one."""

    def test_failed_gate_rolls_back(self, tmp_path: Path) -> None:
        runbook = make_runbook(tmp_path)
        runbook.start("fingerprint")
        result = runbook.run()
        state = load_state(runbook.store)
        assert not result.ok
        assert result.failed is not None
        assert "compared requests" in result.failed.reason
        assert state is not None
        assert state.mode == "env"

    def test_slow_hsm_fails_gate(self, tmp_path: Path) -> None:
        runbook = make_runbook(tmp_path, min_requests=0)
        runbook.start("fingerprint")
        runbook.advance(5)
        add_matches(runbook, 10, latency_ms=900.0)
        result = runbook.run()
        assert result.failed is not None
        assert "p99 latency" in result.failed.reason

    def test_start_twice_rejected(self, tmp_path: Path) -> None:
        runbook = make_runbook(tmp_path)
        runbook.start("fingerprint")
        with pytest.raises(MigrationStateError, match="needs mode env"):
            runbook.start("fingerprint")


class TestFinalize:
    """finalize needs 100 % soaked with a passing gate."""

    def test_before_soak_rejected(self, tmp_path: Path) -> None:
        runbook = pass_to_100(tmp_path)
        with pytest.raises(MigrationStateError, match="soaked"):
            runbook.finalize(soak_s=60)

    def test_after_soak_switches_to_hsm(self, tmp_path: Path) -> None:
        runbook = pass_to_100(tmp_path)
        add_matches(runbook, 5)
        assert runbook.finalize(soak_s=0).mode == "hsm"

    def test_skipped_steps_rejected(self, tmp_path: Path) -> None:
        runbook = make_runbook(tmp_path, min_requests=0)
        runbook.start("fingerprint")
        runbook.advance(100)
        with pytest.raises(MigrationStateError, match="missing: dual-5, dual-25, dual-50"):
            runbook.finalize(soak_s=0)

    def test_one_skipped_step_named(self, tmp_path: Path) -> None:
        runbook = make_runbook(tmp_path, min_requests=0)
        runbook.start("fingerprint")
        for step in (5, 50):
            read_gate(runbook.store, runbook.advance(step), runbook.limits)
        runbook.advance(100)
        with pytest.raises(MigrationStateError, match=r"missing: dual-25\. "):
            runbook.finalize(soak_s=0)

    def test_failing_gate_rolls_back(self, tmp_path: Path) -> None:
        runbook = pass_to_100(tmp_path)
        runbook.limits = GateLimits(1000, 0.01, 500.0)
        with pytest.raises(GateFailedError, match="gate of dual-100 failed"):
            runbook.finalize(soak_s=0)
        state = load_state(runbook.store)
        assert state is not None
        assert state.mode == "env"

    def test_failed_gate_exit_9(self) -> None:
        assert exit_code_of(GateFailedError("gate failed")) == 9

    def test_remove_needs_confirmation(self, tmp_path: Path) -> None:
        runbook = pass_to_100(tmp_path)
        add_matches(runbook, 5)
        runbook.finalize(soak_s=0)
        with pytest.raises(MigrationStateError, match="confirmation"):
            runbook.remove_env_master("yes")
        assert runbook.remove_env_master(REMOVE_CONFIRMATION).env_master_removed


class TestRollback:
    """rollback works from any step and posts to the webhooks."""

    def test_from_hsm(self, tmp_path: Path) -> None:
        runbook = pass_to_100(tmp_path)
        add_matches(runbook, 5)
        runbook.finalize(soak_s=0)
        assert runbook.rollback("drill").mode == "env"

    def test_posts_slack_body(self, tmp_path: Path, receiver: str) -> None:
        runbook = make_runbook(tmp_path, (receiver,))
        runbook.start("fingerprint")
        _Receiver.bodies.clear()
        runbook.rollback("drill")
        assert _Receiver.bodies[-1]["event"] == "rollback"
        assert "drill" in str(_Receiver.bodies[-1]["text"])

    def test_webhook_down_ignored(self, tmp_path: Path, receiver: str) -> None:
        down = f"http://127.0.0.1:{pick_port()}/down"
        runbook = make_runbook(tmp_path, (down, receiver))
        runbook.start("fingerprint")
        assert runbook.rollback("drill").mode == "env"
        assert _Receiver.bodies

    def test_audited_with_reason(self, tmp_path: Path) -> None:
        runbook = make_runbook(tmp_path)
        runbook.start("fingerprint")
        runbook.rollback("drill")
        with runbook.store.session() as session:
            entry = list_audit(session, action="rolled_back")[0]
        assert (entry.actor, entry.detail) == ("tester", "drill")

    def test_removed_master_needs_same_fingerprint(self, tmp_path: Path) -> None:
        runbook = pass_to_100(tmp_path)
        add_matches(runbook, 5)
        runbook.finalize(soak_s=0)
        runbook.remove_env_master(REMOVE_CONFIRMATION)
        with pytest.raises(MigrationStateError, match="has fingerprint other"):
            runbook.rollback("drill", master_fingerprint="other")
        assert runbook.rollback("drill", master_fingerprint="fingerprint").mode == "env"


class TestNotice:
    """The notice body is Slack-compatible and carries the fields."""

    def test_has_text_and_fields(self) -> None:
        body = MigrationNotice("rollback", "op", "dual at 5 %", "env", "drill").to_json()
        assert set(body) >= {"text", "event", "actor", "from", "to", "reason", "at"}
