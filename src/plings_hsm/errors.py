"""Exception tree of plings-hsm.

Every error the product raises on purpose derives from :class:`PlingsHsmError`::

    PlingsHsmError
    ├── ConfigError               a setting is missing or malformed
    │   └── MasterKeyFormatError  PLINGS_MASTER_KEY is not base58 of 16 to 64 bytes
    ├── InvalidPathError          a derivation path or index breaks a rule
    ├── InvalidRequestError       a request field is out of its range
    │   └── PayloadTooLargeError  a request body is larger than the service accepts
    ├── WalletNotFoundError       no master for the requested wallet version
    ├── DerivationError           derivation failed for a reason other than input
    ├── AuthenticationError       a credential is missing or wrong
    ├── RateLimitedError          a client is over its request or key budget
    ├── TokenError                the PKCS#11 token could not do what was asked
    │   ├── Pkcs11ModuleError     the PKCS#11 module is missing or failed to load
    │   ├── TokenNotFoundError    no token carries the configured label
    │   ├── DuplicateTokenError   more than one token carries the configured label
    │   ├── PinIncorrectError     the token rejected the PIN
    │   ├── TokenUnavailableError the token stopped answering
    │   ├── MasterObjectNotFoundError  no master object for a wallet label
    │   ├── DuplicateObjectError  two objects carry one wallet label
    │   └── MasterMismatchError   the token holds a different master under that label
    ├── StoreError                the state store failed
    ├── HsmServiceError           the HSM service failed, timed out or could not be reached
    │   ├── FingerprintMismatchError  the HSM service holds another master than expected
    │   └── HsmRateLimitedError   the HSM service answered 429 past the call's deadline
    ├── KeySourceUnavailableError no configured key source may serve in the current mode
    └── MigrationStateError       a migration command is not allowed in the current state
        └── GateFailedError       a step's gate failed, so the migration was rolled back

Messages name the field, the value and the limit. They never contain a seed, a PIN, a
key or an API key: for a secret they give the field name and at most its length.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "ConfigError",
    "DerivationError",
    "DuplicateObjectError",
    "DuplicateTokenError",
    "FingerprintMismatchError",
    "GateFailedError",
    "HsmRateLimitedError",
    "HsmServiceError",
    "InvalidPathError",
    "InvalidRequestError",
    "KeySourceUnavailableError",
    "MasterKeyFormatError",
    "MasterMismatchError",
    "MasterObjectNotFoundError",
    "MigrationStateError",
    "PayloadTooLargeError",
    "PinIncorrectError",
    "Pkcs11ModuleError",
    "PlingsHsmError",
    "RateLimitedError",
    "StoreError",
    "TokenError",
    "TokenNotFoundError",
    "TokenUnavailableError",
    "WalletNotFoundError",
]


class PlingsHsmError(Exception):
    """Base of every error that plings-hsm raises on purpose."""


class ConfigError(PlingsHsmError):
    """A setting is missing or malformed."""


class MasterKeyFormatError(ConfigError):
    """The env master is not base58 text of a 16 to 64 byte seed."""


class InvalidPathError(PlingsHsmError):
    """A derivation path or one of its indexes breaks a rule."""


class InvalidRequestError(PlingsHsmError):
    """A request field is outside its allowed range.

    Args:
        message: the sentence shown to the caller.
        field: the wire name of the offending field, when there is one.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class PayloadTooLargeError(InvalidRequestError):
    """A request body is larger than the service accepts."""


class WalletNotFoundError(PlingsHsmError):
    """No master secret is available for the requested wallet version."""


class DerivationError(PlingsHsmError):
    """Derivation failed for a reason other than bad input."""


class AuthenticationError(PlingsHsmError):
    """A credential is missing or wrong; the message does not tell which."""


class RateLimitedError(PlingsHsmError):
    """A client is over its request or key budget.

    Args:
        message: the sentence shown to the caller, naming the budget and its limit.
        retry_after_s: whole seconds after which the same request fits the budget again.
    """

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TokenError(PlingsHsmError):
    """The PKCS#11 token could not do what was asked."""


class Pkcs11ModuleError(TokenError):
    """The PKCS#11 module is missing or failed to load."""


class TokenNotFoundError(TokenError):
    """No token carries the configured label."""


class DuplicateTokenError(TokenError):
    """More than one token carries the configured label."""


class PinIncorrectError(TokenError):
    """The token rejected the PIN."""


class TokenUnavailableError(TokenError):
    """The token stopped responding or a token call failed unexpectedly."""


class MasterObjectNotFoundError(TokenError):
    """The token has no master object for a wallet label."""


class DuplicateObjectError(TokenError):
    """More than one token object carries a wallet label."""


class MasterMismatchError(TokenError):
    """The token contains a different master under the wallet label."""


class StoreError(PlingsHsmError):
    """The state store failed."""


class HsmServiceError(PlingsHsmError):
    """The HSM service failed, timed out or could not be reached."""


class FingerprintMismatchError(HsmServiceError):
    """The HSM service's wallet fingerprint differs from the expected fingerprint."""


class HsmRateLimitedError(HsmServiceError):
    """The HSM service returned 429 and its Retry-After did not fit the call's deadline."""


class MigrationStateError(PlingsHsmError):
    """A migration command is not allowed in the current migration state."""


class GateFailedError(MigrationStateError):
    """A step's gate failed, so the migration was rolled back to env."""


class KeySourceUnavailableError(PlingsHsmError):
    """No configured key source may serve a request in the current mode."""
