"""Typed settings, read once from the environment at the edge and handed down."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from plings_hsm.core.path import INDEX_MAX
from plings_hsm.errors import ConfigError
from plings_hsm.secrets import Secret

__all__ = [
    "DEFAULT_HOME",
    "DEFAULT_PKCS11_MODULES",
    "DEFAULT_TOKEN_LABEL",
    "Settings",
    "find_pkcs11_module",
]

DEFAULT_HOME = Path("var")
"""State folder of the embedded setup, relative to the working directory."""

DEFAULT_TOKEN_LABEL = "plings-production"  # noqa: S105 - a label, not a password
"""Token label used when PLINGS_TOKEN_LABEL is unset."""

DEFAULT_PKCS11_MODULES = (
    Path("/usr/lib/softhsm/libsofthsm2.so"),
    Path("/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so"),
    Path("/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so"),
    Path("/usr/local/lib/softhsm/libsofthsm2.so"),
)
"""Module paths of Debian's softhsm2 package and of a source build, tried in order."""

TOKEN_LABEL_MAX_BYTES = 32
"""A PKCS#11 token label is a 32-byte, space-padded field."""

QUANTITY_MAX_DEFAULT = 10_000
"""Default maximum quantity of one derive request; PLINGS_QUANTITY_MAX overrides it."""


def find_pkcs11_module(configured: str | None) -> Path:
    """Return the configured module path, or the first Debian softhsm2 module that exists.

    Raises:
        ConfigError: when nothing is configured and no known module file exists.
    """
    if configured:
        return Path(configured)
    for candidate in DEFAULT_PKCS11_MODULES:
        if candidate.exists():
            return candidate
    raise ConfigError(
        "no PKCS#11 module found; install softhsm2 (apt-get install softhsm2) "
        "or set PLINGS_PKCS11_MODULE to the module's path"
    )


def _int_setting(environ: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit():
        raise ConfigError(f"{name} {raw!r} is not a whole number; allowed {low} to {high}")
    value = int(raw)
    if not low <= value <= high:
        raise ConfigError(f"{name} {value} is out of range; allowed {low} to {high}")
    return value


def _secret_setting(environ: Mapping[str, str], name: str) -> Secret | None:
    raw = environ.get(name)
    # os.fsencode restores the bytes of a value that is not UTF-8 (Python keeps them as
    # surrogate escapes), so the value's own check rejects it instead of a UnicodeError.
    return Secret(os.fsencode(raw)) if raw else None


def _path_setting(environ: Mapping[str, str], name: str) -> Path | None:
    raw = environ.get(name, "").strip()
    return Path(raw) if raw else None


@dataclass(frozen=True)
class Settings:
    """Everything the product reads from its environment.

    Secrets are :class:`~plings_hsm.secrets.Secret` values, masked in every repr.
    """

    home: Path = DEFAULT_HOME
    pkcs11_module: str | None = None
    token_label: str = DEFAULT_TOKEN_LABEL
    user_pin: Secret | None = field(default=None, repr=False)
    so_pin: Secret | None = field(default=None, repr=False)
    softhsm2_conf: Path | None = None
    master_key: Secret | None = field(default=None, repr=False)
    api_key: Secret | None = field(default=None, repr=False)
    default_wallet: int = 1
    host: str = "127.0.0.1"
    port: int = 8443
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    quantity_max: int = QUANTITY_MAX_DEFAULT
    log_level: str = "INFO"
    database_url: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read the settings from ``environ`` (default ``os.environ``).

        Raises:
            ConfigError: naming the variable, its value (never a secret's) and the rule.
        """
        env = os.environ if environ is None else environ
        label = env.get("PLINGS_TOKEN_LABEL", "").strip() or DEFAULT_TOKEN_LABEL
        if not label.isprintable():
            raise ConfigError(f"PLINGS_TOKEN_LABEL {label!r} is not printable UTF-8 text")
        if len(label.encode("utf-8")) > TOKEN_LABEL_MAX_BYTES:
            raise ConfigError(
                f"PLINGS_TOKEN_LABEL {label!r} is {len(label.encode('utf-8'))} bytes; "
                f"a PKCS#11 token label holds at most {TOKEN_LABEL_MAX_BYTES}"
            )

        return cls(
            home=Path(env.get("PLINGS_HSM_HOME", "").strip() or DEFAULT_HOME).absolute(),
            pkcs11_module=env.get("PLINGS_PKCS11_MODULE", "").strip() or None,
            token_label=label,
            user_pin=_secret_setting(env, "SOFTHSM_USER_PIN"),
            so_pin=_secret_setting(env, "SOFTHSM_SO_PIN"),
            softhsm2_conf=_path_setting(env, "SOFTHSM2_CONF"),
            master_key=_secret_setting(env, "PLINGS_MASTER_KEY"),
            api_key=_secret_setting(env, "HSM_API_KEY"),
            default_wallet=_int_setting(env, "PLINGS_DEFAULT_WALLET", 1, 0, INDEX_MAX),
            host=env.get("PLINGS_HSM_HOST", "").strip() or "127.0.0.1",
            port=_int_setting(env, "PLINGS_HSM_PORT", 8443, 1, 65535),
            tls_cert=_path_setting(env, "PLINGS_TLS_CERT"),
            tls_key=_path_setting(env, "PLINGS_TLS_KEY"),
            tls_ca=_path_setting(env, "PLINGS_TLS_CA"),
            quantity_max=_int_setting(
                env, "PLINGS_QUANTITY_MAX", QUANTITY_MAX_DEFAULT, 1, 10_000_000
            ),
            log_level=env.get("PLINGS_LOG_LEVEL", "").strip() or "INFO",
            database_url=env.get("PLINGS_DATABASE_URL", "").strip() or None,
        )

    def store_url(self) -> str:
        """Return PLINGS_DATABASE_URL, or the SQLite file under the home."""
        return self.database_url or f"sqlite:///{self.home / 'plings-hsm.db'}"

    def module_path(self) -> Path:
        """Return the PKCS#11 module to load (see :func:`find_pkcs11_module`)."""
        return find_pkcs11_module(self.pkcs11_module)
