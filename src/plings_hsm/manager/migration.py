"""The migration runbook as steps on the state store: start, advance, run, finalize, rollback."""

from __future__ import annotations

import hmac
import json
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from plings_hsm.backends.base import KeyBackend
from plings_hsm.errors import (
    FingerprintMismatchError,
    GateFailedError,
    InvalidRequestError,
    KeySourceUnavailableError,
    MigrationStateError,
)
from plings_hsm.manager.config import KeyManagementMode, ManagerSettings
from plings_hsm.manager.gates import GateLimits, GateReading, read_gate
from plings_hsm.manager.notify import MigrationNotice, Notifier
from plings_hsm.manager.rollout import PERCENTAGE_MAX
from plings_hsm.store.audit import list_audit, record_audit
from plings_hsm.store.db import Store
from plings_hsm.store.migration import (
    CHANGE_ATTEMPTS,
    MigrationState,
    StateChangedError,
    change_state,
    ensure_state,
    latest_gate_readings,
    load_state,
    passed_gate_steps,
    step_stats,
)

__all__ = [
    "REMOVE_CONFIRMATION",
    "ROLLOUT_STEPS",
    "RunResult",
    "Runbook",
    "check_reason",
    "describe",
    "initial_state",
    "open_state",
    "roll_back",
]

log = structlog.get_logger(__name__)

ROLLOUT_STEPS = (5, 25, 50, 100)
"""Rollout percentages that ``migrate run`` soaks in turn."""

REMOVE_CONFIRMATION = "remove env master"
"""Text an operator types to confirm ``migrate remove-env-master``."""

STEP_ENV = "env"
STEP_HSM = "hsm"
STEP_ENV_REMOVED = "hsm-env-removed"


SHOWN_VALUE_MAX_CHARS = 40
"""Characters of a rejected value quoted in a message."""


def _shown(value: str) -> str:
    if len(value) <= SHOWN_VALUE_MAX_CHARS:
        return json.dumps(value)
    return f"{json.dumps(value[:SHOWN_VALUE_MAX_CHARS])}... ({len(value)} characters)"


def check_reason(reason: str) -> None:
    """Reject a rollback reason with a control character (newline, tab, escape, ...).

    Raises:
        InvalidRequestError: naming ``reason`` and the first control character's position.
    """
    for position, character in enumerate(reason):
        if unicodedata.category(character) == "Cc":
            raise InvalidRequestError(
                f"reason contains the control character U+{ord(character):04X} at position "
                f"{position}; write it on one line without control characters",
                field="reason",
            )


def _dual_step(percentage: int) -> str:
    return f"dual-{percentage}"


def describe(state: MigrationState) -> str:
    """Return ``mode percentage step`` in one short phrase for messages and notices."""
    if state.mode == KeyManagementMode.DUAL:
        return f"dual at {state.percentage} % (step {state.step})"
    return f"{state.mode} (step {state.step})"


def initial_state(settings: ManagerSettings, actor: str) -> MigrationState:
    """Return the starting state the environment describes, used only when the store has none."""
    now = time.time()
    mode = settings.mode.value
    if settings.mode is KeyManagementMode.DUAL:
        step = _dual_step(settings.rollout_percentage)
    else:
        step = mode
    return MigrationState(
        mode=mode,
        percentage=settings.rollout_percentage,
        whitelist=tuple(sorted(settings.rollout_whitelist)),
        step=step,
        step_number=0,
        step_started_at=now,
        fallback_enabled=settings.fallback_enabled,
        env_master_removed=False,
        expected_fingerprint="",
        version=1,
        updated_at=now,
        updated_by=actor,
    )


def open_state(store: Store, settings: ManagerSettings, actor: str) -> MigrationState:
    """Return the stored state, storing the environment's starting values first if none."""
    return ensure_state(store, initial_state(settings, actor))


