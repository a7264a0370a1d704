"""The pkcs11 backend on a real SoftHSM2 token, checked against bip_utils and the env backend."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import base58
import pkcs11.exceptions as p11
import pytest
from conftest import TEST_SEED, TEST_USER_PIN, TokenInfo, make_token
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pkcs11 import Attribute, KeyType, ObjectClass
from slip10_reference import reference_batch, reference_fingerprint, reference_public_key

from plings_hsm.backends import EnvBackend, ImportResult, Pkcs11Backend
from plings_hsm.cli.exit_codes import exit_code_of
from plings_hsm.core import BatchPrefix, IdentifierPath
from plings_hsm.errors import (
    DuplicateObjectError,
    MasterMismatchError,
    MasterObjectNotFoundError,
    WalletNotFoundError,
)
from plings_hsm.secrets import Secret

INDEX_MAX = 2**31 - 1

SEED_16 = bytes(range(1, 17))
SEED_64 = hashlib.sha512(b"plings-hsm test seed of 64 bytes").digest()
SEED_LEADING_ZEROS = bytes(4) + hashlib.sha256(b"leading zeros").digest()[:28]
OTHER_SEED = bytes.fromhex("5a" * 32)

WALLET_SEEDS = {
    1: TEST_SEED,
    16: SEED_16,
    17: SEED_64[:17],
    20: SEED_64[:20],
    33: SEED_64[:33],
    63: SEED_64[:63],
    64: SEED_64,
    4: SEED_LEADING_ZEROS,
    5: bytes(20) + SEED_64[:13],
    INDEX_MAX: TEST_SEED,
}
"""Seed imported under each wallet version, so each seed length has a label of its own.

