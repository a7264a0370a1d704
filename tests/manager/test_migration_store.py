"""Migration state, request records and the hash-chained audit table on a SQLite file."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from plings_hsm.store.audit import AuditRow, list_audit, verify_audit_chain
from plings_hsm.store.db import Store
from plings_hsm.store.migration import (
    MigrationState,
    MismatchRecord,
    RequestOutcome,
    RequestRecord,
    change_state,
    ensure_state,
    load_state,
    record_mismatch,
    record_requests,
    step_stats,
)


def initial_state() -> MigrationState:
    now = time.time()
    return MigrationState(
        mode="env",
        percentage=0,
        whitelist=("alice",),
        step="env",
        step_number=0,
        step_started_at=now,
        fallback_enabled=True,
        env_master_removed=False,
        expected_fingerprint="",
        version=1,
        updated_at=now,
        updated_by="test",
    )


@pytest.fixture
def store(tmp_path: Path) -> Store:
    opened = Store(f"sqlite:///{tmp_path / 'state.db'}")
    ensure_state(opened, initial_state())
    return opened


class TestState:
    """The state row, its changes and their audit rows."""

    def test_environment_only_seeds(self, store: Store) -> None:
        change_state(store, actor="op", action="set", changes={"percentage": 5})
        kept = ensure_state(store, initial_state())
        assert kept.percentage == 5

    def test_change_bumps_version(self, store: Store) -> None:
        before, after = change_state(store, actor="op", action="set", changes={"mode": "dual"})
        assert after.version == before.version + 1

    def test_new_step_numbers_step(self, store: Store) -> None:
        _, after = change_state(
            store, actor="op", action="set", changes={"step": "dual-0"}, new_step=True
        )
        assert after.step_number == 1

    def test_change_audited_with_values(self, store: Store) -> None:
        change_state(store, actor="op", action="advanced", changes={"percentage": 25})
        with store.session() as session:
            entry = list_audit(session, action="advanced")[-1]
        assert (entry.actor, entry.subject, entry.old_value, entry.new_value) == (
            "op",
            "percentage",
            "0",
            "25",
        )

    def test_whitelist_round_trip(self, store: Store) -> None:
        change_state(store, actor="op", action="set", changes={"whitelist": ("a", "b")})
        state = load_state(store)
        assert state is not None
        assert state.whitelist == ("a", "b")

    def test_concurrent_changes_all_applied(self, tmp_path: Path, store: Store) -> None:
        def bump(index: int) -> None:
            other = Store(store.url)
            change_state(other, actor=f"writer-{index}", action="set", changes={"step": str(index)})
            other.close()

        threads = [threading.Thread(target=bump, args=(index,)) for index in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        state = load_state(store)
        assert state is not None
        assert state.version == 5
        with store.session() as session:
            assert verify_audit_chain(session).ok


class TestAuditChain:
    """Every row hashes its predecessor; an edit breaks the chain."""

    def test_chain_verifies(self, store: Store) -> None:
        for percentage in (5, 25, 50):
            change_state(store, actor="op", action="set", changes={"percentage": percentage})
        with store.session() as session:
            check = verify_audit_chain(session)
        assert check.ok
        assert check.rows == 4

    def test_edit_detected(self, store: Store) -> None:
        change_state(store, actor="op", action="set", changes={"percentage": 5})
        change_state(store, actor="op", action="set", changes={"percentage": 25})
        with store.session() as session:
            session.execute(sa.update(AuditRow).where(AuditRow.id == 2).values(new_value="50"))
        with store.session() as session:
            assert verify_audit_chain(session).broken_at == 2

    def test_deletion_detected(self, store: Store) -> None:
        change_state(store, actor="op", action="set", changes={"percentage": 5})
        change_state(store, actor="op", action="set", changes={"percentage": 25})
        with store.session() as session:
            session.execute(sa.delete(AuditRow).where(AuditRow.id == 2))
        with store.session() as session:
            assert verify_audit_chain(session).broken_at == 3


class TestStepStats:
    """Counts and latencies of one step's requests."""

    def test_counts_by_outcome(self, store: Store) -> None:
        now = time.time()
        outcomes = [RequestOutcome.MATCH] * 3 + [RequestOutcome.HSM_ERROR, RequestOutcome.ENV]
        record_requests(
            store,
            [
                RequestRecord(
                    at=now,
                    step_number=1,
                    step="dual-5",
                    outcome=outcome,
                    keys=1,
                    hsm_latency_ms=2.0,
                )
                for outcome in outcomes
            ],
        )
        stats = step_stats(store, 1)
        assert (stats.served, stats.compared, stats.matches, stats.errors) == (5, 4, 3, 1)

    def test_mismatch_record_counts(self, store: Store) -> None:
        record_mismatch(
            store,
            MismatchRecord(
                at=time.time(),
                step_number=2,
                step="dual-5",
                hd_path="m/44'/501'/1'/1'/1'/1'/1'/1'",
                env_public_key="a",
                hsm_public_key="b",
            ),
        )
        assert step_stats(store, 2).mismatches == 1

    def test_other_step_excluded(self, store: Store) -> None:
        record_requests(
            store,
            [RequestRecord(at=time.time(), step_number=3, step="dual-5", outcome="match", keys=1)],
        )
        assert step_stats(store, 4).served == 0
