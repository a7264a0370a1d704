"""Typed settings of the key manager, the identifier API and the migration runbook."""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from plings_hsm.core.path import INDEX_MAX
from plings_hsm.errors import ConfigError
from plings_hsm.manager.rollout import PERCENTAGE_MAX, parse_whitelist
from plings_hsm.secrets import Secret
from plings_hsm.service.config import (
    AUTH_FAILURES_PER_MINUTE_DEFAULT,
    BODY_MAX_BYTES_DEFAULT,
    JSON_DEPTH_MAX_DEFAULT,
    check_configured_key,
)

__all__ = [
    "MODE_ALIASES",
    "KeyManagementMode",
    "ManagerSettings",
    "parse_mode",
]


class KeyManagementMode(enum.StrEnum):
    """Source of keys: the env master, the HSM, or both compared."""

    ENV = "env"
    HSM = "hsm"
    DUAL = "dual"


MODE_ALIASES = {"vercel": KeyManagementMode.ENV, "softhsm": KeyManagementMode.HSM}
"""Old mode names, still accepted: ``vercel`` for ``env`` and ``softhsm`` for ``hsm``."""


def parse_mode(text: str, variable: str = "KEY_MANAGEMENT_MODE") -> KeyManagementMode:
    """Return the mode named by ``text``, accepting the old names.

    Raises:
        ConfigError: naming the value and the accepted names.
    """
    name = text.strip().lower()
    if name in MODE_ALIASES:
        return MODE_ALIASES[name]
    try:
        return KeyManagementMode(name)
    except ValueError:
        accepted = ", ".join([*(mode.value for mode in KeyManagementMode), *MODE_ALIASES])
        raise ConfigError(f"{variable} {text!r} is not a mode; accepted: {accepted}") from None


def _int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit():
        raise ConfigError(f"{name} {raw!r} is not a whole number; allowed {low} to {high}")
    value = int(raw)
    if not low <= value <= high:
        raise ConfigError(f"{name} {value} is out of range; allowed {low} to {high}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, low: float, high: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} {raw!r} is not a number; allowed {low} to {high}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} {value} is out of range; allowed {low} to {high}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} {raw!r} is not a boolean; use true or false")


def _secrets(env: Mapping[str, str], name: str) -> tuple[Secret, ...]:
    # Each key must be as strong as HSM_API_KEY: these keys guard the identifier API.
    parts = [part.strip() for part in env.get(name, "").split(",") if part.strip()]
    return tuple(check_configured_key(name, Secret(part)) for part in parts)


def _first_path(env: Mapping[str, str], *names: str) -> Path | None:
    for name in names:
        raw = env.get(name, "").strip()
        if raw:
            return Path(raw)
    return None


def _list(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in env.get(name, "").split(",") if part.strip())


def _webhook_urls(env: Mapping[str, str]) -> tuple[str, ...]:
    """Return PLINGS_WEBHOOK_URLS, each checked to be an http(s) URL with a host."""
    urls = _list(env, "PLINGS_WEBHOOK_URLS")
    for url in urls:
        parsed = urlsplit(url)
        if parsed.scheme not in ("https", "http") or not parsed.hostname:
            shown = url if len(url) <= 80 else f"{url[:80]}..."
            raise ConfigError(
                f"PLINGS_WEBHOOK_URLS entry {shown!r} is not an http(s) URL with a host, such "
                "as https://hooks.example.com/plings"
            )
    return urls


