"""SLIP-0010 key derivation for ed25519, hardened children only.

Written here because the maintained SLIP-0010 packages (bip-utils, solders) either pull
in a large dependency tree or hide the chain code, and this product needs the batch
node's chain code and private key in wipeable buffers. Only the two HMAC-SHA512 steps of
the specification are implemented; the public key comes from libsodium through PyNaCl.

Specification: https://github.com/satoshilabs/slips/blob/master/slip-0010.md
"""

from __future__ import annotations

import hmac
import struct
from collections.abc import Iterable

from nacl.bindings import crypto_sign_seed_keypair

from plings_hsm.core.path import HARDENED_OFFSET, check_index
from plings_hsm.core.seed import check_seed

__all__ = [
    "ED25519_SEED_KEY",
    "ExtendedKey",
    "derive_child",
    "derive_indexes",
    "master_key",
    "public_key",
]

ED25519_SEED_KEY = b"ed25519 seed"
"""HMAC key of the SLIP-0010 master step for the ed25519 curve."""

_PACK_INDEX = struct.Struct(">I").pack


class ExtendedKey:
    """A private key with its chain code, kept in buffers that :meth:`wipe` overwrites.

    Wiping is best effort: the HMAC step returns an immutable ``bytes`` object that is
    copied here and dropped, and CPython gives no way to overwrite that copy.
    """

    __slots__ = ("chain_code", "private_key")

    def __init__(self, digest: bytes) -> None:
        self.private_key = bytearray(digest[:32])
        self.chain_code = bytearray(digest[32:])

    def __repr__(self) -> str:
        return "ExtendedKey(<secret>)"

    def wipe(self) -> None:
        """Overwrite the private key and the chain code with zeros."""
        self.private_key[:] = bytes(len(self.private_key))
        self.chain_code[:] = bytes(len(self.chain_code))

    def __enter__(self) -> ExtendedKey:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.wipe()


def master_key(seed: bytes | bytearray) -> ExtendedKey:
    """Compute the master node: ``HMAC-SHA512(key="ed25519 seed", data=seed)``.

    Raises:
        MasterKeyFormatError: when the seed is not 16 to 64 bytes.
    """
    check_seed(seed)
    return ExtendedKey(hmac.digest(ED25519_SEED_KEY, seed, "sha512"))


def derive_child(parent: ExtendedKey, index: int) -> ExtendedKey:
    """Derive the hardened child ``index'`` of ``parent``.

    Args:
        parent: the parent node; it is not modified.
        index: the level index before hardening, in ``[0, 2^31)``.

    Raises:
        InvalidPathError: when ``index`` is out of range.
    """
    check_index("index", index)
    data = b"\x00" + bytes(parent.private_key) + _PACK_INDEX(index + HARDENED_OFFSET)
    return ExtendedKey(hmac.digest(bytes(parent.chain_code), data, "sha512"))


def derive_indexes(seed: bytes | bytearray, indexes: Iterable[int]) -> ExtendedKey:
    """Derive the node at ``m/i1'/i2'/...`` from a seed, wiping every intermediate node."""
    node = master_key(seed)
    for index in indexes:
        child = derive_child(node, index)
        node.wipe()
        node = child
    return node


def public_key(private_key: bytes | bytearray) -> bytes:
    """Return the 32-byte ed25519 public key of a 32-byte private key (RFC 8032 5.1.5)."""
    verify_key, _ = crypto_sign_seed_keypair(bytes(private_key))
    return bytes(verify_key)
