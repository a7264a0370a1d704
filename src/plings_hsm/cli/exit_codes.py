"""The one place that maps errors to process exit codes."""

from __future__ import annotations

from plings_hsm.errors import (
    AuthenticationError,
    ConfigError,
    DuplicateObjectError,
    GateFailedError,
    HsmServiceError,
    InvalidPathError,
    InvalidRequestError,
    KeySourceUnavailableError,
    MasterKeyFormatError,
    MasterMismatchError,
    MasterObjectNotFoundError,
    MigrationStateError,
    PinIncorrectError,
    Pkcs11ModuleError,
    PlingsHsmError,
    StoreError,
    TokenError,
    TokenNotFoundError,
    WalletNotFoundError,
)

__all__ = ["EXIT_CHECK_FAILED", "EXIT_CODES", "EXIT_INTERNAL", "EXIT_OK", "exit_code_of"]

EXIT_OK = 0
EXIT_INTERNAL = 1
"""An unexpected error; the log has the details."""
EXIT_CHECK_FAILED = 9
"""A check command (doctor, a comparison) ran and found a failure."""

EXIT_CODES: tuple[tuple[type[PlingsHsmError], int], ...] = (
    (MasterKeyFormatError, 4),
    (ConfigError, 3),
    (InvalidPathError, 5),
    (InvalidRequestError, 5),
    (WalletNotFoundError, 6),
    (AuthenticationError, 7),
    (Pkcs11ModuleError, 11),
    (TokenNotFoundError, 12),
    (PinIncorrectError, 13),
    (MasterObjectNotFoundError, 14),
    (DuplicateObjectError, 15),
    (MasterMismatchError, 16),
    (TokenError, 10),
    (StoreError, 20),
    (HsmServiceError, 21),
    (GateFailedError, EXIT_CHECK_FAILED),
    (MigrationStateError, 22),
    (KeySourceUnavailableError, 23),
)
"""Exit code of each error class; the first matching entry wins, so subclasses come first."""


def exit_code_of(exc: PlingsHsmError) -> int:
    """Return the exit code for ``exc``."""
    for error_type, code in EXIT_CODES:
        if isinstance(exc, error_type):
            return code
    return EXIT_INTERNAL
