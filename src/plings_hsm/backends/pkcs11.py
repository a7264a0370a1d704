"""The pkcs11 backend: wallet masters held in a PKCS#11 token, used through python-pkcs11.

A ``slip10-ed25519`` master is a generic secret object labelled ``plings_master_v{N}``:
private, sensitive (its value cannot be read as an attribute), extractable and not
modifiable. PKCS#11 has no SLIP-0010 mechanism, so for each request the backend
generates a session-only AES key in the token, wraps the seed with it
(``CKM_AES_KEY_WRAP_PAD``, RFC 5649), unwraps it in memory, derives the batch node and
overwrites the seed. This protects the seed at rest and from attribute reads; it does
not protect it from a holder of the user PIN.
"""

from __future__ import annotations

import fcntl
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pkcs11.exceptions as p11
import structlog
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap_with_padding
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

from plings_hsm.backends.base import BackendHealth, SeedBackend, WalletInfo
from plings_hsm.backends.token import TokenSession
from plings_hsm.core.batch import WalletScheme, derive_wallet_fingerprint
from plings_hsm.core.path import check_index
from plings_hsm.core.seed import check_seed
from plings_hsm.errors import (
    DuplicateObjectError,
    MasterMismatchError,
    MasterObjectNotFoundError,
    PlingsHsmError,
    TokenUnavailableError,
    WalletNotFoundError,
)
from plings_hsm.secrets import Secret

__all__ = ["MASTER_LABEL_PREFIX", "ImportResult", "Pkcs11Backend", "master_label"]

log = structlog.get_logger(__name__)

MASTER_LABEL_PREFIX = "plings_master_v"
"""Label prefix of wallet master objects; the wallet version follows it."""

_LABEL_RE = re.compile(r"^plings_master_v(0|[1-9][0-9]*)$")

WRAP_KEY_BITS = 256
"""Size of the session-only AES key that wraps the seed for one request."""

IMPORT_LOCK_NAME = "plings-hsm-import.lock"
"""File in the temporary folder that serialises master imports on one host."""

REQUIRED_MECHANISMS = (
    Mechanism.AES_KEY_GEN,
    Mechanism.AES_KEY_WRAP_PAD,
)
"""Mechanisms a token must offer for ``slip10-ed25519`` wallets."""


def master_label(wallet: int) -> str:
    """Return the token label of a wallet's master object, ``plings_master_v{wallet}``."""
    return f"{MASTER_LABEL_PREFIX}{check_index('walletVersion', wallet)}"


class ImportResult:
    """Outcome of :meth:`Pkcs11Backend.import_master`: created or already present."""

    __slots__ = ("created", "fingerprint", "label")

    def __init__(self, created: bool, label: str, fingerprint: str) -> None:
        self.created = created
        self.label = label
        self.fingerprint = fingerprint


def _find_masters(session: Any, label: str) -> list[Any]:
    return list(
        session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: label})
    )


def _find_one_master(session: Any, wallet: int) -> Any:
    label = master_label(wallet)
    found = _find_masters(session, label)
    if not found:
        raise MasterObjectNotFoundError(
            f"token has no object labelled {label!r}; import wallet {wallet} with "
            f"'plings-hsm keys import --wallet {wallet}'"
        )
    if len(found) > 1:
        raise DuplicateObjectError(
            f"token has {len(found)} objects labelled {label!r}; exactly one is allowed. "
            "Delete the extra objects with a PKCS#11 tool after checking their fingerprints"
        )
    return found[0]


