"""The key backend interface and the derivation shared by backends that hold a seed."""

from __future__ import annotations

import abc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from plings_hsm.core.batch import (
    BatchNode,
    DerivedKey,
    WalletScheme,
    derive_wallet_fingerprint,
    open_batch_node,
)
from plings_hsm.core.path import BatchPrefix, IdentifierPath
from plings_hsm.errors import WalletNotFoundError

__all__ = [
    "WALLET_FINGERPRINT_HEADER",
    "BackendHealth",
    "KeyBackend",
    "SeedBackend",
    "Signature",
    "WalletInfo",
]

WALLET_FINGERPRINT_HEADER = "X-Wallet-Fingerprint"
"""HTTP header in which the HSM service names the fingerprint of the wallet it derived from.

A client compares it with the fingerprint it expects before it uses the keys, so a
replica holding another master is caught on its first response.
"""


@dataclass(frozen=True, slots=True)
class WalletInfo:
    """Public facts about one wallet: version, token label, scheme and fingerprint."""

    version: int
    label: str
    scheme: WalletScheme
    fingerprint: str

    def to_wire(self) -> dict[str, object]:
        """Return the wallet as the service's health body shows it."""
        return {
            "walletVersion": self.version,
            "label": self.label,
            "scheme": str(self.scheme),
            "fingerprint": self.fingerprint,
        }


@dataclass(frozen=True, slots=True)
class Signature:
    """An Ed25519 signature with the public key that verifies it."""

    public_key: bytes
    signature: bytes


@dataclass(frozen=True, slots=True)
class BackendHealth:
    """Result of a backend's health check; ``detail`` never contains a secret."""

    backend: str
    ok: bool
    detail: str
    wallets: list[WalletInfo] = field(default_factory=list)


class KeyBackend(abc.ABC):
    """A source of identifier keys: derive a batch, sign, report health and fingerprints."""

    name: str = "abstract"

    @abc.abstractmethod
    def wallets(self) -> list[WalletInfo]:
        """List the wallets this backend can derive from."""

    @abc.abstractmethod
    def iter_keys(self, prefix: BatchPrefix, start: int, quantity: int) -> Iterator[DerivedKey]:
        """Yield the keys of ``quantity`` instances of a batch from ``start`` on.

        Raises:
            WalletNotFoundError: when the backend has no master for ``prefix.wallet``.
        """

    @abc.abstractmethod
    def sign(self, path: IdentifierPath, message: bytes) -> Signature:
        """Sign ``message`` with the key at ``path``."""

    @abc.abstractmethod
    def health(self) -> BackendHealth:
        """Check the backend without raising; failures go into the result."""

    def derive_keys(self, prefix: BatchPrefix, start: int, quantity: int) -> list[DerivedKey]:
        """Return the keys of a batch as a list (see :meth:`iter_keys`)."""
        return list(self.iter_keys(prefix, start, quantity))

    def wallet_fingerprint(self, wallet: int) -> str:
        """Return the fingerprint of one wallet.

        Raises:
            WalletNotFoundError: when the backend has no such wallet.
        """
        for info in self.wallets():
            if info.version == wallet:
                return info.fingerprint
        raise WalletNotFoundError(f"walletVersion {wallet} not found on the {self.name} backend")

    def last_peer(self) -> str | None:
        """Return an id of the server that sent this thread's last response, if remote."""
        return None

    def last_fingerprint(self) -> str | None:
        """Return the wallet fingerprint this thread's last remote call reported, if any."""
        return None

    def fingerprint_of(self, wallet: int) -> str:
        """Return one wallet's fingerprint; backends with a cheaper lookup override this."""
        return self.wallet_fingerprint(wallet)

    def close(self) -> None:  # noqa: B027 - most backends have nothing to release
        """Release what the backend holds."""


class SeedBackend(KeyBackend):
    """A backend that obtains the seed and derives in process, the same way for every source.

    Subclasses load the seed in :meth:`_load_seed`; the batch node is
    derived here, lives for one request and is wiped after it.
    """

    @abc.abstractmethod
    def _load_seed(self, wallet: int) -> bytearray:
        """Return a fresh copy of the wallet's seed, which the caller wipes."""

    @contextmanager
    def open_batch(self, prefix: BatchPrefix) -> Iterator[BatchNode]:
        """Derive the batch node of ``prefix`` for the length of a ``with`` block."""
        seed = self._load_seed(prefix.wallet)
        try:
            node = open_batch_node(seed, prefix)
        finally:
            seed[:] = bytes(len(seed))
        with node:
            yield node

    def iter_keys(self, prefix: BatchPrefix, start: int, quantity: int) -> Iterator[DerivedKey]:
        with self.open_batch(prefix) as node:
            yield from node.iter_keys(start, quantity)

    def sign(self, path: IdentifierPath, message: bytes) -> Signature:
        with self.open_batch(path.prefix) as node:
            public_key, signature = node.sign(path.instance, message)
        return Signature(public_key, signature)

    def _fingerprint_of(self, wallet: int) -> str:
        seed = self._load_seed(wallet)
        try:
            return derive_wallet_fingerprint(seed, wallet)
        finally:
            seed[:] = bytes(len(seed))