def roll_back(
    store: Store,
    *,
    actor: str,
    reason: str,
    notifier: Notifier | None,
    master_fingerprint: str | None = None,
    automatic: bool = False,
) -> tuple[MigrationState, MigrationState]:
    """Switch every service back to ``env`` at 0 %, audit it and post a notice.

    An automatic rollback (mismatch, failed gate) acts only while the state is ``dual`` or
    ``hsm``, so many callers racing to roll back write one change.

    Args:
        master_fingerprint: wallet fingerprint of an env master supplied again; required
            after ``remove-env-master`` and compared with the fingerprint recorded at start.

    Raises:
        KeySourceUnavailableError: after ``remove-env-master`` without an env master.
        MigrationStateError: after ``remove-env-master`` with another env master.
    """
    for _attempt in range(CHANGE_ATTEMPTS):
        try:
            return _roll_back_once(store, actor, reason, notifier, master_fingerprint, automatic)
        except StateChangedError:
            # Rollback is allowed from every step, so its checks run again on the new state.
            continue
    raise MigrationStateError(
        f"the migration state kept changing; rollback failed after {CHANGE_ATTEMPTS} attempts"
    )


def _roll_back_once(
    store: Store,
    actor: str,
    reason: str,
    notifier: Notifier | None,
    master_fingerprint: str | None,
    automatic: bool,
) -> tuple[MigrationState, MigrationState]:
    state = load_state(store)
    if state is None:
        raise MigrationStateError("no migration state stored; nothing to roll back")
    if state.mode == KeyManagementMode.ENV and (automatic or state.step == STEP_ENV):
        return state, state
    if state.env_master_removed:
        if master_fingerprint is None:
            raise KeySourceUnavailableError(
                "the env master was removed, so env has no key source; supply "
                "PLINGS_MASTER_KEY again to roll back, and restart the services with it"
            )
        if state.expected_fingerprint and master_fingerprint != state.expected_fingerprint:
            raise MigrationStateError(
                f"the supplied env master has fingerprint {master_fingerprint}; the migrated "
                f"master has {state.expected_fingerprint}"
            )

    changes: dict[str, object] = {
        "mode": KeyManagementMode.ENV.value,
        "percentage": 0,
        "step": STEP_ENV,
        "env_master_removed": False,
    }
    if state.env_master_removed:
        # remove-env-master turned fallback off; a master supplied again may serve as one.
        changes["fallback_enabled"] = True
    before, after = change_state(
        store,
        actor=actor,
        action="rolled_back",
        changes=changes,
        detail=reason,
        new_step=True,
        expected_version=state.version,
    )
    log.warning(
        "migration_rolled_back",
        actor=actor,
        from_step=before.step,
        state_version=after.version,
        reason=reason,
        automatic=automatic,
    )
    if notifier is not None:
        notifier.send(
            MigrationNotice(
                "rollback" if not automatic else "automatic rollback",
                actor,
                describe(before),
                describe(after),
                reason,
            )
        )
    return before, after


@dataclass(frozen=True, slots=True)
class RunResult:
    """Outcome of ``migrate run``: passed steps, the failing reading if any, and a message."""

    passed_steps: tuple[int, ...]
    failed: GateReading | None
    message: str

    @property
    def ok(self) -> bool:
        """Whether every step up to 100 % passed its gate."""
        return self.failed is None and PERCENTAGE_MAX in self.passed_steps