@dataclass(frozen=True)
class ManagerSettings:
    """Everything the key manager, the identifier API and the runbook read from the environment.

    Mode and rollout here are starting values only: once the state store contains a
    migration state, the store wins, so a restart never undoes a rollback.
    """

    mode: KeyManagementMode = KeyManagementMode.ENV
    master_key: Secret | None = field(default=None, repr=False)
    hsm_endpoint: str | None = None
    hsm_api_key: Secret | None = field(default=None, repr=False)
    hsm_ca_file: Path | None = None
    hsm_timeout_s: float = 5.0
    hsm_deadline_s: float = 5.0
    body_max_bytes: int = BODY_MAX_BYTES_DEFAULT
    json_depth_max: int = JSON_DEPTH_MAX_DEFAULT
    auth_failures_per_minute: int = AUTH_FAILURES_PER_MINUTE_DEFAULT
    hsm_retries: int = 2
    hsm_backoff_s: float = 0.1
    rollout_percentage: int = 0
    rollout_whitelist: frozenset[str] = frozenset()
    fallback_enabled: bool = True
    default_wallet: int = 1
    quantity_max: int = 10_000
    state_poll_s: float = 2.0
    soak_s: float = 3600.0
    gate_min_requests: int = 100
    gate_max_error_rate: float = 0.01
    gate_max_p99_ms: float = 500.0
    webhook_urls: tuple[str, ...] = ()
    webhook_timeout_s: float = 3.0
    identifier_api_keys: tuple[Secret, ...] = field(default=(), repr=False)
    admin_api_key: Secret | None = field(default=None, repr=False)
    identifier_host: str = "127.0.0.1"
    identifier_port: int = 8444
    identifier_url: str = "https://127.0.0.1:8444"
    identifier_ca_file: Path | None = None
    env_files: tuple[Path, ...] = ()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ManagerSettings:
        """Read the settings from ``environ`` (default ``os.environ``).

        Raises:
            ConfigError: naming the variable, its value (never a secret's) and the rule.
        """
        env = os.environ if environ is None else environ
        mode_text = env.get("KEY_MANAGEMENT_MODE", "").strip()
        admin = env.get("PLINGS_ADMIN_API_KEY", "")
        endpoint = env.get("HSM_ENDPOINT", "").strip() or None
        ca = env.get("HSM_CA_FILE", "").strip() or env.get("PLINGS_TLS_CA", "").strip()
        identifier_port = _int(env, "PLINGS_IDENTIFIER_PORT", 8444, 1, 65535)
        identifier_host = env.get("PLINGS_IDENTIFIER_HOST", "").strip() or "127.0.0.1"

        return cls(
            mode=parse_mode(mode_text) if mode_text else KeyManagementMode.ENV,
            master_key=Secret(env["PLINGS_MASTER_KEY"]) if env.get("PLINGS_MASTER_KEY") else None,
            hsm_endpoint=endpoint,
            hsm_api_key=Secret(env["HSM_API_KEY"]) if env.get("HSM_API_KEY") else None,
            hsm_ca_file=Path(ca) if ca else None,
            hsm_timeout_s=_float(env, "HSM_TIMEOUT_S", 5.0, 0.05, 120.0),
            hsm_deadline_s=_float(env, "HSM_DEADLINE_S", 5.0, 0.05, 120.0),
            body_max_bytes=_int(
                env, "PLINGS_BODY_MAX_BYTES", BODY_MAX_BYTES_DEFAULT, 1, 16 * 1024 * 1024
            ),
            json_depth_max=_int(env, "PLINGS_JSON_DEPTH_MAX", JSON_DEPTH_MAX_DEFAULT, 1, 256),
            auth_failures_per_minute=_int(
                env,
                "PLINGS_AUTH_FAILURES_PER_MINUTE",
                AUTH_FAILURES_PER_MINUTE_DEFAULT,
                1,
                1_000_000,
            ),
            hsm_retries=_int(env, "HSM_RETRIES", 2, 0, 10),
            hsm_backoff_s=_float(env, "HSM_BACKOFF_S", 0.1, 0.0, 10.0),
            rollout_percentage=_int(env, "HSM_ROLLOUT_PERCENTAGE", 0, 0, PERCENTAGE_MAX),
            rollout_whitelist=parse_whitelist(env.get("HSM_ROLLOUT_WHITELIST", "")),
            fallback_enabled=_bool(env, "HSM_FALLBACK_ENABLED", True),
            default_wallet=_int(env, "PLINGS_DEFAULT_WALLET", 1, 0, INDEX_MAX),
            quantity_max=_int(env, "PLINGS_QUANTITY_MAX", 10_000, 1, 10_000_000),
            state_poll_s=_float(env, "PLINGS_STATE_POLL_S", 2.0, 0.05, 60.0),
            soak_s=_float(env, "PLINGS_MIGRATION_SOAK_S", 3600.0, 0.0, 30 * 86400.0),
            gate_min_requests=_int(env, "PLINGS_GATE_MIN_REQUESTS", 100, 0, 10_000_000),
            gate_max_error_rate=_float(env, "PLINGS_GATE_MAX_ERROR_RATE", 0.01, 0.0, 1.0),
            gate_max_p99_ms=_float(env, "PLINGS_GATE_MAX_P99_MS", 500.0, 1.0, 600_000.0),
            webhook_urls=_webhook_urls(env),
            webhook_timeout_s=_float(env, "PLINGS_WEBHOOK_TIMEOUT_S", 3.0, 0.1, 60.0),
            identifier_api_keys=_secrets(env, "PLINGS_IDENTIFIER_API_KEYS"),
            admin_api_key=check_configured_key("PLINGS_ADMIN_API_KEY", Secret(admin))
            if admin
            else None,
            identifier_host=identifier_host,
            identifier_port=identifier_port,
            identifier_url=env.get("PLINGS_IDENTIFIER_URL", "").strip()
            or f"https://{identifier_host}:{identifier_port}",
            identifier_ca_file=_first_path(
                env, "PLINGS_IDENTIFIER_CA_FILE", "PLINGS_TLS_CA", "HSM_CA_FILE"
            ),
            env_files=tuple(Path(part) for part in _list(env, "PLINGS_ENV_FILES")),
        )
