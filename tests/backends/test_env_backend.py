"""The env backend: keys and fingerprints from PLINGS_MASTER_KEY, checked against bip_utils."""

from __future__ import annotations

from collections.abc import Iterator

import base58
import pytest
from conftest import TEST_MASTER_KEY, TEST_SEED
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from slip10_reference import reference_fingerprint, reference_public_key

from plings_hsm.backends import EnvBackend
from plings_hsm.core import BatchPrefix, IdentifierPath
from plings_hsm.errors import DerivationError, MasterKeyFormatError, WalletNotFoundError
from plings_hsm.secrets import Secret

INDEX_MAX = 2**31 - 1
PREFIX = BatchPrefix(1, 1, 1, 1, 99999)


@pytest.fixture
def env_backend() -> Iterator[EnvBackend]:
    backend = EnvBackend(Secret(TEST_MASTER_KEY), wallets=(1, 2))
    yield backend
    backend.close()


class TestDerivation:
    """Env keys equal bip_utils for every seed length and for edge indexes."""

    @pytest.mark.parametrize(
        "seed",
        [
            bytes(range(16)),
            TEST_SEED,
            bytes(range(64)),
            bytes(3) + bytes(range(50, 79)),
        ],
        ids=["16-bytes", "32-bytes", "64-bytes", "leading-zeros"],
    )
    def test_matches_bip_utils(self, seed: bytes) -> None:
        backend = EnvBackend(Secret(base58.b58encode(seed)))
        try:
            keys = backend.derive_keys(PREFIX, 1, 4)
        finally:
            backend.close()
        expected = [reference_public_key(seed, (*PREFIX.indexes, i)) for i in range(1, 5)]
        assert [key.public_key for key in keys] == expected

    def test_index_max(self, env_backend: EnvBackend) -> None:
        prefix = BatchPrefix(2, INDEX_MAX, INDEX_MAX, INDEX_MAX, INDEX_MAX)
        (key,) = env_backend.derive_keys(prefix, INDEX_MAX, 1)
        assert key.public_key == reference_public_key(TEST_SEED, (*prefix.indexes, INDEX_MAX))

    def test_second_wallet(self, env_backend: EnvBackend) -> None:
        prefix = BatchPrefix(2, 1, 1, 1, 99999)
        (key,) = env_backend.derive_keys(prefix, 1, 1)
        assert key.path.hd_path == "m/44'/501'/2'/1'/1'/1'/99999'/1'"
        assert key.public_key == reference_public_key(TEST_SEED, (*prefix.indexes, 1))

    def test_streams_lazily(self, env_backend: EnvBackend) -> None:
        keys = env_backend.iter_keys(PREFIX, 0, INDEX_MAX)
        first = next(keys)
        assert first.path.instance == 0
        assert first.public_key == reference_public_key(TEST_SEED, (*PREFIX.indexes, 0))


class TestFingerprint:
    """The fingerprint of each served wallet equals the independent one."""

    @pytest.mark.parametrize("wallet", [1, 2])
    def test_equals_independent(self, env_backend: EnvBackend, wallet: int) -> None:
        assert env_backend.wallet_fingerprint(wallet) == reference_fingerprint(TEST_SEED, wallet)

    def test_wallets_listed(self, env_backend: EnvBackend) -> None:
        infos = env_backend.wallets()
        assert [info.version for info in infos] == [1, 2]
        assert all(info.label == "PLINGS_MASTER_KEY" for info in infos)
        assert all(info.scheme == "slip10-ed25519" for info in infos)

    def test_health(self, env_backend: EnvBackend) -> None:
        health = env_backend.health()
        assert health.ok is True
        assert health.backend == "env"
        assert TEST_MASTER_KEY not in health.detail


class TestSign:
    """Env signatures verify under the bip_utils public key."""

    def test_signature_verifies(self, env_backend: EnvBackend) -> None:
        path = IdentifierPath(1, 1, 1, 1, 99999, 3)
        signature = env_backend.sign(path, b"challenge")
        expected_key = reference_public_key(TEST_SEED, path.indexes)
        assert signature.public_key == expected_key
        Ed25519PublicKey.from_public_bytes(expected_key).verify(signature.signature, b"challenge")


class TestRejections:
    """Unserved wallets, malformed masters and a closed backend are errors, not wrong keys."""

    def test_unserved_wallet(self, env_backend: EnvBackend) -> None:
        with pytest.raises(WalletNotFoundError) as caught:
            env_backend.derive_keys(BatchPrefix(3, 1, 1, 1, 1), 1, 1)
        assert "3" in str(caught.value)

    def test_unserved_wallet_fingerprint(self, env_backend: EnvBackend) -> None:
        with pytest.raises(WalletNotFoundError):
            env_backend.wallet_fingerprint(3)

    @pytest.mark.parametrize(
        "text",
        [
            "0OIl" + TEST_MASTER_KEY[4:],
            TEST_MASTER_KEY[:10] + " " + TEST_MASTER_KEY[10:],
            base58.b58encode(bytes(range(1, 16))).decode("ascii"),
            base58.b58encode(bytes(range(1, 66))).decode("ascii"),
            "",
        ],
        ids=["bad-alphabet", "inner-space", "15-bytes", "65-bytes", "empty"],
    )
    def test_malformed_master(self, text: str) -> None:
        with pytest.raises(MasterKeyFormatError) as caught:
            EnvBackend(Secret(text))
        message = str(caught.value)
        assert "PLINGS_MASTER_KEY" in message
        if text:
            assert text not in message
            assert text[:8] not in message

    def test_repr_hides_master(self, env_backend: EnvBackend) -> None:
        text = repr(env_backend)
        assert TEST_MASTER_KEY not in text
        assert TEST_SEED.hex() not in text

    def test_closed_backend_rejects(self) -> None:
        backend = EnvBackend(Secret(TEST_MASTER_KEY))
        backend.close()
        with pytest.raises(DerivationError):
            backend.derive_keys(PREFIX, 1, 1)

    def test_closed_backend_no_fingerprint(self) -> None:
        backend = EnvBackend(Secret(TEST_MASTER_KEY))
        backend.close()
        with pytest.raises(DerivationError):
            backend.wallet_fingerprint(1)