Lengths that are not a multiple of 8 matter: SoftHSM 2.6 pads a key to a multiple of 8
bytes before wrapping it.
"""

PREFIX = BatchPrefix(1, 1, 1, 1, 99999)


def master_objects(backend: Pkcs11Backend, label: str) -> list[dict[str, Any]]:
    """Read the attributes of every secret key labelled ``label`` straight from python-pkcs11."""

    def read(session: Any) -> list[dict[str, Any]]:
        found = []
        for obj in session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY}):
            if obj.label != label:
                continue
            try:
                obj[Attribute.VALUE]
                value_readable = True
            except p11.AttributeSensitive:
                value_readable = False
            found.append(
                {
                    "key_type": obj[Attribute.KEY_TYPE],
                    "token": obj[Attribute.TOKEN],
                    "private": obj[Attribute.PRIVATE],
                    "sensitive": obj[Attribute.SENSITIVE],
                    "extractable": obj[Attribute.EXTRACTABLE],
                    "modifiable": obj[Attribute.MODIFIABLE],
                    "value_readable": value_readable,
                }
            )
        return found

    return backend.token.call(read)


@pytest.fixture(scope="module")
def backend_token() -> TokenInfo:
    return make_token("bk-test")


@pytest.fixture(scope="module")
def backend(backend_token: TokenInfo) -> Iterator[Pkcs11Backend]:
    opened = Pkcs11Backend(backend_token.module, backend_token.label, Secret(TEST_USER_PIN))
    yield opened
    opened.close()


@pytest.fixture(scope="module")
def first_imports(backend: Pkcs11Backend) -> dict[int, ImportResult]:
    """Import every seed of WALLET_SEEDS once and return the results by wallet."""
    return {wallet: backend.import_master(wallet, seed) for wallet, seed in WALLET_SEEDS.items()}


class TestMasterObject:
    """An imported seed is one protected generic secret whose value cannot be read."""

    def test_first_import_creates(self, first_imports: dict[int, ImportResult]) -> None:
        for wallet, result in first_imports.items():
            assert result.created, wallet
            assert result.label == f"plings_master_v{wallet}"

    def test_one_object_per_label(
        self, backend: Pkcs11Backend, first_imports: dict[int, ImportResult]
    ) -> None:
        assert len(master_objects(backend, "plings_master_v1")) == 1

    def test_attributes(
        self, backend: Pkcs11Backend, first_imports: dict[int, ImportResult]
    ) -> None:
        (master,) = master_objects(backend, "plings_master_v1")
        assert master["key_type"] == KeyType.GENERIC_SECRET
        assert master["token"] is True
        assert master["private"] is True
        assert master["sensitive"] is True
        assert master["extractable"] is True
        assert master["modifiable"] is False

    def test_value_not_readable(
        self, backend: Pkcs11Backend, first_imports: dict[int, ImportResult]
    ) -> None:
        (master,) = master_objects(backend, "plings_master_v1")
        assert master["value_readable"] is False

    def test_backend_reports_attributes(
        self, backend: Pkcs11Backend, first_imports: dict[int, ImportResult]
    ) -> None:
        attributes = backend.object_attributes(1)
        assert attributes == {
            "private": True,
            "sensitive": True,
            "extractable": True,
            "modifiable": False,
        }

    def test_wallet_versions_listed(
        self, backend: Pkcs11Backend, first_imports: dict[int, ImportResult]
    ) -> None:
        assert backend.wallet_versions() == sorted(WALLET_SEEDS)


class TestReimport:
    """Importing the same master again changes nothing, and a different one is rejected."""

    def test_same_master_is_noop(
        self, backend: Pkcs11Backend, first_imports: dict[int, ImportResult]
    ) -> None:
        result = backend.import_master(1, TEST_SEED)
        assert result.created is False
        assert result.fingerprint == first_imports[1].fingerprint
        assert len(master_objects(backend, "plings_master_v1")) == 1

    def test_different_master_rejected(
        self, backend: Pkcs11Backend, first_imports: dict[int, ImportResult]
    ) -> None:
        with pytest.raises(MasterMismatchError) as caught:
            backend.import_master(1, OTHER_SEED)
        assert "plings_master_v1" in str(caught.value)
        assert exit_code_of(caught.value) == 16

    def test_mismatch_keeps_original(
        self, backend: Pkcs11Backend, first_imports: dict[int, ImportResult]
    ) -> None:
        with pytest.raises(MasterMismatchError):
            backend.import_master(1, OTHER_SEED)
        assert backend.wallet_fingerprint(1) == reference_fingerprint(TEST_SEED, 1)
        assert len(master_objects(backend, "plings_master_v1")) == 1
        keys = backend.derive_keys(PREFIX, 1, 2)
        assert [key.public_key for key in keys] == reference_batch(TEST_SEED, PREFIX, 1, 2)

    def test_mismatch_message_has_no_seed(
        self, backend: Pkcs11Backend, first_imports: dict[int, ImportResult]
    ) -> None:
        with pytest.raises(MasterMismatchError) as caught:
            backend.import_master(1, OTHER_SEED)
        message = str(caught.value)
        assert OTHER_SEED.hex() not in message
        assert TEST_SEED.hex() not in message
        assert base58.b58encode(OTHER_SEED).decode("ascii") not in message


class TestDerivation:
    """Token keys equal bip_utils and the env backend for every seed length and edge index."""

    @pytest.mark.parametrize("wallet", sorted(WALLET_SEEDS))
    def test_batch_matches_bip_utils(
        self, backend: Pkcs11Backend, first_imports: dict[int, ImportResult], wallet: int
    ) -> None:
        prefix = BatchPrefix(wallet, 1, 1, 1, 99999)
        keys = backend.derive_keys(prefix, 1, 5)
        assert [key.public_key for key in keys] == reference_batch(
            WALLET_SEEDS[wallet], prefix, 1, 5
        )

    @pytest.mark.parametrize("wallet", sorted(WALLET_SEEDS))
    def test_batch_matches_env_backend(
        self, backend: Pkcs11Backend, first_imports: dict[int, ImportResult], wallet: int
    ) -> None:
        prefix = BatchPrefix(wallet, 7, 3, 12, 4242)
        master_text = base58.b58encode(WALLET_SEEDS[wallet])
        env = EnvBackend(Secret(master_text), wallets=(wallet,))
        try:
            expected = env.derive_keys(prefix, 0, 5)
        finally:
            env.close()
        assert backend.derive_keys(prefix, 0, 5) == expected

    def test_index_max_everywhere(
        self, backend: Pkcs11Backend, first_imports: dict[int, ImportResult]
    ) -> None:
        prefix = BatchPrefix(INDEX_MAX, INDEX_MAX, INDEX_MAX, INDEX_MAX, INDEX_MAX)
        keys = backend.derive_keys(prefix, INDEX_MAX - 1, 2)
        assert [key.path.instance for key in keys] == [INDEX_MAX - 1, INDEX_MAX]
        assert [key.public_key for key in keys] == reference_batch(
            TEST_SEED, prefix, INDEX_MAX - 1, 2
        )

    def test_wire_shape(
        self, backend: Pkcs11Backend, first_imports: dict[int, ImportResult]
    ) -> None:
        (key,) = backend.derive_keys(PREFIX, 1, 1)
        expected_key = reference_public_key(TEST_SEED, (*PREFIX.indexes, 1))
        assert key.to_wire() == {
            "instanceNumber": 1,
            "hdPath": "m/44'/501'/1'/1'/1'/1'/99999'/1'",
            "publicKey": base58.b58encode(expected_key).decode("ascii"),
            "humanReadablePath": "1.1.C1.99999.00001",
        }


class TestFingerprint:
    """The wallet fingerprint is base58(sha256(domain + wallet public key))."""

    @pytest.mark.parametrize("wallet", sorted(WALLET_SEEDS))
    def test_equals_independent(
        self, backend: Pkcs11Backend, first_imports: dict[int, ImportResult], wallet: int
    ) -> None:
        expected = reference_fingerprint(WALLET_SEEDS[wallet], wallet)
        assert first_imports[wallet].fingerprint == expected
        assert backend.wallet_fingerprint(wallet) == expected

    def test_wallets_list_fingerprints(
        self, backend: Pkcs11Backend, first_imports: dict[int, ImportResult]
    ) -> None:
        listed = {info.version: info for info in backend.wallets()}
        assert sorted(listed) == sorted(WALLET_SEEDS)
        for wallet, seed in WALLET_SEEDS.items():
            assert listed[wallet].fingerprint == reference_fingerprint(seed, wallet)
            assert listed[wallet].label == f"plings_master_v{wallet}"
            assert listed[wallet].scheme == "slip10-ed25519"

    def test_health_lists_wallets(
        self, backend: Pkcs11Backend, first_imports: dict[int, ImportResult]
    ) -> None:
        health = backend.health()
        assert health.ok is True
        assert health.backend == "pkcs11"
        assert {info.version for info in health.wallets} == set(WALLET_SEEDS)


class TestSign:
    """Signatures made from token masters verify under the bip_utils public key."""

    def test_signature_verifies(
        self, backend: Pkcs11Backend, first_imports: dict[int, ImportResult]
    ) -> None:
        path = IdentifierPath(1, 1, 1, 1, 99999, 7)
        message = b"plings identifier challenge"
        signature = backend.sign(path, message)
        expected_key = reference_public_key(TEST_SEED, path.indexes)
        assert signature.public_key == expected_key
        assert len(signature.signature) == 64
        Ed25519PublicKey.from_public_bytes(expected_key).verify(signature.signature, message)

    def test_other_message_fails(
        self, backend: Pkcs11Backend, first_imports: dict[int, ImportResult]
    ) -> None:
        path = IdentifierPath(1, 1, 1, 1, 99999, 7)
        signature = backend.sign(path, b"original")
        public = Ed25519PublicKey.from_public_bytes(signature.public_key)
        with pytest.raises(InvalidSignature):
            public.verify(signature.signature, b"tampered")

    def test_equals_env_signature(
        self, backend: Pkcs11Backend, first_imports: dict[int, ImportResult]
    ) -> None:
        path = IdentifierPath(64, 2, 3, 4, 5, 6)
        env = EnvBackend(Secret(base58.b58encode(SEED_64)), wallets=(64,))
        try:
            expected = env.sign(path, b"same message")
        finally:
            env.close()
        # Ed25519 (RFC 8032) is deterministic, so both sources give identical signatures.
        assert backend.sign(path, b"same message") == expected


class TestMissingWallet:
    """A wallet without a master object is reported as not found."""

    def test_derive_raises(
        self, backend: Pkcs11Backend, first_imports: dict[int, ImportResult]
    ) -> None:
        with pytest.raises(WalletNotFoundError) as caught:
            backend.derive_keys(BatchPrefix(999, 1, 1, 1, 1), 1, 1)
        assert "999" in str(caught.value)
        assert exit_code_of(caught.value) == 6

    def test_fingerprint_raises(
        self, backend: Pkcs11Backend, first_imports: dict[int, ImportResult]
    ) -> None:
        with pytest.raises(WalletNotFoundError):
            backend.wallet_fingerprint(999)

    def test_object_attributes_raise(
        self, backend: Pkcs11Backend, first_imports: dict[int, ImportResult]
    ) -> None:
        with pytest.raises(MasterObjectNotFoundError) as caught:
            backend.object_attributes(999)
        assert "plings_master_v999" in str(caught.value)
        assert exit_code_of(caught.value) == 14


@pytest.fixture(scope="module")
def duplicate_backend() -> Iterator[Pkcs11Backend]:
    """A backend on its own token whose wallet 1 label is on two objects."""
    info = make_token("bk-dup")
    opened = Pkcs11Backend(info.module, info.label, Secret(TEST_USER_PIN))
    opened.import_master(1, TEST_SEED)

    def create_second(session: Any) -> None:
        session.create_object(
            {
                Attribute.CLASS: ObjectClass.SECRET_KEY,
                Attribute.KEY_TYPE: KeyType.GENERIC_SECRET,
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: True,
                Attribute.LABEL: "plings_master_v1",
                Attribute.VALUE: OTHER_SEED,
            }
        )

    if len(master_objects(opened, "plings_master_v1")) == 1:
        opened.token.call(create_second)
    yield opened
    opened.close()


class TestDuplicateLabel:
    """Two objects under one wallet label stop derivation instead of picking one."""

    def test_derive_raises(self, duplicate_backend: Pkcs11Backend) -> None:
        with pytest.raises(DuplicateObjectError) as caught:
            duplicate_backend.derive_keys(PREFIX, 1, 1)
        assert "plings_master_v1" in str(caught.value)
        assert exit_code_of(caught.value) == 15

    def test_sign_raises(self, duplicate_backend: Pkcs11Backend) -> None:
        with pytest.raises(DuplicateObjectError):
            duplicate_backend.sign(IdentifierPath(1, 1, 1, 1, 1, 1), b"message")

    def test_import_raises(self, duplicate_backend: Pkcs11Backend) -> None:
        with pytest.raises(DuplicateObjectError) as caught:
            duplicate_backend.import_master(1, TEST_SEED)
        assert "plings_master_v1" in str(caught.value)

    def test_health_fails(self, duplicate_backend: Pkcs11Backend) -> None:
        health = duplicate_backend.health()
        assert health.ok is False
        assert "plings_master_v1" in health.detail


class TestThreads:
    """Several Python threads sharing one backend all get correct keys."""

    def test_concurrent_derivation(
        self, backend: Pkcs11Backend, first_imports: dict[int, ImportResult]
    ) -> None:
        thread_count = 6
        rounds = 5
        expected = reference_batch(TEST_SEED, PREFIX, 1, 20)
        results: list[list[bytes]] = []
        errors: list[BaseException] = []
        lock = threading.Lock()
        barrier = threading.Barrier(thread_count)

        def work() -> None:
            try:
                barrier.wait(timeout=10)
                for _ in range(rounds):
                    keys = [key.public_key for key in backend.derive_keys(PREFIX, 1, 20)]
                    with lock:
                        results.append(keys)
            except BaseException as exc:  # reported to the main thread, which asserts on it
                with lock:
                    errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(thread_count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)

        assert errors == []
        assert not any(thread.is_alive() for thread in threads)
        assert len(results) == thread_count * rounds
        assert all(keys == expected for keys in results)

    def test_concurrent_mixed_calls(
        self, backend: Pkcs11Backend, first_imports: dict[int, ImportResult]
    ) -> None:
        errors: list[BaseException] = []
        lock = threading.Lock()
        path = IdentifierPath(16, 1, 1, 1, 1, 1)

        def derive() -> None:
            backend.derive_keys(BatchPrefix(64, 1, 1, 1, 1), 1, 10)

        def sign() -> None:
            backend.sign(path, b"message")

        def list_wallets() -> None:
            backend.wallet_versions()

        def attributes() -> None:
            backend.object_attributes(4)

        def run(task: Any) -> None:
            try:
                for _ in range(10):
                    task()
            except BaseException as exc:  # reported to the main thread, which asserts on it
                with lock:
                    errors.append(exc)

        tasks = [derive, sign, list_wallets, attributes, derive, sign]
        threads = [threading.Thread(target=run, args=(task,)) for task in tasks]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)

        assert errors == []
        assert not any(thread.is_alive() for thread in threads)


@pytest.fixture(scope="module")
def unsupported_backend() -> Iterator[Pkcs11Backend]:
    """A backend whose token has wallet 1 and a non-extractable object labelled as wallet 9."""
    info = make_token("bk-hmac")
    opened = Pkcs11Backend(info.module, info.label, Secret(TEST_USER_PIN))
    opened.import_master(1, TEST_SEED)

    def create_unextractable(session: Any) -> None:
        session.create_object(
            {
                Attribute.CLASS: ObjectClass.SECRET_KEY,
                Attribute.KEY_TYPE: KeyType.GENERIC_SECRET,
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.LABEL: "plings_master_v9",
                Attribute.VALUE: bytes(range(64)),
            }
        )

    if not master_objects(opened, "plings_master_v9"):
        opened.token.call(create_unextractable)
    yield opened
    opened.close()


class TestUnsupportedMaster:
    """A master this version cannot derive from is left out instead of failing the health check."""

    def test_health_ok(self, unsupported_backend: Pkcs11Backend) -> None:
        health = unsupported_backend.health()
        assert health.ok is True
        assert [info.version for info in health.wallets] == [1]

    def test_other_wallet_listed(self, unsupported_backend: Pkcs11Backend) -> None:
        (info,) = unsupported_backend.wallets()
        assert info.fingerprint == reference_fingerprint(TEST_SEED, 1)

    def test_derive_not_implemented(self, unsupported_backend: Pkcs11Backend) -> None:
        with pytest.raises(NotImplementedError) as caught:
            unsupported_backend.derive_keys(BatchPrefix(9, 1, 1, 1, 1), 1, 1)
        assert "hsm-hmac-sha512" in str(caught.value)

    def test_other_wallet_derives(self, unsupported_backend: Pkcs11Backend) -> None:
        keys = unsupported_backend.derive_keys(PREFIX, 1, 2)
        assert [key.public_key for key in keys] == reference_batch(TEST_SEED, PREFIX, 1, 2)


# Replaces the wallet 1 master of a token with another seed, as a restore of a different
# backup would; runs in a child process so this process's session sees a foreign change.
REPLACE_MASTER = """
import sys
from pkcs11 import Attribute, KeyType, ObjectClass, lib

