"""Preflight and post-migration checks, each a named pass or fail with a reason."""

from __future__ import annotations

import os
import re
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
import structlog

from plings_hsm.backends.base import KeyBackend
from plings_hsm.backends.env import EnvBackend
from plings_hsm.backends.remote import RemoteBackend
from plings_hsm.core.path import BatchPrefix
from plings_hsm.errors import PlingsHsmError
from plings_hsm.manager.backup import find_recent_backup, make_token_backup
from plings_hsm.manager.config import ManagerSettings
from plings_hsm.manager.migration import ROLLOUT_STEPS
from plings_hsm.secrets import Secret
from plings_hsm.store.audit import find_audit_row, list_audit, record_audit, verify_audit_chain
from plings_hsm.store.db import Store
from plings_hsm.store.migration import load_state

__all__ = [
    "VALIDATE_BATCH",
    "VALIDATE_KEYS",
    "VALIDATE_LIMIT_MS",
    "Check",
    "env_file_mentions_master",
    "run_preflight",
    "run_validate",
]

log = structlog.get_logger(__name__)

BACKUP_MAX_AGE_S = 24 * 3600.0
"""A token backup younger than this counts as present; older ones lead to a new backup."""

VALIDATE_KEYS = 100
"""Keys derived through the identifier API by ``validate``."""

VALIDATE_LIMIT_MS = 5000.0
"""Time 100 keys may take through the identifier API and the HSM service, in milliseconds."""

VALIDATE_BATCH = BatchPrefix(wallet=1, manufacturer=1, category=1, class_id=1, batch=99999)
"""The batch ``validate`` derives, the same as the demo's."""

_MASTER_LINE = re.compile(r"^\s*(export\s+)?PLINGS_MASTER_KEY\s*=\s*['\"]?\S")


@dataclass(frozen=True, slots=True)
class Check:
    """One check's name, verdict and a reason or figure; never a secret."""

    name: str
    ok: bool
    detail: str


def _run(name: str, check: Callable[[], str]) -> Check:
    """Run ``check``; its return value is the detail of a pass, a product error a failure."""
    try:
        return Check(name, True, check())
    except (PlingsHsmError, OSError, httpx.HTTPError, ValueError, KeyError) as exc:
        log.warning("check_failed", check=name, error=type(exc).__name__)
        return Check(name, False, _failure_detail(exc))


def _failure_detail(exc: Exception) -> str:
    """Word a failed check in plain terms, without Python class names or errno codes."""
    if isinstance(exc, OSError):
        reason = exc.strerror or "failed"
        target = f" {exc.filename}" if exc.filename else ""
        return f"{reason.lower()}:{target}" if target else reason.lower()
    if isinstance(exc, httpx.HTTPError):
        try:
            url = str(exc.request.url)
        except RuntimeError:
            url = "the service"
        if isinstance(exc, httpx.TimeoutException):
            return f"request to {url} timed out"
        if isinstance(exc, httpx.ConnectError):
            return f"connection to {url} failed"
        return f"request to {url} failed"
    if isinstance(exc, KeyError):
        return f"field {exc.args[0]!r} missing from the response" if exc.args else "field missing"
    if isinstance(exc, ValueError) and not isinstance(exc, _CheckFailedError):
        return f"invalid value: {exc}"
    return str(exc)


class _CheckFailedError(ValueError):
    """A check ran and found the condition false."""


