"""Reference values from bip-utils, an independent SLIP-0010 implementation used only in tests."""

from __future__ import annotations

import hashlib
from typing import Any

import base58
from bip_utils import Bip32Slip10Ed25519

from plings_hsm.core import BatchPrefix


def reference_public_key(seed: bytes, indexes: tuple[int, ...] | list[int]) -> bytes:
    """Return the 32-byte public key bip_utils derives at m/i1'/i2'/... for a seed."""
    path = "m" + "".join(f"/{index}'" for index in indexes)
    node = Bip32Slip10Ed25519.FromSeed(seed).DerivePath(path)
    return bytes(node.PublicKey().RawCompressed().ToBytes()[1:])


def reference_fingerprint(seed: bytes, wallet: int) -> str:
    """Return base58(sha256(domain + bip_utils public key at m/44'/501'/wallet'))."""
    wallet_key = reference_public_key(seed, [44, 501, wallet])
    digest = hashlib.sha256(b"plings-hsm fingerprint v1" + wallet_key).digest()
    return base58.b58encode(digest).decode("ascii")


def reference_batch(seed: bytes, prefix: BatchPrefix, start: int, quantity: int) -> list[bytes]:
    """Return bip_utils public keys of ``quantity`` instances of a batch from ``start`` on."""
    return [
        reference_public_key(seed, (*prefix.indexes, instance))
        for instance in range(start, start + quantity)
    ]


def reference_wire(seed: bytes, prefix: BatchPrefix, start: int, quantity: int) -> list[Any]:
    """Return the wire keys of a batch, public keys from bip_utils."""
    keys = []
    for instance in range(start, start + quantity):
        indexes = (*prefix.indexes, instance)
        keys.append(
            {
                "instanceNumber": instance,
                "hdPath": "m/" + "/".join(f"{index}'" for index in indexes),
                "publicKey": base58.b58encode(reference_public_key(seed, indexes)).decode(),
                "humanReadablePath": (
                    f"{prefix.manufacturer}.{prefix.category}.C{prefix.class_id}."
                    f"{prefix.batch}.{instance:05d}"
                ),
            }
        )
    return keys
