"""Wallet fingerprints: public values that identify a master secret without revealing it."""

from __future__ import annotations

import hashlib

import base58

__all__ = ["FINGERPRINT_DOMAIN", "wallet_fingerprint"]

FINGERPRINT_DOMAIN = b"plings-hsm fingerprint v1"
"""ASCII prefix hashed before the wallet public key, so the hash serves no other purpose."""


def wallet_fingerprint(wallet_public_key: bytes) -> str:
    """Return base58 of SHA-256 over the domain prefix and the 32-byte wallet public key.

    The wallet public key is the one at ``m/44'/501'/{wallet}'``. Hashing it keeps that key,
    itself a valid account address in common wallets, out of view.
    """
    if len(wallet_public_key) != 32:
        raise ValueError(f"wallet public key is {len(wallet_public_key)} bytes; need 32")
    digest = hashlib.sha256(FINGERPRINT_DOMAIN + wallet_public_key).digest()
    return str(base58.b58encode(digest).decode("ascii"))
