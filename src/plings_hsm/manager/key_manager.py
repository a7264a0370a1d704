"""The key manager: serves derive requests from env, HSM or both, following the stored state."""

from __future__ import annotations

import hmac
import threading
import time
from dataclasses import dataclass, replace

import base58
import structlog

from plings_hsm.backends.base import KeyBackend
from plings_hsm.core.batch import DerivedKey
from plings_hsm.core.path import BatchPrefix
from plings_hsm.errors import (
    ConfigError,
    FingerprintMismatchError,
    HsmRateLimitedError,
    HsmServiceError,
    InvalidPathError,
    InvalidRequestError,
    KeySourceUnavailableError,
    PlingsHsmError,
    StoreError,
    WalletNotFoundError,
)
from plings_hsm.manager.config import KeyManagementMode, parse_mode
from plings_hsm.manager.metrics import ManagerMetrics
from plings_hsm.manager.migration import roll_back
from plings_hsm.manager.notify import MigrationNotice, Notifier
from plings_hsm.manager.rollout import Rollout
from plings_hsm.store.audit import record_audit
from plings_hsm.store.db import Store
from plings_hsm.store.migration import (
    MigrationState,
    MismatchRecord,
    RequestOutcome,
    RequestRecord,
    load_state,
    load_state_version,
    record_mismatch,
    record_requests,
)

__all__ = ["FINGERPRINT_TTL_S", "FingerprintVerdict", "KeyManager", "ServedKeys"]

log = structlog.get_logger(__name__)

RECORD_BUFFER_MAX = 50_000
"""Request records kept while the store cannot be written; older ones are dropped."""

MISMATCH_ROWS_MAX = 20
"""Mismatching keys of one request written to the store; the count covers the rest."""

CIRCUIT_FAILURES = 5
"""Consecutive failed HSM calls after which HSM calls pause for CIRCUIT_OPEN_S."""

CIRCUIT_OPEN_S = 2.0
"""Pause of HSM calls after CIRCUIT_FAILURES failures; then one call tries again."""

FINGERPRINT_TTL_S = 10.0
"""How long a verified HSM wallet fingerprint is trusted before the HSM's /health is read again."""
# Replicas behind one TLS-terminating balancer look alike to /health; each derive
# response therefore names its wallet fingerprint, checked in _require_verified.

_CLIENT_ERRORS = (InvalidRequestError, InvalidPathError, WalletNotFoundError)


class _CircuitOpenError(HsmServiceError):
    """HSM calls are paused after consecutive failures; no call was made."""


@dataclass(frozen=True, slots=True)
class ServedKeys:
    """The keys returned to a client and the source that served them (``env`` or ``hsm``)."""

    keys: list[DerivedKey]
    source: str


@dataclass(frozen=True, slots=True)
class FingerprintVerdict:
    """The HSM's wallet fingerprint compared with the expected one, and when it was read.

    ``peer`` is the server that sent the /health response (``address:port/certificate
    digest``), ``checked_at`` a ``time.monotonic()`` value.
    """

    wallet: int
    expected: str
    actual: str
    peer: str | None
    checked_at: float

    @property
    def matches(self) -> bool:
        """Whether both fingerprints are equal, compared in constant time."""
        return hmac.compare_digest(self.expected.encode(), self.actual.encode())


def _b58(raw: bytes) -> str:
    return str(base58.b58encode(raw).decode("ascii"))


def _mismatches(
    env_keys: list[DerivedKey], hsm_keys: list[DerivedKey]
) -> list[tuple[str, str, str]]:
    """Return (path, env key, HSM key) for every key that differs, in constant time per key."""
    found = []
    for index in range(max(len(env_keys), len(hsm_keys))):
        env_key = env_keys[index] if index < len(env_keys) else None
        hsm_key = hsm_keys[index] if index < len(hsm_keys) else None
        same_path = env_key is not None and hsm_key is not None and env_key.path == hsm_key.path
        if same_path and hmac.compare_digest(env_key.public_key, hsm_key.public_key):  # type: ignore[union-attr]
            continue
        path = (env_key or hsm_key).path.hd_path  # type: ignore[union-attr]
        found.append(
            (
                path,
                _b58(env_key.public_key) if env_key else "",
                _b58(hsm_key.public_key) if hsm_key else "",
            )
        )
    return found