def run_preflight(
    *,
    settings: ManagerSettings,
    store: Store,
    master_key: Secret | None,
    token_backend: Callable[[], KeyBackend],
    token_label: str,
    token_dir: Callable[[], Path],
    backups_dir: Path,
    actor: str,
) -> list[Check]:
    """Check everything the migration needs before ``migrate start``.

    The env master must decode, and the token must log in and contain the wallet. The
    env, token and HSM service fingerprints must match, and the HSM service must be
    healthy over TLS. A token backup must exist; one is made now when none is younger
    than a day. Last, the store must take a write. Each check runs even when an earlier
    one failed.
    """
    wallet = settings.default_wallet
    fingerprints: dict[str, str] = {}
    checks: list[Check] = []

    def env_master() -> str:
        if master_key is None:
            raise _CheckFailedError("PLINGS_MASTER_KEY is not set")
        backend = EnvBackend(master_key, wallets=(wallet,))
        try:
            fingerprints["env"] = backend.wallet_fingerprint(wallet)
        finally:
            backend.close()
        return f"decodes; wallet {wallet} fingerprint {fingerprints['env']}"

    def token() -> str:
        backend = token_backend()
        try:
            fingerprints["token"] = backend.wallet_fingerprint(wallet)
        finally:
            backend.close()
        return (
            f"token {token_label!r} contains wallet {wallet}, fingerprint {fingerprints['token']}"
        )

    def hsm_service() -> str:
        if settings.hsm_endpoint is None or settings.hsm_api_key is None:
            raise _CheckFailedError("HSM_ENDPOINT and HSM_API_KEY must both be set")
        remote = RemoteBackend(
            settings.hsm_endpoint, settings.hsm_api_key, settings.hsm_ca_file, retries=0
        )
        try:
            health = remote.health()
            if not health.ok:
                raise _CheckFailedError(health.detail)
            fingerprints["hsm"] = remote.wallet_fingerprint(wallet)
            remote.derive_keys(VALIDATE_BATCH, 1, 1)
        finally:
            remote.close()
        return f"{settings.hsm_endpoint} healthy over TLS; derive answered"

    def match() -> str:
        found = {source: fingerprints.get(source) for source in ("env", "token", "hsm")}
        missing = [source for source, value in found.items() if value is None]
        if missing:
            raise _CheckFailedError(f"no fingerprint from {', '.join(missing)}")
        if len(set(found.values())) != 1:
            shown = ", ".join(f"{source} {value}" for source, value in found.items())
            raise _CheckFailedError(f"fingerprints differ: {shown}")
        return f"env, token and HSM service agree: {fingerprints['env']}"

    def backup() -> str:
        recent = find_recent_backup(backups_dir, token_label, BACKUP_MAX_AGE_S)
        if recent is not None:
            return f"found {recent.archive.name} (sha256 {recent.sha256[:16]}...)"
        made = make_token_backup(token_dir(), backups_dir, token_label)
        return f"made {made.archive} (sha256 {made.sha256[:16]}...)"

    checks.append(_run("env master decodes", env_master))
    checks.append(_run("token logs in and contains the wallet", token))
    checks.append(_run("HSM service healthy over TLS", hsm_service))
    checks.append(_run("fingerprints match", match))
    checks.append(_run("token backup present", backup))

    def store_writable() -> str:
        summary = ", ".join(f"{check.name}={'pass' if check.ok else 'FAIL'}" for check in checks)
        record_audit(store, actor=actor, action="preflight_checked", detail=summary)
        return f"audit row written to {store.safe_url}"

    checks.append(_run("state store writable", store_writable))
    return checks


def env_file_mentions_master(path: Path) -> bool:
    """Return whether an env file assigns a non-empty PLINGS_MASTER_KEY."""
    text = path.read_text(encoding="utf-8", errors="replace")
    return any(_MASTER_LINE.match(line) for line in text.splitlines())


def _client(url: str, ca_file: Path | None) -> httpx.Client:
    verify = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    return httpx.Client(base_url=url, verify=verify, timeout=30.0)