class Runbook:
    """The runbook commands on one state store.

    Args:
        store: the state store every service follows.
        settings: gate limits, soak time and polling interval.
        notifier: webhook receivers of rollbacks and other changes.
        actor: who runs the commands, written into the audit rows.
    """

    def __init__(
        self, store: Store, settings: ManagerSettings, notifier: Notifier, actor: str
    ) -> None:
        self.store = store
        self.settings = settings
        self.notifier = notifier
        self.actor = actor
        self.limits = GateLimits(
            settings.gate_min_requests, settings.gate_max_error_rate, settings.gate_max_p99_ms
        )

    def status(self) -> MigrationState:
        """Return the stored state, storing the environment's starting values first if none."""
        return open_state(self.store, self.settings, self.actor)

    def _change(
        self,
        checked: MigrationState,
        action: str,
        changes: dict[str, object],
        detail: str = "",
        new_step: bool = True,
    ) -> MigrationState:
        """Write ``changes`` only while the stored state is still ``checked``."""
        before, after = change_state(
            self.store,
            actor=self.actor,
            action=action,
            changes=changes,
            detail=detail,
            new_step=new_step,
            expected_version=checked.version,
        )
        log.info("migration_state_changed", action=action, actor=self.actor, step=after.step)
        self.notifier.send(
            MigrationNotice(action, self.actor, describe(before), describe(after), detail)
        )
        return after

    def start(self, expected_fingerprint: str, hsm: KeyBackend | None = None) -> MigrationState:
        """Enter ``dual`` at 0 %: services compare nothing yet, but are ready to.

        Args:
            expected_fingerprint: the env master's fingerprint of the default wallet.
            hsm: the HSM service; its fingerprint of the default wallet must be the same.

        Raises:
            MigrationStateError: unless the state is ``env`` with the env master present.
            FingerprintMismatchError: when the HSM shows another fingerprint.
            HsmServiceError: when the HSM cannot be reached or lacks the wallet.
        """
        if hsm is not None:
            self._check_hsm_fingerprint(hsm, expected_fingerprint)
        state = self.status()
        if state.mode != KeyManagementMode.ENV or state.env_master_removed:
            raise MigrationStateError(
                f"migrate start needs mode env; the state is {describe(state)}. "
                "Run 'plings-hsm rollback' first to start over"
            )
        return self._change(
            state,
            "migration_started",
            {
                "mode": KeyManagementMode.DUAL.value,
                "percentage": 0,
                "step": _dual_step(0),
                "expected_fingerprint": expected_fingerprint,
            },
            detail=f"expected wallet fingerprint {expected_fingerprint}",
        )

    def _check_hsm_fingerprint(self, hsm: KeyBackend, expected: str) -> None:
        wallet = self.settings.default_wallet
        actual = hsm.wallet_fingerprint(wallet)
        if not hmac.compare_digest(actual.encode(), expected.encode()):
            log.error(
                "hsm_fingerprint_mismatch",
                wallet=wallet,
                expected_fingerprint=expected,
                hsm_fingerprint=actual,
                actor=self.actor,
            )
            raise FingerprintMismatchError(
                f"the HSM service's fingerprint of wallet {wallet} is {actual}; the env "
                f"master's is {expected}. Import the env master into the token first"
            )

    def advance(self, to: int | None = None) -> MigrationState:
        """Raise the rollout percentage to ``to``, or to the next step of ROLLOUT_STEPS.

        Raises:
            MigrationStateError: outside ``dual``, or when ``to`` is not above the current
                percentage or above 100.
        """
        state = self.status()
        if state.mode != KeyManagementMode.DUAL:
            raise MigrationStateError(
                f"migrate advance needs mode dual; the state is {describe(state)}"
            )
        if to is None:
            following = [step for step in ROLLOUT_STEPS if step > state.percentage]
            if not following:
                raise MigrationStateError(
                    "the rollout is at 100 %; run 'plings-hsm migrate finalize' once it soaked"
                )
            to = following[0]
        if not state.percentage < to <= PERCENTAGE_MAX:
            raise MigrationStateError(
                f"percentage {to} is out of range; allowed {state.percentage + 1} to "
                f"{PERCENTAGE_MAX}, above the current {state.percentage}"
            )
        return self._change(state, "rollout_advanced", {"percentage": to, "step": _dual_step(to)})

    def set_whitelist(self, user_ids: tuple[str, ...]) -> MigrationState:
        """Replace the rollout whitelist; the step and its records stay.

        Raises:
            InvalidRequestError: for an empty user id, one with a comma (the stored list
                is comma-separated) or one with spaces around it (HSM_ROLLOUT_WHITELIST
                trims them, so the two would name different users).
        """
        for index, user_id in enumerate(user_ids):
            field = f"userIds.{index}"
            shown = _shown(user_id)
            if not user_id:
                raise InvalidRequestError(f"{field} is empty; a user id needs 1 character", field)
            if "," in user_id:
                raise InvalidRequestError(
                    f"{field} {shown} contains a comma; user ids cannot contain commas", field
                )
            if user_id != user_id.strip():
                raise InvalidRequestError(
                    f"{field} {shown} has spaces around it; send it trimmed", field
                )
        return self._change(
            self.status(),
            "whitelist_changed",
            {"whitelist": tuple(sorted(set(user_ids)))},
            new_step=False,
        )

    def rollback(self, reason: str, master_fingerprint: str | None = None) -> MigrationState:
        """Return every service to ``env`` from any step (see :func:`roll_back`).

        Raises:
            InvalidRequestError: when ``reason`` contains a control character, such as a
                newline, that would forge lines in logs and notices.
        """
        check_reason(reason)
        _before, after = roll_back(
            self.store,
            actor=self.actor,
            reason=reason,
            notifier=self.notifier,
            master_fingerprint=master_fingerprint,
        )
        return after

    def _soak(
        self,
        state: MigrationState,
        soak_s: float,
        poll_s: float,
        progress: Callable[[str], None],
        sleep: Callable[[float], None],
    ) -> str | None:
        """Wait out a step's soak; return why it must stop early, or None."""
        deadline = state.step_started_at + soak_s
        while True:
            remaining = deadline - time.time()
            if remaining <= 0:
                return None
            sleep(min(poll_s, remaining))
            fresh = load_state(self.store)
            if fresh is None or fresh.version != state.version:
                shown = describe(fresh) if fresh is not None else "missing"
                by = fresh.updated_by if fresh is not None else "unknown"
                return f"the state changed to {shown} by {by} during the soak"
            mismatches = step_stats(self.store, state.step_number).mismatches
            if mismatches:
                return f"{mismatches} mismatch(es) recorded during step {state.step}"
            progress(f"step {state.step}: {max(0.0, remaining - poll_s):.0f} s of soak left")

    def run(
        self,
        soak_s: float | None = None,
        poll_s: float | None = None,
        progress: Callable[[str], None] = lambda _message: None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> RunResult:
        """Hold 5, 25, 50 and 100 % in turn; pass each step only through its gate.

        A failed gate or a mismatch rolls every service back to ``env`` by itself. A
        step already reached (after ``advance``) is soaked from when it started.

        Raises:
            MigrationStateError: outside ``dual``.
        """
        soak = self.settings.soak_s if soak_s is None else soak_s
        poll = self.settings.state_poll_s if poll_s is None else poll_s
        state = self.status()
        if state.mode != KeyManagementMode.DUAL:
            raise MigrationStateError(
                f"migrate run needs mode dual; the state is {describe(state)}. "
                "Run 'plings-hsm migrate start' first"
            )

        passed: list[int] = []
        targets = [step for step in ROLLOUT_STEPS if step >= state.percentage]
        for target in targets:
            if state.percentage != target:
                state = self.advance(target)
            progress(f"step {state.step}: soaking for {soak:.0f} s")
            stop_reason = self._soak(state, soak, poll, progress, sleep)
            if stop_reason is not None:
                if "mismatch" in stop_reason:
                    self._auto_rollback(stop_reason)
                    return RunResult(tuple(passed), None, f"rolled back: {stop_reason}")
                return RunResult(tuple(passed), None, f"stopped: {stop_reason}")

            reading = read_gate(self.store, state, self.limits)
            if not reading.passed:
                self._auto_rollback(f"gate of step {state.step} failed: {reading.reason}")
                return RunResult(
                    tuple(passed),
                    reading,
                    f"rolled back: gate of {state.step} failed: {reading.reason}",
                )
            self._audit_gate(reading)
            passed.append(target)
            progress(
                f"step {state.step}: gate passed ({reading.stats.compared} compared, "
                f"error rate {reading.error_rate:.4f}, p99 {reading.p99_ms:.1f} ms)"
            )
        return RunResult(
            tuple(passed), None, "100 % soaked and passed; run 'plings-hsm migrate finalize'"
        )

    def _audit_gate(self, reading: GateReading) -> None:
        record_audit(
            self.store,
            actor=self.actor,
            action="gate_passed",
            subject=reading.step,
            new_value=f"compared={reading.stats.compared} p99_ms={reading.p99_ms:.1f}",
            detail=reading.reason,
        )

    def _auto_rollback(self, reason: str) -> None:
        roll_back(
            self.store, actor=self.actor, reason=reason, notifier=self.notifier, automatic=True
        )

    def _migration_started_at(self) -> float:
        with self.store.session() as session:
            started = list_audit(session, action="migration_started", limit=1)
        return started[0].at if started else 0.0

    def finalize(self, soak_s: float | None = None) -> MigrationState:
        """Switch to ``hsm`` once 5, 25, 50 and 100 % each passed their gate.

        Only gates read since the latest ``migrate start`` count. A gate of 100 % not yet
        read is read now once the soak time has passed; if it fails, the migration rolls
        back to ``env``.

        Raises:
            MigrationStateError: unless the state is ``dual`` at 100 %, soaked for the soak
                time, with a passed gate at every step.
            GateFailedError: when the gate of 100 % read now failed; the state is ``env``.
        """
        soak = self.settings.soak_s if soak_s is None else soak_s
        state = self.status()
        if state.mode != KeyManagementMode.DUAL or state.percentage != PERCENTAGE_MAX:
            raise MigrationStateError(
                f"migrate finalize needs dual at 100 %; the state is {describe(state)}"
            )
        passed = passed_gate_steps(self.store, self._migration_started_at())
        missing = [
            _dual_step(step)
            for step in ROLLOUT_STEPS
            if step != PERCENTAGE_MAX and _dual_step(step) not in passed
        ]
        if missing:
            raise MigrationStateError(
                f"migrate finalize needs a passed gate at every step; missing: "
                f"{', '.join(missing)}. Roll back and run 'plings-hsm migrate run'"
            )
        current_passed = any(
            reading.passed and reading.step_number == state.step_number
            for reading in latest_gate_readings(self.store, limit=50)
        )
        if not current_passed:
            soaked_s = time.time() - state.step_started_at
            if soaked_s < soak:
                raise MigrationStateError(
                    f"100 % has soaked for {soaked_s:.0f} s; the soak time is {soak:.0f} s"
                )
            reading = read_gate(self.store, state, self.limits)
            if not reading.passed:
                reason = f"gate of {state.step} failed: {reading.reason}"
                self._auto_rollback(reason)
                raise GateFailedError(f"rolled back to env: {reason}")
            self._audit_gate(reading)
        return self._change(
            state,
            "migration_finalized",
            {"mode": KeyManagementMode.HSM.value, "step": STEP_HSM},
        )

    def check_removable(self) -> MigrationState:
        """Return the state if ``remove-env-master`` is allowed now.

        Raises:
            MigrationStateError: unless the state is ``hsm`` after finalize.
        """
        state = self.status()
        if state.mode != KeyManagementMode.HSM or state.step != STEP_HSM:
            raise MigrationStateError(
                f"migrate remove-env-master needs a finalized migration; the state is "
                f"{describe(state)}"
            )
        return state

    def remove_env_master(self, confirmation: str) -> MigrationState:
        """Record that the env master is gone, so services drop it and never fall back.

        Raises:
            MigrationStateError: unless the state is ``hsm`` after finalize and
                ``confirmation`` is exactly REMOVE_CONFIRMATION.
        """
        state = self.check_removable()
        if confirmation != REMOVE_CONFIRMATION:
            raise MigrationStateError(
                f"confirmation does not match; type exactly {REMOVE_CONFIRMATION!r}"
            )
        return self._change(
            state,
            "env_master_removed",
            {"env_master_removed": True, "fallback_enabled": False, "step": STEP_ENV_REMOVED},
            detail="services drop the env master; rollback needs PLINGS_MASTER_KEY again",
        )
