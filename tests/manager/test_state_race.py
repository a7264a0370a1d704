"""State changes are compare-and-set: a change checked on an old version writes nothing."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from plings_hsm.errors import MigrationStateError
from plings_hsm.manager.config import ManagerSettings
from plings_hsm.manager.migration import Runbook
from plings_hsm.manager.notify import Notifier
from plings_hsm.store.audit import list_audit
from plings_hsm.store.db import Store
from plings_hsm.store.migration import StateChangedError, change_state, load_state

RACE_ROUNDS = 15


def runbook_on(path: Path, actor: str) -> Runbook:
    settings = ManagerSettings(soak_s=0.0, state_poll_s=0.05, gate_min_requests=0)
    return Runbook(Store(f"sqlite:///{path}"), settings, Notifier((), timeout_s=1.0), actor)


def audit_count(store: Store, action: str) -> int:
    with store.session() as session:
        return len(list_audit(session, action=action))


class TestCompareAndSet:
    """change_state with an expected version."""

    def test_stale_version_rejected(self, tmp_path: Path) -> None:
        runbook = runbook_on(tmp_path / "state.db", "op")
        checked = runbook.start("fingerprint")
        runbook.rollback("operator saw a problem")
        with pytest.raises(StateChangedError, match=f"version {checked.version}"):
            change_state(
                runbook.store,
                actor="op",
                action="rollout_advanced",
                changes={"percentage": 100, "step": "dual-100"},
                expected_version=checked.version,
            )

    def test_stale_change_writes_nothing(self, tmp_path: Path) -> None:
        runbook = runbook_on(tmp_path / "state.db", "op")
        checked = runbook.start("fingerprint")
        after_rollback = runbook.rollback("operator saw a problem")
        with pytest.raises(StateChangedError):
            change_state(
                runbook.store,
                actor="op",
                action="rollout_advanced",
                changes={"percentage": 100, "step": "dual-100"},
                expected_version=checked.version,
            )
        assert load_state(runbook.store) == after_rollback
        assert audit_count(runbook.store, "rollout_advanced") == 0

    def test_state_error_is_migration_error(self) -> None:
        assert issubclass(StateChangedError, MigrationStateError)


class TestAdvanceRollbackRace:
    """advance and rollback run at once from separate connections to one SQLite file."""

    @pytest.mark.parametrize("round_number", range(RACE_ROUNDS))
    def test_state_stays_consistent(self, tmp_path: Path, round_number: int) -> None:
        path = tmp_path / f"race-{round_number}.db"
        advancer = runbook_on(path, "advancer")
        roller = runbook_on(path, "roller")
        advancer.start("fingerprint")
        barrier = threading.Barrier(2)
        advance_errors: list[Exception] = []

        def advance() -> None:
            barrier.wait()
            try:
                advancer.advance(100)
            except MigrationStateError as exc:
                advance_errors.append(exc)

        def roll_back() -> None:
            barrier.wait()
            roller.rollback("race")

        threads = [threading.Thread(target=advance), threading.Thread(target=roll_back)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)

        state = load_state(advancer.store)
        assert state is not None
        assert state.mode == "env"
        assert state.percentage == 0
        assert state.step == "env"
        advanced_rows = audit_count(advancer.store, "rollout_advanced")
        if advance_errors:
            assert advanced_rows == 0
        else:
            assert advanced_rows > 0
