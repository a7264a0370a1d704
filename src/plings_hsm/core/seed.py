"""Decoding of the env master: base58 text of the SLIP-0010 seed."""

from __future__ import annotations

import base58

from plings_hsm.errors import MasterKeyFormatError

__all__ = ["BASE58_ALPHABET", "SEED_MAX_BYTES", "SEED_MIN_BYTES", "check_seed", "decode_master_key"]

SEED_MIN_BYTES = 16
"""Shortest seed SLIP-0010 (following BIP-32) accepts: 128 bits."""

SEED_MAX_BYTES = 64
"""Longest seed SLIP-0010 (following BIP-32) accepts: 512 bits."""

BASE58_ALPHABET = frozenset("123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz")
"""The Bitcoin base58 alphabet, as Solana uses it."""


def check_seed(seed: bytes | bytearray, field: str = "seed") -> None:
    """Reject a seed outside 16 to 64 bytes; the message gives its length, never its bytes."""
    if not SEED_MIN_BYTES <= len(seed) <= SEED_MAX_BYTES:
        raise MasterKeyFormatError(
            f"{field} is {len(seed)} bytes; need {SEED_MIN_BYTES} to {SEED_MAX_BYTES}"
        )


def decode_master_key(text: str | bytes, variable: str = "PLINGS_MASTER_KEY") -> bytearray:
    """Decode base58 text into a seed; the caller wipes the returned bytearray.

    Whitespace around the text (a trailing newline from a file or a pipe) is dropped;
    whitespace inside it is an error. No message contains the text or a part of it.

    Args:
        text: the base58 text.
        variable: the name used in error messages.

    Raises:
        MasterKeyFormatError: when the text is empty, has a character outside the
            alphabet, or decodes to fewer than 16 or more than 64 bytes.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            raise MasterKeyFormatError(
                f"{variable} contains a non-ASCII byte; base58 uses ASCII letters and digits only"
            ) from None
    stripped = text.strip()
    if not stripped:
        raise MasterKeyFormatError(f"{variable} is empty; set it to the base58 text of the seed")
    if any(char.isspace() for char in stripped):
        raise MasterKeyFormatError(f"{variable} contains whitespace inside the base58 text")
    if not all(char in BASE58_ALPHABET for char in stripped):
        raise MasterKeyFormatError(
            f"{variable} contains a character outside the base58 alphabet "
            "(0, O, I, l and punctuation are not base58)"
        )

    seed = bytearray(base58.b58decode(stripped))
    try:
        check_seed(seed, field=f"{variable} decoded")
    except MasterKeyFormatError:
        seed[:] = bytes(len(seed))
        raise
    return seed
