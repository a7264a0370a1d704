"""Shared fixtures: a real SoftHSM2 token in a temporary folder, and test secrets.

SoftHSM reads SOFTHSM2_CONF when python-pkcs11 first initialises the module, once per
process, so the configuration is set in ``pytest_configure`` before any test runs.
With PLINGS_REQUIRE_TOKEN=1 (CI sets it) a missing SoftHSM2 fails the run instead of
skipping the token tests.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import base58
import pytest
import structlog

from plings_hsm.settings import DEFAULT_PKCS11_MODULES

TEST_USER_PIN = os.environ.get("PLINGS_TEST_USER_PIN", "test-user-pin-1234")
TEST_SO_PIN = os.environ.get("PLINGS_TEST_SO_PIN", "test-so-pin-5678")
TEST_TOKEN_LABEL = "plings-test"

TEST_SEED = bytes.fromhex("0f" * 8 + "a5" * 8 + "3c" * 16)
"""A 32-byte seed used by the token tests; never a production value."""

TEST_MASTER_KEY = base58.b58encode(TEST_SEED).decode("ascii")

_TOKEN_ROOT = Path(tempfile.mkdtemp(prefix="plings-hsm-tests-"))


def _module_path() -> Path | None:
    configured = os.environ.get("PLINGS_PKCS11_MODULE")
    if configured:
        return Path(configured)
    for candidate in DEFAULT_PKCS11_MODULES:
        if candidate.exists():
            return candidate
    return None


def pytest_configure(config: pytest.Config) -> None:
    # structlog's default console renderer prints rich tracebacks with local variables,
    # which would put request headers (bearer keys) into the test log. Plain tracebacks
    # show code only.
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.StackInfoRenderer(),
            structlog.dev.set_exc_info,
            structlog.processors.TimeStamper(fmt="%Y-%m-%d %H:%M:%S", utc=False),
            structlog.dev.ConsoleRenderer(
                colors=False, exception_formatter=structlog.dev.plain_traceback
            ),
        ]
    )

    tokens = _TOKEN_ROOT / "tokens"
    tokens.mkdir(mode=0o700, exist_ok=True)
    conf = _TOKEN_ROOT / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n",
        encoding="utf-8",
    )
    os.environ["SOFTHSM2_CONF"] = str(conf)


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_TOKEN_ROOT, ignore_errors=True)


@dataclass(frozen=True)
class TokenInfo:
    """A ready SoftHSM2 token: module, label, PINs and the config that finds it."""

    module: Path
    label: str
    user_pin: str
    so_pin: str
    softhsm2_conf: Path


def _require_module() -> Path:
    module = _module_path()
    if module is None or not module.exists():
        reason = "SoftHSM2 is not installed (apt-get install softhsm2)"
        if os.environ.get("PLINGS_REQUIRE_TOKEN") == "1":
            pytest.fail(f"{reason}; PLINGS_REQUIRE_TOKEN=1 forbids skipping token tests")
        pytest.skip(reason)
    return module


def make_token(label: str) -> TokenInfo:
    """Initialise a token with ``label`` in the test token folder (kept if it exists)."""
    from plings_hsm.backends.token import TokenSession
    from plings_hsm.backends.token_init import init_token
    from plings_hsm.secrets import Secret

    module = _require_module()
    conf = Path(os.environ["SOFTHSM2_CONF"])
    created = init_token(module, label, Secret(TEST_SO_PIN), Secret(TEST_USER_PIN), conf)
    if created:
        # Let this process's module see the new token.
        session = TokenSession.acquire(module, label, Secret(TEST_USER_PIN))
        session.reinitialize()
        session.close()
    return TokenInfo(module, label, TEST_USER_PIN, TEST_SO_PIN, conf)


@pytest.fixture(scope="session")
def token() -> TokenInfo:
    """A session-wide token labelled plings-test, without wallets."""
    return make_token(TEST_TOKEN_LABEL)


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def pkcs11_token_env(token: TokenInfo, tmp_path: Path) -> Iterator[dict[str, str]]:
    """Environment for a CLI child process that uses the test token."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PLINGS_", "SOFTHSM_", "HSM_"))
    }
    env.update(
        {
            "SOFTHSM2_CONF": str(token.softhsm2_conf),
            "PLINGS_PKCS11_MODULE": str(token.module),
            "PLINGS_TOKEN_LABEL": token.label,
            "SOFTHSM_USER_PIN": token.user_pin,
            "SOFTHSM_SO_PIN": token.so_pin,
            "PLINGS_HSM_HOME": str(tmp_path / "home"),
        }
    )
    yield env