def _unwrap_seed(session: Any, master: Any) -> bytearray:
    """Copy the master's value into memory through a session-only AES key wrap.

    SoftHSM 2.6 zero-pads a key to a multiple of 8 bytes before ``CKM_AES_KEY_WRAP_PAD``,
    so a 17-byte seed unwraps to 24 bytes. The object's ``CKA_VALUE_LEN`` (readable on
    a sensitive key) gives the true length, and the padding must be zeros.
    """
    value_len = int(master[Attribute.VALUE_LEN])
    wrap_key = session.generate_key(
        KeyType.AES,
        WRAP_KEY_BITS,
        store=False,
        template={
            Attribute.SENSITIVE: False,
            Attribute.EXTRACTABLE: True,
            Attribute.WRAP: True,
            Attribute.UNWRAP: False,
            Attribute.ENCRYPT: False,
            Attribute.DECRYPT: False,
        },
    )
    try:
        # NOTE: the key bytes arrive as an immutable bytes object that cannot be
        # overwritten; the key is session-only and destroyed below.
        key_bytes = wrap_key[Attribute.VALUE]
        wrapped = wrap_key.wrap_key(master, mechanism=Mechanism.AES_KEY_WRAP_PAD)
    finally:
        wrap_key.destroy()
    try:
        seed = bytearray(aes_key_unwrap_with_padding(key_bytes, wrapped))
    except InvalidUnwrap as exc:
        raise TokenUnavailableError("token returned a wrapped seed that does not unwrap") from exc

    padding = seed[value_len:]
    padding_ok = len(seed) >= value_len and not any(padding)
    del seed[value_len:]
    if not padding_ok:
        seed[:] = bytes(len(seed))
        raise TokenUnavailableError(
            f"token returned {len(seed) + len(padding)} bytes for a {value_len}-byte master"
        )
    return seed


@contextmanager
def _import_lock() -> Iterator[None]:
    """Serialise imports on this host, so two imports cannot both pass the label check.

    Imports from other hosts are caught by the duplicate check after creation.
    """
    path = Path(tempfile.gettempdir()) / IMPORT_LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _scheme_of(master: Any) -> WalletScheme:
    # A slip10 seed must be extractable to be wrapped; an HMAC master never is.
    return (
        WalletScheme.SLIP10_ED25519
        if master[Attribute.EXTRACTABLE]
        else (WalletScheme.HSM_HMAC_SHA512)
    )


