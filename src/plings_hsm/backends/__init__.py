"""Key backends: one interface, with the master from the environment or from a token."""

from plings_hsm.backends.base import (
    WALLET_FINGERPRINT_HEADER,
    BackendHealth,
    KeyBackend,
    SeedBackend,
    Signature,
    WalletInfo,
)
from plings_hsm.backends.env import EnvBackend
from plings_hsm.backends.pkcs11 import ImportResult, Pkcs11Backend, master_label
from plings_hsm.backends.token import TokenSession
from plings_hsm.backends.token_init import check_pin, init_token

__all__ = [
    "WALLET_FINGERPRINT_HEADER",
    "BackendHealth",
    "EnvBackend",
    "ImportResult",
    "KeyBackend",
    "Pkcs11Backend",
    "SeedBackend",
    "Signature",
    "TokenSession",
    "WalletInfo",
    "check_pin",
    "init_token",
    "master_label",
]
