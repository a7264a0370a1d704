"""Derivation core: paths, SLIP-0010 ed25519, identifiers and fingerprints; no I/O."""

from plings_hsm.core.batch import (
    BatchNode,
    DerivedKey,
    WalletScheme,
    check_instance_range,
    derive_wallet_fingerprint,
    open_batch_node,
)
from plings_hsm.core.fingerprint import wallet_fingerprint
from plings_hsm.core.path import (
    INDEX_MAX,
    BatchPrefix,
    IdentifierPath,
    check_index,
    parse_path,
)
from plings_hsm.core.seed import SEED_MAX_BYTES, SEED_MIN_BYTES, check_seed, decode_master_key
from plings_hsm.core.slip10 import ExtendedKey, derive_child, derive_indexes, master_key, public_key

__all__ = [
    "INDEX_MAX",
    "SEED_MAX_BYTES",
    "SEED_MIN_BYTES",
    "BatchNode",
    "BatchPrefix",
    "DerivedKey",
    "ExtendedKey",
    "IdentifierPath",
    "WalletScheme",
    "check_index",
    "check_instance_range",
    "check_seed",
    "decode_master_key",
    "derive_child",
    "derive_indexes",
    "derive_wallet_fingerprint",
    "master_key",
    "open_batch_node",
    "parse_path",
    "public_key",
    "wallet_fingerprint",
]