class Pkcs11Backend(SeedBackend):
    """Derives from wallet masters held in a PKCS#11 token.

    Args:
        module: path of the PKCS#11 module.
        token_label: label of the token.
        user_pin: the token's user PIN.
    """

    name = "pkcs11"

    def __init__(self, module: Path, token_label: str, user_pin: Secret) -> None:
        self.token = TokenSession.acquire(module, token_label, user_pin)

    def __repr__(self) -> str:
        return f"Pkcs11Backend(token_label={self.token.token_label!r})"

    def _load_seed(self, wallet: int) -> bytearray:
        def load(session: Any) -> bytearray:
            try:
                master = _find_one_master(session, wallet)
            except MasterObjectNotFoundError as exc:
                raise WalletNotFoundError(
                    f"walletVersion {wallet} not found in token {self.token.token_label!r}"
                ) from exc
            if _scheme_of(master) is not WalletScheme.SLIP10_ED25519:
                raise NotImplementedError(
                    f"walletVersion {wallet} uses {WalletScheme.HSM_HMAC_SHA512}, "
                    "which this version cannot derive"
                )
            return _unwrap_seed(session, master)

        return self.token.call(load)

    def wallet_versions(self) -> list[int]:
        """List the wallet versions that have a master object in the token."""

        def scan(session: Any) -> list[int]:
            versions = []
            for obj in session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY}):
                match = _LABEL_RE.match(obj.label or "")
                if match:
                    versions.append(int(match.group(1)))
            return sorted(set(versions))

        return self.token.call(scan)

    def wallets(self) -> list[WalletInfo]:
        # Fingerprints are read from the token on every call (about 0.5 ms a wallet with
        # SoftHSM 2.6), because another process may replace a master at any time.
        infos = []
        for wallet in self.wallet_versions():
            try:
                fingerprint = self._fingerprint_of(wallet)
            except NotImplementedError:
                # A master this version cannot derive from (not extractable) must not
                # hide the other wallets or make the health check raise.
                log.warning(
                    "wallet_skipped",
                    token_label=self.token.token_label,
                    wallet=wallet,
                    reason="scheme_not_supported",
                )
                continue
            infos.append(
                WalletInfo(wallet, master_label(wallet), WalletScheme.SLIP10_ED25519, fingerprint)
            )
        return infos

    def fingerprint_of(self, wallet: int) -> str:
        """Return one wallet's fingerprint, unaffected by faults of other wallets.

        Raises:
            WalletNotFoundError: when the token has no object for the wallet.
            DuplicateObjectError: when the wallet label is on more than one object.
        """
        return self._fingerprint_of(wallet)

    def health(self) -> BackendHealth:
        try:
            wallets = self.wallets()
        except PlingsHsmError as exc:
            log.warning("backend_health_failed", backend=self.name, error=type(exc).__name__)
            return BackendHealth(self.name, False, str(exc))
        return BackendHealth(
            self.name, True, f"token {self.token.token_label!r} reachable", wallets
        )

    def import_master(self, wallet: int, seed: bytes | bytearray) -> ImportResult:
        """Store ``seed`` as the master of ``wallet``, then prove it by fingerprint.

        Re-importing the same master is a no-op. After creating the object, the
        fingerprint read back from the token must equal the source's, or the object is
        destroyed and the import fails.

        Raises:
            MasterMismatchError: when the label is on a different master, or the read-back
                fingerprint differs.
            DuplicateObjectError: when the label is on more than one object.
        """
        check_seed(seed, field="master seed")
        with _import_lock():
            return self._import_locked(wallet, seed)

    def _import_locked(self, wallet: int, seed: bytes | bytearray) -> ImportResult:
        label = master_label(wallet)
        expected = derive_wallet_fingerprint(seed, wallet)

        def existing(session: Any) -> bool:
            found = _find_masters(session, label)
            if len(found) > 1:
                raise DuplicateObjectError(
                    f"token has {len(found)} objects labelled {label!r}; exactly one is allowed"
                )
            return bool(found)

        if self.token.call(existing):
            present = self._fingerprint_of(wallet)
            if present != expected:
                raise MasterMismatchError(
                    f"token already contains a different master under {label!r} "
                    f"(fingerprint {present}); refusing to replace it"
                )
            log.info("master_import_skipped", token_label=self.token.token_label, label=label)
            return ImportResult(False, label, present)

        def create(session: Any) -> None:
            created = session.create_object(
                {
                    Attribute.CLASS: ObjectClass.SECRET_KEY,
                    Attribute.KEY_TYPE: KeyType.GENERIC_SECRET,
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: True,
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: True,
                    Attribute.MODIFIABLE: False,
                    Attribute.SIGN: False,
                    Attribute.VERIFY: False,
                    Attribute.LABEL: label,
                    Attribute.ID: label.encode("ascii"),
                    Attribute.VALUE: bytes(seed),
                }
            )
            # Another process may have created the label between the check and now:
            # keep no duplicate behind, and let the caller retry.
            if len(_find_masters(session, label)) > 1:
                created.destroy()
                raise DuplicateObjectError(
                    f"another import created {label!r} at the same time; "
                    "this import was undone, run it again"
                )

        self.token.call(create)
        read_back = self._fingerprint_of(wallet)
        if read_back != expected:
            self.token.call(lambda session: _find_one_master(session, wallet).destroy())
            raise MasterMismatchError(
                f"fingerprint read back from {label!r} differs from the source; "
                "the object was deleted"
            )
        log.info(
            "master_imported",
            token_label=self.token.token_label,
            label=label,
            fingerprint=read_back,
        )
        return ImportResult(True, label, read_back)

    def check_mechanisms(self) -> list[str]:
        """Return the names of required mechanisms the token lacks."""

        def check(session: Any) -> list[str]:
            offered = set(session.token.slot.get_mechanisms())
            return [mechanism.name for mechanism in REQUIRED_MECHANISMS if mechanism not in offered]

        return self.token.call(check)

    def object_attributes(self, wallet: int) -> dict[str, bool]:
        """Return the protection attributes of a wallet's master object."""

        def read(session: Any) -> dict[str, bool]:
            master = _find_one_master(session, wallet)
            names = {
                "private": Attribute.PRIVATE,
                "sensitive": Attribute.SENSITIVE,
                "extractable": Attribute.EXTRACTABLE,
                "modifiable": Attribute.MODIFIABLE,
            }
            result = {}
            for name, attribute in names.items():
                try:
                    result[name] = bool(master[attribute])
                except p11.AttributeTypeInvalid:
                    result[name] = False
            return result

        return self.token.call(read)

    def close(self) -> None:
        self.token.close()
