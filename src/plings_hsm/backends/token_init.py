"""Token initialisation through a child process (see ``_token_init_child``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import structlog

from plings_hsm.errors import ConfigError, Pkcs11ModuleError, TokenError
from plings_hsm.secrets import Secret
from plings_hsm.settings import TOKEN_LABEL_MAX_BYTES

__all__ = ["PIN_MAX_BYTES", "PIN_MIN_BYTES", "check_pin", "init_token"]

log = structlog.get_logger(__name__)

PIN_MIN_BYTES = 4
"""Shortest PIN SoftHSM 2.6 accepts."""

PIN_MAX_BYTES = 255
"""Longest PIN SoftHSM 2.6 accepts."""

INIT_TIMEOUT_S = 60.0
"""Time the child process may take before it is killed."""


def check_pin(name: str, pin: Secret | None) -> Secret:
    """Return ``pin`` when it is set and 4 to 255 bytes long.

    Raises:
        ConfigError: naming the variable and the length, never the PIN.
    """
    if pin is None or not pin:
        raise ConfigError(f"{name} is not set; export it before running this command")
    if not PIN_MIN_BYTES <= len(pin) <= PIN_MAX_BYTES:
        raise ConfigError(f"{name} is {len(pin)} bytes; need {PIN_MIN_BYTES} to {PIN_MAX_BYTES}")
    # python-pkcs11 and PyKCS11 take PINs as str, so a PIN must be UTF-8 text.
    try:
        pin.reveal_text()
    except UnicodeDecodeError:
        raise ConfigError(f"{name} is not valid UTF-8 text") from None
    return pin


def init_token(
    module: Path, label: str, so_pin: Secret, user_pin: Secret, softhsm2_conf: Path | None
) -> bool:
    """Initialise a token with ``label`` in a free slot, unless one with that label exists.

    Returns:
        True when a token was initialised, False when it existed already.

    Raises:
        ConfigError: when the label is empty or longer than 32 bytes.
        Pkcs11ModuleError: when the module cannot be loaded.
        TokenError: when the token rejects the initialisation.
    """
    label_bytes = len(label.encode("utf-8"))
    if not 1 <= label_bytes <= TOKEN_LABEL_MAX_BYTES:
        # C_InitToken takes a fixed 32-byte field, and a longer label would be cut short
        # silently, so the token could not be found by the label given here.
        raise ConfigError(
            f"token label {label!r} is {label_bytes} bytes; "
            f"a PKCS#11 token label holds 1 to {TOKEN_LABEL_MAX_BYTES}"
        )
    request = {
        "module": str(module),
        "label": label,
        "so_pin": so_pin.reveal_text(),
        "user_pin": user_pin.reveal_text(),
    }
    env = dict(os.environ)
    if softhsm2_conf is not None:
        env["SOFTHSM2_CONF"] = str(softhsm2_conf)

    log.info("token_init_started", token_label=label)
    completed = subprocess.run(
        [sys.executable, "-m", "plings_hsm.backends._token_init_child"],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        env=env,
        timeout=INIT_TIMEOUT_S,
        check=False,
    )
    request.clear()
    if completed.returncode != 0:
        raise TokenError(
            f"token initialisation process exited with {completed.returncode}; "
            "run 'plings-hsm doctor' for details"
        )
    try:
        result = json.loads(completed.stdout)
    except json.JSONDecodeError as exc:
        raise TokenError(
            "token initialisation process returned no result; run 'plings-hsm doctor' for details"
        ) from exc

    if result["kind"] == "exists":
        log.info("token_init_skipped", token_label=label, reason="exists")
        return False
    if result["kind"] == "module":
        raise Pkcs11ModuleError(result["message"])
    if result["kind"] == "no_slot":
        raise ConfigError(f"cannot initialise token {label!r}: {result['message']}")
    if not result["ok"]:
        raise TokenError(f"cannot initialise token {label!r}: {result['message']}")
    log.info("token_initialised", token_label=label)
    return True
