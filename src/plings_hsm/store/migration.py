"""Migration tables: the current mode and rollout, served and compared requests, gate readings."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields, replace

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from plings_hsm.errors import MigrationStateError, StoreError
from plings_hsm.store.audit import append_audit
from plings_hsm.store.db import Base, Store

__all__ = [
    "GateReadingRecord",
    "MigrationState",
    "MismatchRecord",
    "RequestOutcome",
    "RequestRecord",
    "StateChangedError",
    "StepStats",
    "change_state",
    "ensure_state",
    "latest_gate_readings",
    "load_state",
    "load_state_version",
    "passed_gate_steps",
    "record_gate_reading",
    "record_mismatch",
    "record_requests",
    "step_stats",
]

STATE_ROW_ID = 1
"""The state table has one row."""

CHANGE_ATTEMPTS = 5
"""Attempts of a state change that lost a race with another writer."""


class RequestOutcome:
    """Outcomes of a served request, as stored in ``migration_requests.outcome``."""

    ENV = "env"
    MATCH = "match"
    MISMATCH = "mismatch"
    HSM_ERROR = "hsm_error"
    HSM_RATE_LIMITED = "hsm_rate_limited"
    HSM = "hsm"
    FALLBACK = "fallback"

    COMPARED = (MATCH, MISMATCH, HSM_ERROR)
    """Outcomes of requests that the HSM was asked for in dual mode."""


class _StateRow(Base):
    __tablename__ = "migration_state"

    id: Mapped[int] = mapped_column(primary_key=True)
    mode: Mapped[str] = mapped_column(sa.String(20), nullable=False)
    percentage: Mapped[int] = mapped_column(sa.Integer, nullable=False)
    whitelist: Mapped[str] = mapped_column(sa.Text, nullable=False, default="")
    step: Mapped[str] = mapped_column(sa.String(40), nullable=False)
    step_number: Mapped[int] = mapped_column(sa.Integer, nullable=False, default=0)
    step_started_at: Mapped[float] = mapped_column(sa.Float, nullable=False)
    fallback_enabled: Mapped[bool] = mapped_column(sa.Boolean, nullable=False, default=True)
    env_master_removed: Mapped[bool] = mapped_column(sa.Boolean, nullable=False, default=False)
    expected_fingerprint: Mapped[str] = mapped_column(sa.String(64), nullable=False, default="")
    version: Mapped[int] = mapped_column(sa.Integer, nullable=False, default=1)
    updated_at: Mapped[float] = mapped_column(sa.Float, nullable=False)
    updated_by: Mapped[str] = mapped_column(sa.String(200), nullable=False)


class RequestRecord(Base):
    """One served request: step, outcome, keys and the HSM's latency and error, if asked."""

    __tablename__ = "migration_requests"
    __table_args__ = (sa.Index("ix_migration_requests_step", "step_number", "outcome"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(sa.Float, nullable=False)
    step_number: Mapped[int] = mapped_column(sa.Integer, nullable=False)
    step: Mapped[str] = mapped_column(sa.String(40), nullable=False)
    outcome: Mapped[str] = mapped_column(sa.String(20), nullable=False)
    keys: Mapped[int] = mapped_column(sa.Integer, nullable=False)
    hsm_latency_ms: Mapped[float | None] = mapped_column(sa.Float, nullable=True)
    error: Mapped[str] = mapped_column(sa.String(200), nullable=False, default="")
    request_id: Mapped[str] = mapped_column(sa.String(64), nullable=False, default="")


class MismatchRecord(Base):
    """A path whose HSM public key differed from the env public key."""

    __tablename__ = "migration_mismatches"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(sa.Float, nullable=False)
    step_number: Mapped[int] = mapped_column(sa.Integer, nullable=False, index=True)
    step: Mapped[str] = mapped_column(sa.String(40), nullable=False)
    request_id: Mapped[str] = mapped_column(sa.String(64), nullable=False, default="")
    hd_path: Mapped[str] = mapped_column(sa.String(200), nullable=False)
    env_public_key: Mapped[str] = mapped_column(sa.String(64), nullable=False)
    hsm_public_key: Mapped[str] = mapped_column(sa.String(64), nullable=False)


class GateReadingRecord(Base):
    """A gate reading of one step: counts, rates, latency, verdict and its reason."""

    __tablename__ = "migration_gate_readings"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(sa.Float, nullable=False)
    step_number: Mapped[int] = mapped_column(sa.Integer, nullable=False, index=True)
    step: Mapped[str] = mapped_column(sa.String(40), nullable=False)
    compared: Mapped[int] = mapped_column(sa.Integer, nullable=False)
    errors: Mapped[int] = mapped_column(sa.Integer, nullable=False)
    mismatches: Mapped[int] = mapped_column(sa.Integer, nullable=False)
    error_rate: Mapped[float] = mapped_column(sa.Float, nullable=False)
    p99_ms: Mapped[float] = mapped_column(sa.Float, nullable=False)
    passed: Mapped[bool] = mapped_column(sa.Boolean, nullable=False)
    reason: Mapped[str] = mapped_column(sa.Text, nullable=False)


@dataclass(frozen=True, slots=True)
class MigrationState:
    """The migration state every service follows.

    ``step_number`` grows by one at every step change, so records of a step are kept
    apart from records of an earlier visit to the same percentage.
    """

    mode: str
    percentage: int
    whitelist: tuple[str, ...]
    step: str
    step_number: int
    step_started_at: float
    fallback_enabled: bool
    env_master_removed: bool
    expected_fingerprint: str
    version: int
    updated_at: float
    updated_by: str


@dataclass(frozen=True, slots=True)
class StepStats:
    """Counts of one step's requests, and the HSM latencies of its compared requests."""

    served: int
    compared: int
    matches: int
    mismatches: int
    errors: int
    fallbacks: int
    latencies_ms: tuple[float, ...]
    rate_limited: int = 0
    """Dual-mode requests that got 429 from the HSM service; not compared, and not errors."""


def _state_of(row: _StateRow) -> MigrationState:
    return MigrationState(
        mode=row.mode,
        percentage=row.percentage,
        whitelist=tuple(part for part in row.whitelist.split(",") if part),
        step=row.step,
        step_number=row.step_number,
        step_started_at=row.step_started_at,
        fallback_enabled=row.fallback_enabled,
        env_master_removed=row.env_master_removed,
        expected_fingerprint=row.expected_fingerprint,
        version=row.version,
        updated_at=row.updated_at,
        updated_by=row.updated_by,
    )


def _text(value: object) -> str:
    if isinstance(value, tuple):
        return ",".join(str(part) for part in value)
    return str(value)


def load_state(store: Store) -> MigrationState | None:
    """Return the migration state, or None before :func:`ensure_state` ran."""
    with store.session() as session:
        row = session.get(_StateRow, STATE_ROW_ID)
        return _state_of(row) if row is not None else None


def load_state_version(store: Store) -> int | None:
    """Return the state's version only, a cheap read for services that poll for changes."""
    with store.session() as session:
        return session.scalar(sa.select(_StateRow.version).where(_StateRow.id == STATE_ROW_ID))


def ensure_state(store: Store, initial: MigrationState) -> MigrationState:
    """Insert ``initial`` when the store has no state yet and return the stored state.

    The environment gives the starting values only: once a state is stored, it wins.
    """
    for _attempt in range(CHANGE_ATTEMPTS):
        try:
            with store.session() as session:
                row = session.get(_StateRow, STATE_ROW_ID)
                if row is not None:
                    return _state_of(row)
                values = asdict(initial)
                values["whitelist"] = ",".join(initial.whitelist)
                session.add(_StateRow(id=STATE_ROW_ID, **values))
                append_audit(
                    session,
                    actor=initial.updated_by,
                    action="state_initialized",
                    new_value=f"mode={initial.mode} percentage={initial.percentage}",
                )
                session.flush()
                return initial
        except StoreError:
            continue
    raise StoreError(f"migration state could not be stored after {CHANGE_ATTEMPTS} attempts")


class StateChangedError(MigrationStateError):
    """The state changed after the caller checked it, so the change was not written."""


def change_state(
    store: Store,
    *,
    actor: str,
    action: str,
    changes: Mapping[str, object],
    detail: str = "",
    new_step: bool = False,
    expected_version: int | None = None,
) -> tuple[MigrationState, MigrationState]:
    """Apply ``changes`` to the state and audit each changed field, in one transaction.

    With ``expected_version`` the change is a compare-and-set: it is written only while
    the stored version is still the one whose state the caller checked, and a writer that
    loses the race gets :class:`StateChangedError` with nothing written or audited.
    Without it, a writer that lost the race retries the whole change on the fresh state.

    Args:
        actor: who changes the state (user name, ``migrate-run``, ``key-manager``).
        action: what the change is (``migration_started``, ``rolled_back``, ...).
        changes: new values of :class:`MigrationState` fields.
        detail: free text for the audit rows, such as a rollback reason.
        new_step: start a new step: increase ``step_number``, reset ``step_started_at``.
        expected_version: the version of the state the caller's precondition was checked on.

    Returns:
        The state before and after the change.

    Raises:
        StateChangedError: when the stored version is not ``expected_version``.
        StoreError: when the state is missing or every attempt lost a race.
    """
    allowed = {item.name for item in fields(MigrationState)} - {"version", "updated_at"}
    unknown = set(changes) - allowed
    if unknown:
        raise ValueError(f"unknown migration state fields: {sorted(unknown)}")

    for _attempt in range(CHANGE_ATTEMPTS):
        try:
            with store.session() as session:
                row = session.get(_StateRow, STATE_ROW_ID)
                if row is None:
                    raise StoreError("migration state is missing; run 'plings-hsm migrate status'")
                before = _state_of(row)
                if expected_version is not None and before.version != expected_version:
                    raise _changed_error(before, expected_version)
                now = time.time()
                after = replace(before, **changes, version=before.version + 1)  # type: ignore[arg-type]
                if new_step:
                    after = replace(after, step_number=before.step_number + 1, step_started_at=now)
                after = replace(after, updated_at=now, updated_by=actor)
                values = {
                    "mode": after.mode,
                    "percentage": after.percentage,
                    "whitelist": ",".join(after.whitelist),
                    "step": after.step,
                    "step_number": after.step_number,
                    "step_started_at": after.step_started_at,
                    "fallback_enabled": after.fallback_enabled,
                    "env_master_removed": after.env_master_removed,
                    "expected_fingerprint": after.expected_fingerprint,
                    "version": after.version,
                    "updated_at": after.updated_at,
                    "updated_by": after.updated_by,
                }
                result = session.execute(
                    sa.update(_StateRow)
                    .where(_StateRow.id == STATE_ROW_ID, _StateRow.version == before.version)
                    .values(**values)
                    .execution_options(synchronize_session=False)
                )
                if getattr(result, "rowcount", 0) != 1:
                    if expected_version is not None:
                        raise StateChangedError(
                            f"the migration state changed after version {expected_version} "
                            f"was read; run 'plings-hsm migrate status' and try again"
                        )
                    raise _LostRaceError
                changed = [
                    name
                    for name in sorted(changes)
                    if getattr(before, name) != getattr(after, name)
                ]
                for name in changed or ["state"]:
                    append_audit(
                        session,
                        actor=actor,
                        action=action,
                        subject=name,
                        old_value=_text(getattr(before, name)) if changed else "",
                        new_value=_text(getattr(after, name)) if changed else "",
                        detail=detail,
                    )
                return before, after
        except (_LostRaceError, StoreError) as exc:
            last_error: Exception = exc
            continue
    raise StoreError(
        f"migration state change {action!r} failed after {CHANGE_ATTEMPTS} attempts: "
        f"{type(last_error).__name__}"
    )


def _changed_error(current: MigrationState, expected_version: int) -> StateChangedError:
    return StateChangedError(
        f"the migration state changed from version {expected_version} to {current.version} "
        f"(step {current.step}, by {current.updated_by}) after it was checked; run "
        "'plings-hsm migrate status' and try again"
    )


class _LostRaceError(Exception):
    """Another writer changed the state between this writer's read and update."""


def record_requests(store: Store, records: Iterable[RequestRecord]) -> int:
    """Insert request records in one transaction; return how many were written."""
    batch = list(records)
    if not batch:
        return 0
    with store.session() as session:
        session.add_all(batch)
    return len(batch)


def record_mismatch(store: Store, record: MismatchRecord) -> None:
    """Insert one mismatch record at once, outside any buffering."""
    with store.session() as session:
        session.add(record)


def step_stats(store: Store, step_number: int) -> StepStats:
    """Count a step's requests by outcome and collect the HSM latencies of compared ones."""
    with store.session() as session:
        counts = dict(
            session.execute(
                sa.select(RequestRecord.outcome, sa.func.count())
                .where(RequestRecord.step_number == step_number)
                .group_by(RequestRecord.outcome)
            ).all()
        )
        latencies = session.scalars(
            sa.select(RequestRecord.hsm_latency_ms).where(
                RequestRecord.step_number == step_number,
                RequestRecord.outcome.in_(RequestOutcome.COMPARED),
                RequestRecord.hsm_latency_ms.is_not(None),
            )
        ).all()
        mismatch_rows = session.scalar(
            sa.select(sa.func.count())
            .select_from(MismatchRecord)
            .where(MismatchRecord.step_number == step_number)
        )
    matches = int(counts.get(RequestOutcome.MATCH, 0))
    mismatches = max(int(counts.get(RequestOutcome.MISMATCH, 0)), int(mismatch_rows or 0))
    errors = int(counts.get(RequestOutcome.HSM_ERROR, 0))
    return StepStats(
        served=int(sum(counts.values())),
        compared=matches + mismatches + errors,
        matches=matches,
        mismatches=mismatches,
        errors=errors,
        fallbacks=int(counts.get(RequestOutcome.FALLBACK, 0)),
        latencies_ms=tuple(float(value) for value in latencies if value is not None),
        rate_limited=int(counts.get(RequestOutcome.HSM_RATE_LIMITED, 0)),
    )


def record_gate_reading(store: Store, reading: GateReadingRecord) -> None:
    """Insert one gate reading."""
    with store.session() as session:
        session.add(reading)


def latest_gate_readings(store: Store, limit: int = 10) -> list[GateReadingRecord]:
    """Return the newest gate readings, newest first."""
    with store.session() as session:
        return list(
            session.scalars(
                sa.select(GateReadingRecord).order_by(GateReadingRecord.id.desc()).limit(limit)
            ).all()
        )


def passed_gate_steps(store: Store, since: float) -> set[str]:
    """Return the steps (``dual-5``, ...) whose gate passed at or after ``since``."""
    with store.session() as session:
        return set(
            session.scalars(
                sa.select(GateReadingRecord.step).where(
                    GateReadingRecord.passed.is_(True), GateReadingRecord.at >= since
                )
            ).all()
        )