def run_validate(
    *,
    settings: ManagerSettings,
    store: Store,
    environ: Mapping[str, str] | None = None,
    audit_head: str | None = None,
) -> list[Check]:
    """Check a finished migration: services, speed, no env master, audit and fingerprints.

    Args:
        audit_head: a row hash printed by ``plings-hsm audit head`` and kept outside the
            store; the chain must still contain that row, so deleted last rows show.
    """
    env = os.environ if environ is None else environ
    ca_file = settings.hsm_ca_file
    figures: dict[str, object] = {}
    checks: list[Check] = []

    def identifier_health() -> str:
        with _client(settings.identifier_url, settings.identifier_ca_file) as client:
            response = client.get("/health")
        body = response.json()
        figures["identifier"] = body
        if response.status_code != 200:
            raise _CheckFailedError(f"identifier API /health returned {response.status_code}")
        return f"{settings.identifier_url} ok, mode {body.get('mode')}"

    def hsm_health() -> str:
        if settings.hsm_endpoint is None or settings.hsm_api_key is None:
            raise _CheckFailedError("HSM_ENDPOINT and HSM_API_KEY must both be set")
        remote = RemoteBackend(settings.hsm_endpoint, settings.hsm_api_key, ca_file, retries=0)
        try:
            health = remote.health()
            if not health.ok:
                raise _CheckFailedError(health.detail)
            figures["hsm_fingerprint"] = remote.wallet_fingerprint(settings.default_wallet)
        finally:
            remote.close()
        return f"{settings.hsm_endpoint} ok"

    def speed() -> str:
        if not settings.identifier_api_keys:
            raise _CheckFailedError("PLINGS_IDENTIFIER_API_KEYS is not set")
        key = settings.identifier_api_keys[0].reveal_text()
        body = {
            "manufacturer": VALIDATE_BATCH.manufacturer,
            "category": VALIDATE_BATCH.category,
            "classId": VALIDATE_BATCH.class_id,
            "batch": VALIDATE_BATCH.batch,
            "walletVersion": VALIDATE_BATCH.wallet,
            "quantity": VALIDATE_KEYS,
            "userId": "plings-hsm-validate",
        }

        with _client(settings.identifier_url, settings.identifier_ca_file) as client:
            started = time.perf_counter()
            response = client.post(
                "/api/derive-keys", json=body, headers={"Authorization": f"Bearer {key}"}
            )
            elapsed_ms = (time.perf_counter() - started) * 1000

        if response.status_code != 200:
            raise _CheckFailedError(f"derive returned {response.status_code}")
        count = len(response.json()["keys"])
        source = response.headers.get("X-Key-Source", "")
        figures["validate_ms"] = elapsed_ms
        if count != VALIDATE_KEYS or source != "hsm":
            raise _CheckFailedError(
                f"{count} keys from source {source!r}; need {VALIDATE_KEYS} from hsm"
            )
        if elapsed_ms > VALIDATE_LIMIT_MS:
            raise _CheckFailedError(f"{elapsed_ms:.0f} ms; the limit is {VALIDATE_LIMIT_MS:.0f} ms")
        limit = f"{VALIDATE_LIMIT_MS:.0f}"
        return f"{VALIDATE_KEYS} keys from hsm in {elapsed_ms:.0f} ms (limit {limit} ms)"

    def master_absent() -> str:
        places = []
        if env.get("PLINGS_MASTER_KEY"):
            places.append("this process's environment")
        identifier = figures.get("identifier")
        if isinstance(identifier, dict):
            if identifier.get("envMasterConfigured"):
                places.append("the identifier API's environment")
            if identifier.get("envMasterLoaded"):
                places.append("the identifier API's memory")
        else:
            places.append("the identifier API (its /health could not be read)")
        for path in settings.env_files:
            if env_file_mentions_master(path):
                places.append(str(path))
        if places:
            raise _CheckFailedError(f"PLINGS_MASTER_KEY found in {', '.join(places)}")
        files = len(settings.env_files)
        return f"absent from the identifier API, this environment and {files} env file(s)"

    def audit_complete() -> str:
        with store.session() as session:
            chain = verify_audit_chain(session)
            entries = list_audit(session, limit=100_000)
        if not chain.ok:
            raise _CheckFailedError(f"audit chain broken at row {chain.broken_at}")
        anchored = ""
        if audit_head is not None:
            with store.session() as session:
                anchor = find_audit_row(session, audit_head)
            if anchor is None:
                raise _CheckFailedError(
                    f"no audit row has the kept head hash {audit_head[:16]}...; rows up to "
                    "it were deleted or rewritten"
                )
            anchored = f", kept head row {anchor.id} present"
        actions = {entry.action for entry in entries}
        advanced = {
            entry.new_value
            for entry in entries
            if entry.action == "rollout_advanced" and entry.subject == "percentage"
        }
        missing = [
            action
            for action in ("migration_started", "migration_finalized", "env_master_removed")
            if action not in actions
        ]
        missing += [f"advance to {step} %" for step in ROLLOUT_STEPS if str(step) not in advanced]
        if missing:
            raise _CheckFailedError(f"no audit entry for {', '.join(missing)}")
        return f"{chain.rows} rows, chain intact{anchored}, every step present"

    def fingerprints() -> str:
        state = load_state(store)
        if state is None or not state.expected_fingerprint:
            raise _CheckFailedError("no fingerprint was recorded at migrate start")
        served = figures.get("hsm_fingerprint")
        if served != state.expected_fingerprint:
            raise _CheckFailedError(
                f"HSM service has {served}; the env master had {state.expected_fingerprint}"
            )
        return f"HSM service wallet {settings.default_wallet} = env master's: {served}"

    checks.append(_run("identifier API healthy", identifier_health))
    checks.append(_run("HSM service healthy", hsm_health))
    checks.append(_run(f"{VALIDATE_KEYS} keys through the real path", speed))
    checks.append(_run("env master absent", master_absent))
    checks.append(_run("audit entries for every step", audit_complete))
    checks.append(_run("fingerprints match", fingerprints))
    return checks
