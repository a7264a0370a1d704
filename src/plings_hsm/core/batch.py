"""Batch derivation: one prefix node a request, then one child step an instance."""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass

import base58
from nacl.bindings import crypto_sign, crypto_sign_seed_keypair

from plings_hsm.core.fingerprint import wallet_fingerprint
from plings_hsm.core.path import COIN_TYPE, INDEX_MAX, PURPOSE, BatchPrefix, IdentifierPath
from plings_hsm.core.slip10 import ExtendedKey, derive_child, derive_indexes, public_key
from plings_hsm.errors import InvalidRequestError

__all__ = [
    "BatchNode",
    "DerivedKey",
    "WalletScheme",
    "check_instance_range",
    "derive_wallet_fingerprint",
    "open_batch_node",
]


class WalletScheme(enum.StrEnum):
    """Derivation scheme of a wallet, fixed when the wallet is created."""

    SLIP10_ED25519 = "slip10-ed25519"
    HSM_HMAC_SHA512 = "hsm-hmac-sha512"


@dataclass(frozen=True, slots=True)
class DerivedKey:
    """One derived identifier key: its path and its 32-byte public key."""

    path: IdentifierPath
    public_key: bytes

    @property
    def public_key_base58(self) -> str:
        """The public key as base58 text, the same text as a Solana address."""
        return str(base58.b58encode(self.public_key).decode("ascii"))

    def to_wire(self) -> dict[str, object]:
        """Return the key in the wire shape existing clients read."""
        return {
            "instanceNumber": self.path.instance,
            "hdPath": self.path.hd_path,
            "publicKey": self.public_key_base58,
            "humanReadablePath": self.path.human_readable,
        }


def check_instance_range(start: int, quantity: int, quantity_max: int) -> None:
    """Reject an instance range that starts out of range, is empty, too long or crosses 2^31.

    Raises:
        InvalidRequestError: naming the field, the value and the limit.
    """
    if start < 0 or start > INDEX_MAX:
        raise InvalidRequestError(
            f"startInstance {start} is out of range; allowed 0 to {INDEX_MAX}",
            field="startInstance",
        )
    if quantity < 1 or quantity > quantity_max:
        raise InvalidRequestError(
            f"quantity {quantity} is out of range; allowed 1 to {quantity_max}", field="quantity"
        )
    last = start + quantity - 1
    if last > INDEX_MAX:
        raise InvalidRequestError(
            f"startInstance {start} with quantity {quantity} ends at instance {last}; "
            f"the last instance may be at most {INDEX_MAX}",
            field="quantity",
        )


class BatchNode:
    """The node at ``m/44'/501'/{wallet}'/.../{batch}'``, alive for one request.

    Use it as a context manager so the node is wiped when the request ends.
    """

    __slots__ = ("_node", "prefix")

    def __init__(self, prefix: BatchPrefix, node: ExtendedKey) -> None:
        self.prefix = prefix
        self._node = node

    def __repr__(self) -> str:
        return f"BatchNode(prefix={self.prefix!r})"

    def derive(self, instance: int) -> DerivedKey:
        """Derive the public key of one instance."""
        with derive_child(self._node, instance) as child:
            return DerivedKey(self.prefix.instance(instance), public_key(child.private_key))

    def iter_keys(self, start: int, quantity: int) -> Iterator[DerivedKey]:
        """Yield the keys of ``quantity`` instances from ``start`` on, one at a time."""
        for instance in range(start, start + quantity):
            yield self.derive(instance)

    def sign(self, instance: int, message: bytes) -> tuple[bytes, bytes]:
        """Sign ``message`` with the instance key (RFC 8032 Ed25519).

        Returns:
            The 32-byte public key and the 64-byte signature.
        """
        with derive_child(self._node, instance) as child:
            verify_key, secret_key = crypto_sign_seed_keypair(bytes(child.private_key))
        signed = crypto_sign(message, secret_key)
        return bytes(verify_key), bytes(signed[:64])

    def wipe(self) -> None:
        """Overwrite the node's private key and chain code."""
        self._node.wipe()

    def __enter__(self) -> BatchNode:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.wipe()


def open_batch_node(seed: bytes | bytearray, prefix: BatchPrefix) -> BatchNode:
    """Derive the batch node of ``prefix`` from a seed (SLIP-0010, every level hardened)."""
    return BatchNode(prefix, derive_indexes(seed, prefix.indexes))


def derive_wallet_fingerprint(seed: bytes | bytearray, wallet: int) -> str:
    """Return the fingerprint of the wallet node ``m/44'/501'/{wallet}'`` of a seed."""
    with derive_indexes(seed, (PURPOSE, COIN_TYPE, wallet)) as node:
        return wallet_fingerprint(public_key(node.private_key))