module, label, pin, seed_hex = sys.argv[1:]
token = lib(module).get_token(token_label=label)
with token.open(rw=True, user_pin=pin) as session:
    for obj in session.get_objects({Attribute.LABEL: "plings_master_v1"}):
        obj.destroy()
    session.create_object(
        {
            Attribute.CLASS: ObjectClass.SECRET_KEY,
            Attribute.KEY_TYPE: KeyType.GENERIC_SECRET,
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: True,
            Attribute.MODIFIABLE: False,
            Attribute.LABEL: "plings_master_v1",
            Attribute.VALUE: bytes.fromhex(seed_hex),
        }
    )
"""


class TestReplacedMaster:
    """After another process replaces a master, fingerprints follow the token, not a cache."""

    def test_fingerprint_follows_token(self) -> None:
        info = make_token("bk-replace")
        backend = Pkcs11Backend(info.module, info.label, Secret(TEST_USER_PIN))
        try:
            backend.import_master(1, TEST_SEED)
            before = backend.wallet_fingerprint(1)
            subprocess.run(
                [
                    sys.executable,
                    "-c",
                    REPLACE_MASTER,
                    str(info.module),
                    info.label,
                    TEST_USER_PIN,
                    OTHER_SEED.hex(),
                ],
                check=True,
                timeout=60,
                capture_output=True,
            )
            keys = backend.derive_keys(PREFIX, 1, 1)
            after = backend.wallet_fingerprint(1)
            health = backend.health()
        finally:
            backend.close()
        assert before == reference_fingerprint(TEST_SEED, 1)
        assert [key.public_key for key in keys] == reference_batch(OTHER_SEED, PREFIX, 1, 1)
        assert after == reference_fingerprint(OTHER_SEED, 1)
        assert health.wallets[0].fingerprint == reference_fingerprint(OTHER_SEED, 1)