class KeyManager:
    """Serves derive requests in the mode the state store sets, seen within one poll interval.

    Both backends are built at start whatever the starting mode, because the mode changes
    while the service runs: ``env`` needs the env master, ``hsm`` the HSM, ``dual`` both.

    Args:
        store: the state store; its state row decides mode, rollout and fallback.
        env_backend: the env master's backend, or None when PLINGS_MASTER_KEY is unset.
        hsm_backend: the HSM's backend (usually remote), or None when HSM_ENDPOINT is unset.
        poll_s: interval of state reads and record flushes.
        fallback_enabled: HSM_FALLBACK_ENABLED; the stored state may turn fallback off too.
        metrics: where to count requests; None counts nothing.
        notifier: receivers of automatic rollback notices.
        instance: name of this service instance in audit rows.
        default_wallet: the wallet whose fingerprint ``migrate start`` recorded in the state.
    """

    def __init__(
        self,
        store: Store,
        *,
        env_backend: KeyBackend | None,
        hsm_backend: KeyBackend | None,
        poll_s: float = 2.0,
        fallback_enabled: bool = True,
        metrics: ManagerMetrics | None = None,
        notifier: Notifier | None = None,
        instance: str = "identifier",
        default_wallet: int = 1,
    ) -> None:
        if env_backend is None and hsm_backend is None:
            raise ConfigError("the key manager needs PLINGS_MASTER_KEY, HSM_ENDPOINT or both")
        self.store = store
        self._env = env_backend
        self._hsm = hsm_backend
        self._poll_s = poll_s
        self._fallback_enabled = fallback_enabled
        self._metrics = metrics
        self._notifier = notifier
        self.instance = instance
        self._lock = threading.Lock()
        self._records: list[RequestRecord] = []
        self._dropped_records = 0
        self._fallback_episode = False
        self._hsm_failures = 0
        self._circuit_open_until = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._default_wallet = default_wallet
        self._verdicts: dict[int, FingerprintVerdict] = {}
        self._reported_mismatches: set[tuple[int, str]] = set()
        self._hsm_for_env_version = 0

        state = load_state(store)
        if state is None:
            raise ConfigError("the state store has no migration state; open it with open_state")
        self._state = state
        self._apply(state)

    # State -----------------------------------------------------------------------------

    @property
    def state(self) -> MigrationState:
        """The migration state in force in this process."""
        return self._state

    @property
    def env_available(self) -> bool:
        """Whether this process has the env master loaded."""
        return self._env is not None

    @property
    def hsm_backend(self) -> KeyBackend | None:
        """The HSM backend, for health checks."""
        return self._hsm

    def _mode(self, state: MigrationState) -> KeyManagementMode:
        try:
            return parse_mode(state.mode, "stored mode")
        except ConfigError:
            log.error("migration_mode_invalid", mode=state.mode, served_as="env")
            return KeyManagementMode.ENV

    def _apply(self, state: MigrationState) -> None:
        if state.env_master_removed and self._env is not None:
            self._env.close()
            self._env = None
            log.warning("env_master_dropped", instance=self.instance, state_version=state.version)
        if self._metrics is not None:
            self._metrics.show_state(state.mode, state.percentage, state.version)

    def refresh(self) -> bool:
        """Read the state if its version changed; return whether it did."""
        version = load_state_version(self.store)
        if version is None or version == self._state.version:
            return False
        fresh = load_state(self.store)
        if fresh is None:
            return False
        previous = self._state
        self._state = fresh
        self._apply(fresh)
        log.info(
            "migration_state_followed",
            instance=self.instance,
            from_step=previous.step,
            to_step=fresh.step,
            state_version=fresh.version,
        )
        return True

    def start(self) -> None:
        """Verify the HSM's fingerprint, then follow the state and flush records in a thread."""
        self._check_fingerprint_on_poll(force=True)
        self._stop.clear()
        self._thread = threading.Thread(target=self._follow, name="key-manager", daemon=True)
        self._thread.start()
        log.info("key_manager_started", instance=self.instance, mode=self._state.mode)

    def _follow(self) -> None:
        while not self._stop.wait(self._poll_s):
            try:
                self.refresh()
            except StoreError as exc:
                log.warning("state_refresh_failed", instance=self.instance, error=str(exc))
            self._check_fingerprint_on_poll()
            self.flush()

    def stop(self) -> None:
        """Stop following, flush the records and release the backends."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self._poll_s + 10)
            self._thread = None
        self.flush()
        log.info("key_manager_stopped", instance=self.instance)

    def close(self) -> None:
        """Stop, then close both backends."""
        self.stop()
        for backend in (self._env, self._hsm):
            if backend is not None:
                backend.close()

    # Fingerprints ----------------------------------------------------------------------

    def expected_fingerprint(self, wallet: int) -> str | None:
        """Return the fingerprint the HSM must show for ``wallet``, or None when unknown.

        The env master's fingerprint wins while this process has the env master; else
        the fingerprint stored at ``migrate start`` applies to the default wallet.
        """
        env = self._env
        if env is not None:
            try:
                return env.wallet_fingerprint(wallet)
            except PlingsHsmError:
                pass  # no env master for this wallet; the stored fingerprint may apply
        stored = self._state.expected_fingerprint
        if wallet == self._default_wallet and stored:
            return stored
        return None

    def fingerprint_verdict(self, wallet: int) -> FingerprintVerdict | None:
        """Return the latest fingerprint comparison of ``wallet``, or None before the first."""
        with self._lock:
            return self._verdicts.get(wallet)

    def verify_hsm_fingerprint(
        self, wallet: int, *, force: bool = False, peer: str | None = None
    ) -> FingerprintVerdict:
        """Compare the HSM's fingerprint of ``wallet`` with the expected one.

        A verdict is reused for FINGERPRINT_TTL_S unless ``force`` is set, the expected
        fingerprint changed, or ``peer`` names another server than the one read. A new
        mismatch is logged, recorded, audited and posted, and rolls back as a dual mismatch.

        Raises:
            FingerprintMismatchError: when no expected fingerprint is known for ``wallet``.
            HsmServiceError: when the HSM's /health cannot be read or lacks ``wallet``.
        """
        expected = self.expected_fingerprint(wallet)
        if expected is None:
            raise FingerprintMismatchError(
                f"no expected fingerprint for wallet {wallet}: this service holds no env "
                "master for it and the state records none; HSM keys are not served"
            )
        cached = self.fingerprint_verdict(wallet)
        fresh = (
            cached is not None
            and not force
            and cached.expected == expected
            and time.monotonic() - cached.checked_at < FINGERPRINT_TTL_S
            and (peer is None or cached.peer is None or peer == cached.peer)
        )
        if cached is not None and fresh:
            return cached

        hsm = self._hsm
        if hsm is None:
            raise HsmServiceError("HSM_ENDPOINT is not configured in this service")
        actual = next((info.fingerprint for info in hsm.wallets() if info.version == wallet), None)
        if actual is None:
            raise HsmServiceError(f"the HSM service reports no wallet {wallet} on /health")
        verdict = FingerprintVerdict(wallet, expected, actual, hsm.last_peer(), time.monotonic())
        with self._lock:
            self._verdicts[wallet] = verdict
        if verdict.matches:
            return verdict
        self._on_fingerprint_mismatch(verdict)
        return verdict

    def _require_verified(
        self, wallet: int, peer: str | None = None, *, reported: str | None = None
    ) -> None:
        """Raise unless the HSM is verified for ``wallet``.

        ``reported`` is the X-Wallet-Fingerprint header of the last derive response. It
        must equal the expected fingerprint. A replica with another master is then caught
        on its first response instead of at the next /health read.
        """
        verdict = self.verify_hsm_fingerprint(wallet, peer=peer)
        if reported is not None and not hmac.compare_digest(
            reported.encode(), verdict.expected.encode()
        ):
            mismatch = FingerprintVerdict(
                wallet, verdict.expected, reported, peer, time.monotonic()
            )
            with self._lock:
                self._verdicts[wallet] = mismatch
            self._on_fingerprint_mismatch(mismatch)
            raise FingerprintMismatchError(
                f"the HSM service derived wallet {wallet} from fingerprint {reported}; "
                f"expected {verdict.expected}"
            )
        if peer is not None and verdict.peer is not None and peer != verdict.peer:
            # /health came from another server than the derive response, so trust neither.
            raise HsmServiceError(
                f"the HSM derive response and /health came from different servers "
                f"({peer} and {verdict.peer})"
            )
        if not verdict.matches:
            raise FingerprintMismatchError(
                f"the HSM service's fingerprint of wallet {wallet} is {verdict.actual}; "
                f"expected {verdict.expected}"
            )

    def _check_fingerprint_on_poll(self, *, force: bool = False) -> None:
        """Re-read the HSM's fingerprint when the cached one expired, while the HSM may serve."""
        mode = self._mode(self._state)
        if self._hsm is None or (mode is KeyManagementMode.ENV and self._env is not None):
            return
        try:
            self.verify_hsm_fingerprint(self._default_wallet, force=force)
        except HsmServiceError as exc:
            log.warning(
                "fingerprint_check_failed",
                instance=self.instance,
                wallet=self._default_wallet,
                error=str(exc),
            )

    def _on_fingerprint_mismatch(self, verdict: FingerprintVerdict) -> None:
        """Log, record, audit and post a mismatch once; roll back while the env master is held."""
        key = (verdict.wallet, verdict.actual)
        with self._lock:
            if key in self._reported_mismatches:
                return
            self._reported_mismatches.add(key)
        state = self._state
        log.error(
            "hsm_fingerprint_mismatch",
            instance=self.instance,
            wallet=verdict.wallet,
            expected_fingerprint=verdict.expected,
            hsm_fingerprint=verdict.actual,
            peer=verdict.peer,
            step=state.step,
        )
        reason = (
            f"the HSM service's fingerprint of wallet {verdict.wallet} is {verdict.actual}; "
            f"expected {verdict.expected}"
        )
        try:
            record_mismatch(
                self.store,
                MismatchRecord(
                    at=time.time(),
                    step_number=state.step_number,
                    step=state.step,
                    request_id="",
                    hd_path=f"m/44'/501'/{verdict.wallet}'",
                    env_public_key=verdict.expected,
                    hsm_public_key=verdict.actual,
                ),
            )
            record_audit(
                self.store,
                actor=f"key-manager:{self.instance}",
                action="hsm_fingerprint_mismatch",
                subject=f"wallet {verdict.wallet}",
                old_value=verdict.expected,
                new_value=verdict.actual,
                detail=reason,
            )
        except StoreError as exc:
            log.error("mismatch_record_failed", instance=self.instance, error=str(exc))
        if self._env is None or state.env_master_removed:
            # Without the env master a rollback cannot serve; requests get 503 instead.
            if self._notifier is not None:
                self._notifier.send(
                    MigrationNotice(
                        "hsm fingerprint mismatch",
                        f"key-manager:{self.instance}",
                        state.step,
                        state.step,
                        f"{reason}; HSM keys are not served and requests get 503",
                    )
                )
            return
        with self._lock:
            if self._state.version == state.version and state.mode != KeyManagementMode.ENV:
                self._state = replace(
                    state, mode=KeyManagementMode.ENV.value, percentage=0, step="env"
                )
        threading.Thread(
            target=self._roll_back_everywhere, args=(reason,), name="mismatch-rollback", daemon=True
        ).start()

    # Records ---------------------------------------------------------------------------

    def _record(
        self, outcome: str, keys: int, latency_ms: float | None, error: str, request_id: str
    ) -> None:
        state = self._state
        record = RequestRecord(
            at=time.time(),
            step_number=state.step_number,
            step=state.step,
            outcome=outcome,
            keys=keys,
            hsm_latency_ms=latency_ms,
            error=error,
            request_id=request_id,
        )
        with self._lock:
            self._records.append(record)
            if len(self._records) > RECORD_BUFFER_MAX:
                del self._records[0]
                self._dropped_records += 1

    def flush(self) -> int:
        """Write buffered request records to the store; on failure keep them for the next try."""
        with self._lock:
            batch, self._records = self._records, []
        if not batch:
            return 0
        try:
            return record_requests(self.store, batch)
        except StoreError as exc:
            log.warning(
                "records_flush_failed", instance=self.instance, records=len(batch), error=str(exc)
            )
            with self._lock:
                self._records = (batch + self._records)[-RECORD_BUFFER_MAX:]
            return 0

    # Serving ---------------------------------------------------------------------------

    def derive(
        self,
        prefix: BatchPrefix,
        start: int,
        quantity: int,
        *,
        user_id: str | None = None,
        request_id: str = "",
    ) -> ServedKeys:
        """Derive a batch from the source the current mode and rollout pick.

        Raises:
            KeySourceUnavailableError: when the mode's source is not configured here.
            HsmServiceError: in ``hsm`` mode when the HSM fails and no fallback is allowed.
            InvalidRequestError, InvalidPathError, WalletNotFoundError: for the request itself.
        """
        state = self._state
        mode = self._mode(state)
        if mode is KeyManagementMode.ENV and self._env is None and self._hsm is not None:
            served = self._hsm_without_env(state, prefix, start, quantity, request_id)
        elif mode is KeyManagementMode.ENV:
            served = ServedKeys(self._env_keys(prefix, start, quantity, mode), "env")
            self._record(RequestOutcome.ENV, quantity, None, "", request_id)
        elif mode is KeyManagementMode.DUAL:
            served = self._dual(state, prefix, start, quantity, user_id, request_id)
        else:
            served = self._hsm_only(state, prefix, start, quantity, request_id)
        if self._metrics is not None:
            self._metrics.served.labels(source=served.source).inc()
        return served

    def serving_source(self) -> str | None:
        """Return the source requests are served from now (``env``, ``hsm``), or None.

        ``hsm`` in ``env`` mode means this process has no env master (it dropped it at
        ``remove-env-master``) and serves from the fingerprint-verified HSM until it is
        restarted with PLINGS_MASTER_KEY.
        """
        mode = self._mode(self._state)
        if mode is not KeyManagementMode.HSM and self._env is not None:
            return "env"
        if self._hsm is not None:
            verdict = self.fingerprint_verdict(self._default_wallet)
            if verdict is not None and verdict.matches:
                return "hsm"
        if mode is KeyManagementMode.HSM and self._fallback_allowed(self._state):
            return "env"
        return None

    def _hsm_without_env(
        self, state: MigrationState, prefix: BatchPrefix, start: int, quantity: int, request_id: str
    ) -> ServedKeys:
        """Serve ``env`` mode from the verified HSM while this process has no env master."""
        if self.expected_fingerprint(prefix.wallet) is None:
            # Nothing to verify the HSM against, so env mode has no key source here.
            return ServedKeys(self._env_keys(prefix, start, quantity, KeyManagementMode.ENV), "env")
        self._require_verified(prefix.wallet)
        keys, latency_ms = self._timed_hsm(prefix, start, quantity)
        self._require_verified(prefix.wallet, peer=self._hsm_peer(), reported=self._hsm_reported())
        with self._lock:
            first = self._hsm_for_env_version != state.version
            self._hsm_for_env_version = state.version
        if first:
            log.warning(
                "env_mode_served_by_hsm",
                instance=self.instance,
                request_id=request_id,
                state_version=state.version,
                reason="no env master in this process; restart it with PLINGS_MASTER_KEY",
            )
        self._record(RequestOutcome.HSM, quantity, latency_ms, "", request_id)
        return ServedKeys(keys, "hsm")

    def _env_keys(
        self, prefix: BatchPrefix, start: int, quantity: int, mode: KeyManagementMode
    ) -> list[DerivedKey]:
        env = self._env
        if env is None:
            raise KeySourceUnavailableError(
                f"mode {mode} needs the env master, which this service does not hold; "
                "restart it with PLINGS_MASTER_KEY"
            )
        return env.derive_keys(prefix, start, quantity)

    def _timed_hsm(
        self, prefix: BatchPrefix, start: int, quantity: int
    ) -> tuple[list[DerivedKey], float]:
        """Call the HSM, pausing calls for a while after CIRCUIT_FAILURES failures in a row.

        The pause keeps a stopped HSM service from adding connection attempts and retries
        to every request, and from writing one log line per request.
        """
        hsm = self._hsm
        if hsm is None:
            raise HsmServiceError("HSM_ENDPOINT is not configured in this service")
        if time.monotonic() < self._circuit_open_until:
            raise _CircuitOpenError(
                f"HSM calls paused for {CIRCUIT_OPEN_S:g} s after {CIRCUIT_FAILURES} failures"
            )
        started = time.perf_counter()
        try:
            keys = hsm.derive_keys(prefix, start, quantity)
        except (*_CLIENT_ERRORS, HsmRateLimitedError):
            # A 429 means the service works but this key's budget is spent: not a failure.
            raise
        except Exception:
            self._count_hsm_failure()
            raise
        finally:
            if self._metrics is not None:
                self._metrics.hsm_latency.observe(time.perf_counter() - started)
        self._count_hsm_success()
        return keys, (time.perf_counter() - started) * 1000

    def _hsm_peer(self) -> str | None:
        hsm = self._hsm
        return hsm.last_peer() if hsm is not None else None

    def _hsm_reported(self) -> str | None:
        hsm = self._hsm
        return hsm.last_fingerprint() if hsm is not None else None

    def _count_hsm_failure(self) -> None:
        with self._lock:
            self._hsm_failures += 1
            if self._hsm_failures < CIRCUIT_FAILURES:
                return
            self._circuit_open_until = time.monotonic() + CIRCUIT_OPEN_S
            failures = self._hsm_failures
        log.warning(
            "hsm_calls_paused", instance=self.instance, failures=failures, pause_s=CIRCUIT_OPEN_S
        )

    def _count_hsm_success(self) -> None:
        with self._lock:
            failures, self._hsm_failures = self._hsm_failures, 0
        if failures >= CIRCUIT_FAILURES:
            log.info("hsm_calls_resumed", instance=self.instance, failures=failures)

    def _dual(
        self,
        state: MigrationState,
        prefix: BatchPrefix,
        start: int,
        quantity: int,
        user_id: str | None,
        request_id: str,
    ) -> ServedKeys:
        env_keys = self._env_keys(prefix, start, quantity, KeyManagementMode.DUAL)
        if not Rollout.of(state.percentage, state.whitelist).includes(user_id):
            self._record(RequestOutcome.ENV, quantity, None, "", request_id)
            return ServedKeys(env_keys, "env")

        started = time.perf_counter()
        try:
            hsm_keys, latency_ms = self._timed_hsm(prefix, start, quantity)
        except HsmRateLimitedError as exc:
            log.warning("hsm_compare_rate_limited", request_id=request_id, step=state.step)
            self._record(
                RequestOutcome.HSM_RATE_LIMITED, quantity, None, type(exc).__name__, request_id
            )
            self._count_comparison(RequestOutcome.HSM_RATE_LIMITED)
            return ServedKeys(env_keys, "env")
        except Exception as exc:  # any HSM failure must leave the env result served
            latency_ms = (time.perf_counter() - started) * 1000
            if not isinstance(exc, _CircuitOpenError):
                log.warning(
                    "hsm_compare_failed",
                    request_id=request_id,
                    error=type(exc).__name__,
                    step=state.step,
                )
            self._record(
                RequestOutcome.HSM_ERROR, quantity, latency_ms, type(exc).__name__, request_id
            )
            self._count_comparison(RequestOutcome.HSM_ERROR)
            return ServedKeys(env_keys, "env")

        mismatches = _mismatches(env_keys, hsm_keys)
        if mismatches:
            self._on_mismatch(state, mismatches, request_id)
            self._record(RequestOutcome.MISMATCH, quantity, latency_ms, "", request_id)
            self._count_comparison(RequestOutcome.MISMATCH)
            return ServedKeys(env_keys, "env")

        self._record(RequestOutcome.MATCH, quantity, latency_ms, "", request_id)
        self._count_comparison(RequestOutcome.MATCH)
        return ServedKeys(hsm_keys, "hsm")

    def _count_comparison(self, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.comparisons.labels(outcome=outcome).inc()

    def _on_mismatch(
        self, state: MigrationState, mismatches: list[tuple[str, str, str]], request_id: str
    ) -> None:
        """Record the mismatch, switch this process to env at once, and roll every service back."""
        with self._lock:
            if self._state.version == state.version:
                self._state = replace(
                    state, mode=KeyManagementMode.ENV.value, percentage=0, step="env"
                )
        first_path = mismatches[0][0]
        log.error(
            "key_mismatch_detected",
            request_id=request_id,
            path=first_path,
            env_public_key=mismatches[0][1],
            hsm_public_key=mismatches[0][2],
            mismatched_keys=len(mismatches),
            step=state.step,
        )
        if self._metrics is not None:
            self._metrics.mismatched_keys.inc(len(mismatches))
        try:
            for path, env_key, hsm_key in mismatches[:MISMATCH_ROWS_MAX]:
                record_mismatch(
                    self.store,
                    MismatchRecord(
                        at=time.time(),
                        step_number=state.step_number,
                        step=state.step,
                        request_id=request_id,
                        hd_path=path,
                        env_public_key=env_key,
                        hsm_public_key=hsm_key,
                    ),
                )
        except StoreError as exc:
            log.error("mismatch_record_failed", request_id=request_id, error=str(exc))
        reason = (
            f"{len(mismatches)} key(s) differ between env and HSM; first at {first_path}: "
            f"env {mismatches[0][1]}, HSM {mismatches[0][2]}"
        )
        threading.Thread(
            target=self._roll_back_everywhere, args=(reason,), name="mismatch-rollback", daemon=True
        ).start()

    def _roll_back_everywhere(self, reason: str) -> None:
        try:
            roll_back(
                self.store,
                actor=f"key-manager:{self.instance}",
                reason=reason,
                notifier=self._notifier,
                automatic=True,
            )
        except PlingsHsmError as exc:
            log.error("automatic_rollback_failed", instance=self.instance, error=str(exc))

    def _fallback_allowed(self, state: MigrationState) -> bool:
        return (
            self._env is not None
            and self._fallback_enabled
            and state.fallback_enabled
            and not state.env_master_removed
        )

    def _hsm_only(
        self, state: MigrationState, prefix: BatchPrefix, start: int, quantity: int, request_id: str
    ) -> ServedKeys:
        try:
            self._require_verified(prefix.wallet)
            keys, latency_ms = self._timed_hsm(prefix, start, quantity)
            # A response from another server than the verified one is re-verified first.
            self._require_verified(
                prefix.wallet, peer=self._hsm_peer(), reported=self._hsm_reported()
            )
        except _CLIENT_ERRORS:
            raise
        except FingerprintMismatchError as exc:
            if self._env is None or state.env_master_removed:
                log.error("hsm_keys_withheld", request_id=request_id, wallet=prefix.wallet)
                raise
            keys = self._env_keys(prefix, start, quantity, KeyManagementMode.HSM)
            self._on_fallback(state, exc, request_id, quantity)
            return ServedKeys(keys, "env")
        except Exception as exc:  # every HSM failure is a fallback candidate
            if not self._fallback_allowed(state):
                log.warning("hsm_request_failed", request_id=request_id, error=type(exc).__name__)
                if isinstance(exc, PlingsHsmError):
                    raise
                raise HsmServiceError(f"HSM derive failed: {type(exc).__name__}") from exc
            keys = self._env_keys(prefix, start, quantity, KeyManagementMode.HSM)
            self._on_fallback(state, exc, request_id, quantity)
            return ServedKeys(keys, "env")

        self._fallback_episode = False
        self._record(RequestOutcome.HSM, quantity, latency_ms, "", request_id)
        return ServedKeys(keys, "hsm")

    def _on_fallback(
        self, state: MigrationState, exc: Exception, request_id: str, quantity: int
    ) -> None:
        """Count, log and record a fallback; audit the first one of each outage."""
        self._record(RequestOutcome.FALLBACK, quantity, None, type(exc).__name__, request_id)
        if self._metrics is not None:
            self._metrics.fallbacks.inc()
        log.warning(
            "hsm_fallback_used", request_id=request_id, error=type(exc).__name__, step=state.step
        )
        if self._fallback_episode:
            return
        self._fallback_episode = True
        try:
            record_audit(
                self.store,
                actor=f"key-manager:{self.instance}",
                action="hsm_fallback_started",
                subject="source",
                old_value="hsm",
                new_value="env",
                detail=f"HSM failed: {type(exc).__name__}; later fallbacks are in the records",
            )
        except StoreError as audit_exc:
            log.warning("fallback_audit_failed", request_id=request_id, error=str(audit_exc))
