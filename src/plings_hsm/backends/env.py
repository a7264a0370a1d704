"""The env backend: the master secret from ``PLINGS_MASTER_KEY``, in process."""

from __future__ import annotations

from collections.abc import Iterable

import structlog

from plings_hsm.backends.base import BackendHealth, SeedBackend, WalletInfo
from plings_hsm.core.batch import WalletScheme
from plings_hsm.core.seed import decode_master_key
from plings_hsm.errors import DerivationError, PlingsHsmError, WalletNotFoundError
from plings_hsm.secrets import Secret

__all__ = ["EnvBackend"]

log = structlog.get_logger(__name__)


class EnvBackend(SeedBackend):
    """Derives from a base58 master text held in process memory.

    Args:
        master_key: the base58 text of the seed, as ``PLINGS_MASTER_KEY`` contains it.
        wallets: the wallet versions this master serves; the env tier served wallet 1.

    Raises:
        MasterKeyFormatError: when the text is not base58 of a 16 to 64 byte seed.
    """

    name = "env"

    def __init__(self, master_key: Secret, wallets: Iterable[int] = (1,)) -> None:
        self._seed = decode_master_key(master_key.reveal())
        self._wallets = tuple(sorted(set(wallets)))
        self._fingerprints: dict[int, str] = {}
        self._closed = False

    def __repr__(self) -> str:
        return f"EnvBackend(wallets={self._wallets})"

    def _load_seed(self, wallet: int) -> bytearray:
        if self._closed:
            # close() zeroed the seed buffer, so deriving from it would give wrong keys.
            raise DerivationError("the env backend is closed; open a new one to derive")
        if wallet not in self._wallets:
            raise WalletNotFoundError(
                f"walletVersion {wallet} not found; the env master serves {list(self._wallets)}"
            )
        return bytearray(self._seed)

    def wallets(self) -> list[WalletInfo]:
        infos = []
        for wallet in self._wallets:
            if wallet not in self._fingerprints:
                self._fingerprints[wallet] = self._fingerprint_of(wallet)
            infos.append(
                WalletInfo(
                    wallet,
                    "PLINGS_MASTER_KEY",
                    WalletScheme.SLIP10_ED25519,
                    self._fingerprints[wallet],
                )
            )
        return infos

    def health(self) -> BackendHealth:
        try:
            wallets = self.wallets()
        except PlingsHsmError as exc:
            log.warning("backend_health_failed", backend=self.name, error=type(exc).__name__)
            return BackendHealth(self.name, False, str(exc))
        return BackendHealth(self.name, True, "env master loaded", wallets)

    def close(self) -> None:
        self._closed = True
        self._seed[:] = bytes(len(self._seed))
