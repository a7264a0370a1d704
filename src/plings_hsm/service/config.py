"""Settings of the HSM service besides its backend, and their reading from the environment."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from plings_hsm.errors import ConfigError
from plings_hsm.secrets import Secret
from plings_hsm.service.client_address import IPNetwork, ProxyHeader, parse_networks
from plings_hsm.settings import QUANTITY_MAX_DEFAULT
from plings_hsm.store.api_keys import (
    API_KEY_PREFIX,
    BUDGET_MAX_PER_MINUTE,
    ApiKeyStore,
    has_store_key_prefix,
)

__all__ = [
    "API_KEY_MIN_CHARS",
    "AUTH_FAILURES_PER_MINUTE_DEFAULT",
    "BODY_MAX_BYTES_DEFAULT",
    "BODY_TIMEOUT_S_DEFAULT",
    "JSON_DEPTH_MAX_DEFAULT",
    "KEYS_PER_MINUTE_DEFAULT",
    "REQUESTS_PER_MINUTE_DEFAULT",
    "ServiceConfig",
    "check_configured_key",
    "service_config_from_env",
]

API_KEY_MIN_CHARS = 32
"""Shortest configured API key, in characters after stripping surrounding whitespace."""

REQUESTS_PER_MINUTE_DEFAULT = 100
"""Requests a minute per API key, and per address on the paths that need no key."""

KEYS_PER_MINUTE_DEFAULT = 200_000
"""Keys derived (or signed with) a minute per API key."""

AUTH_FAILURES_PER_MINUTE_DEFAULT = 10
"""Failed authentication attempts a minute from one address before it gets 429."""

BODY_MAX_BYTES_DEFAULT = 64 * 1024
"""Largest request body in bytes; a derive request is about 150 bytes."""

JSON_DEPTH_MAX_DEFAULT = 16
"""Deepest nesting of arrays and objects in a request body; the API needs depth 1."""

BODY_TIMEOUT_S_DEFAULT = 30.0
"""Seconds a request body may take to arrive; uvicorn has no such limit of its own."""

_ORIGIN_RE = re.compile(r"https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


def _check_origins(origins: tuple[str, ...], allow_credentials: bool) -> None:
    for origin in origins:
        if origin == "*":
            continue
        if not _ORIGIN_RE.fullmatch(origin):
            raise ConfigError(
                f"ALLOWED_ORIGINS entry {origin!r} is not an origin; write scheme://host[:port] "
                "with no path and no trailing slash, e.g. https://app.example.com"
            )
    if "*" in origins and allow_credentials:
        raise ConfigError(
            "ALLOWED_ORIGINS '*' with PLINGS_CORS_ALLOW_CREDENTIALS=true would let every site "
            "send credentialed requests; list the origins instead"
        )


@dataclass(frozen=True)
class ServiceConfig:
    """What the service needs besides its backend; every field but the keys has a default.

    Args:
        api_keys: bearer keys from configuration (HSM_API_KEY is one); each is one client.
        default_wallet: walletVersion used when a request omits it.
        quantity_max: largest batch one derive request may ask for.
        key_store: API keys kept hashed in the state store, beside ``api_keys``.
        budget_requests_per_minute: requests a minute of a key without its own budget.
        budget_keys_per_minute: keys derived or signed with a minute, same keys.
        budget_address_requests_per_minute: requests a minute of one client address
            to what needs no key: ``/health`` and CORS preflights.
        budget_auth_failures_per_minute: failed authentications a minute from one
            address; past it, every authenticated route returns 429 to that address.
        allowed_origins: browser origins CORS lets in; ``*`` only without credentials.
        cors_allow_credentials: send ``Access-Control-Allow-Credentials: true``.
        trusted_proxies: networks whose forwarding header is read.
        proxy_header: which forwarding header the trusted proxies write.
        body_max_bytes: largest request body.
        json_depth_max: deepest nesting of arrays and objects in a body.
        body_timeout_s: seconds a request body may take to arrive, then 408.
        static_key_name: client name of the configured keys in the logs.
        clock: monotonic seconds for the budgets; tests pass their own.
    """

    api_keys: tuple[Secret, ...] = ()
    default_wallet: int = 1
    quantity_max: int = QUANTITY_MAX_DEFAULT
    key_store: ApiKeyStore | None = None
    budget_requests_per_minute: int = REQUESTS_PER_MINUTE_DEFAULT
    budget_keys_per_minute: int = KEYS_PER_MINUTE_DEFAULT
    budget_address_requests_per_minute: int = REQUESTS_PER_MINUTE_DEFAULT
    budget_auth_failures_per_minute: int = AUTH_FAILURES_PER_MINUTE_DEFAULT
    allowed_origins: tuple[str, ...] = ()
    cors_allow_credentials: bool = False
    trusted_proxies: tuple[IPNetwork, ...] = ()
    proxy_header: ProxyHeader = ProxyHeader.X_FORWARDED_FOR
    body_max_bytes: int = BODY_MAX_BYTES_DEFAULT
    json_depth_max: int = JSON_DEPTH_MAX_DEFAULT
    body_timeout_s: float = BODY_TIMEOUT_S_DEFAULT
    static_key_name: str = "HSM_API_KEY"
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)

    def __post_init__(self) -> None:
        _check_origins(self.allowed_origins, self.cors_allow_credentials)
        positive = {
            "quantity_max": self.quantity_max,
            "budget_requests_per_minute": self.budget_requests_per_minute,
            "budget_keys_per_minute": self.budget_keys_per_minute,
            "budget_address_requests_per_minute": self.budget_address_requests_per_minute,
            "budget_auth_failures_per_minute": self.budget_auth_failures_per_minute,
            "body_max_bytes": self.body_max_bytes,
            "json_depth_max": self.json_depth_max,
        }
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"{name} {value} is out of range; it must be at least 1")
        if not self.body_timeout_s > 0:
            raise ConfigError(f"body_timeout_s {self.body_timeout_s} must be more than 0")


def check_configured_key(name: str, key: Secret) -> Secret:
    """Check a configured API key such as HSM_API_KEY and return it stripped.

    A key needs API_KEY_MIN_CHARS printable ASCII characters after surrounding whitespace
    is stripped, and no whitespace inside, because clients strip the bearer token too.
    Messages name the variable and the length, never the value.

    Raises:
        ConfigError: when the key is too short, contains a byte outside printable ASCII,
            or starts like a store key (``plk_``), which the service judges by the store
            alone.
    """
    stripped = key.reveal().strip()
    if len(stripped) < API_KEY_MIN_CHARS:
        raise ConfigError(
            f"{name} is {len(stripped)} characters after stripping whitespace; the minimum is "
            f"{API_KEY_MIN_CHARS}. Generate one with: python3 -c "
            "'import secrets; print(secrets.token_urlsafe(32))'"
        )
    for position, byte in enumerate(stripped):
        if not 0x21 <= byte <= 0x7E:
            raise ConfigError(
                f"{name} ({len(stripped)} characters) contains whitespace or a byte outside "
                f"printable ASCII at position {position}; use letters, digits and punctuation"
            )
    if has_store_key_prefix(stripped):
        raise ConfigError(
            f"{name} starts with '{API_KEY_PREFIX}_' like a key from 'plings-hsm apikey create'; "
            f"such keys are checked against the state store only, so set {name} to a key "
            "of its own"
        )
    return Secret(stripped)


def _int_setting(environ: Mapping[str, str], name: str, default: int, high: int) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= high:
        raise ConfigError(f"{name} {raw!r} is invalid; allowed a whole number from 1 to {high}")
    return int(raw)


def _bool_setting(environ: Mapping[str, str], name: str) -> bool:
    raw = environ.get(name, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ConfigError(f"{name} {raw!r} is invalid; allowed true or false")


def service_config_from_env(
    environ: Mapping[str, str] | None = None,
    *,
    api_keys: tuple[Secret, ...],
    key_store: ApiKeyStore | None,
    default_wallet: int,
    quantity_max: int,
) -> ServiceConfig:
    """Read the service's network settings from ``environ`` (default ``os.environ``).

    Raises:
        ConfigError: naming the variable, the value and what is allowed.
    """
    env = os.environ if environ is None else environ
    origins = tuple(
        origin.strip() for origin in env.get("ALLOWED_ORIGINS", "").split(",") if origin.strip()
    )
    try:
        trusted = parse_networks(env.get("PLINGS_TRUSTED_PROXIES", ""), "PLINGS_TRUSTED_PROXIES")
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    header_name = env.get("PLINGS_PROXY_HEADER", "").strip().lower() or "x-forwarded-for"
    try:
        header = ProxyHeader(header_name)
    except ValueError as exc:
        raise ConfigError(
            f"PLINGS_PROXY_HEADER {header_name!r} is invalid; allowed x-forwarded-for or forwarded"
        ) from exc
    budget_max = BUDGET_MAX_PER_MINUTE

    return ServiceConfig(
        api_keys=api_keys,
        default_wallet=default_wallet,
        quantity_max=quantity_max,
        key_store=key_store,
        budget_requests_per_minute=_int_setting(
            env, "PLINGS_REQUESTS_PER_MINUTE", REQUESTS_PER_MINUTE_DEFAULT, budget_max
        ),
        budget_keys_per_minute=_int_setting(
            env, "PLINGS_KEYS_PER_MINUTE", KEYS_PER_MINUTE_DEFAULT, budget_max
        ),
        budget_address_requests_per_minute=_int_setting(
            env, "PLINGS_ADDRESS_REQUESTS_PER_MINUTE", REQUESTS_PER_MINUTE_DEFAULT, budget_max
        ),
        budget_auth_failures_per_minute=_int_setting(
            env, "PLINGS_AUTH_FAILURES_PER_MINUTE", AUTH_FAILURES_PER_MINUTE_DEFAULT, budget_max
        ),
        allowed_origins=origins,
        cors_allow_credentials=_bool_setting(env, "PLINGS_CORS_ALLOW_CREDENTIALS"),
        trusted_proxies=trusted,
        proxy_header=header,
        body_max_bytes=_int_setting(
            env, "PLINGS_BODY_MAX_BYTES", BODY_MAX_BYTES_DEFAULT, 16 * 1024 * 1024
        ),
        json_depth_max=_int_setting(env, "PLINGS_JSON_DEPTH_MAX", JSON_DEPTH_MAX_DEFAULT, 256),
    )
