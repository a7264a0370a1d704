"""Batch derivation and wallet fingerprints checked against bip_utils' SLIP-0010 ed25519."""

from __future__ import annotations

import hashlib

import base58
import pytest
from bip_utils import Bip32Slip10Ed25519
from hypothesis import given, settings
from hypothesis import strategies as st

from plings_hsm.core.batch import derive_wallet_fingerprint, open_batch_node
from plings_hsm.core.path import BatchPrefix
from plings_hsm.core.slip10 import derive_indexes, public_key

INDEX_MAX = 2**31 - 1
PURPOSE = 44
COIN_TYPE = 501


def reference_public_key(seed: bytes, indexes: list[int]) -> bytes:
    """Return the 32-byte public key bip_utils derives at m/i1'/i2'/... for a seed."""
    path = "m" + "".join(f"/{index}'" for index in indexes)
    node = Bip32Slip10Ed25519.FromSeed(seed).DerivePath(path)
    compressed = node.PublicKey().RawCompressed().ToBytes()
    # bip_utils prefixes ed25519 public keys with a 00 byte, like the SLIP-0010 vectors.
    assert compressed[:1] == b"\x00"
    return compressed[1:]


def reference_fingerprint(seed: bytes, wallet: int) -> str:
    """Return base58 of SHA-256 over the fingerprint domain and the bip_utils wallet key."""
    wallet_key = reference_public_key(seed, [PURPOSE, COIN_TYPE, wallet])
    digest = hashlib.sha256(b"plings-hsm fingerprint v1" + wallet_key).digest()
    return base58.b58encode(digest).decode("ascii")


def plings_public_key(seed: bytes, levels: list[int]) -> bytes:
    """Derive the public key with plings_hsm for the levels wallet to instance under m/44'/501'."""
    wallet, manufacturer, category, class_id, batch, instance = levels
    prefix = BatchPrefix(wallet, manufacturer, category, class_id, batch)
    with open_batch_node(seed, prefix) as node:
        return node.derive(instance).public_key


def seed_strategy() -> st.SearchStrategy[bytes]:
    """Return seeds of 16 to 64 bytes, some of them starting with zero bytes."""
    random_seed = st.binary(min_size=16, max_size=64)
    leading_zeros = st.integers(min_value=1, max_value=16).flatmap(
        lambda zeros: st.binary(min_size=max(0, 16 - zeros), max_size=64 - zeros).map(
            lambda rest: bytes(zeros) + rest
        )
    )
    return st.one_of(random_seed, leading_zeros)


INDEXES = st.integers(min_value=0, max_value=INDEX_MAX)
LEVELS = st.lists(INDEXES, min_size=6, max_size=6)


class TestPropertyAgainstBipUtils:
    """Our batch derivation equals bip_utils for random seeds and paths."""

    @settings(max_examples=200, deadline=None)
    @given(seed=seed_strategy(), levels=LEVELS)
    def test_public_key_matches(self, seed: bytes, levels: list[int]) -> None:
        expected = reference_public_key(seed, [PURPOSE, COIN_TYPE, *levels])
        assert plings_public_key(seed, levels) == expected

    @settings(max_examples=200, deadline=None)
    @given(seed=seed_strategy(), levels=st.lists(INDEXES, min_size=8, max_size=8))
    def test_any_eight_level_path_matches(self, seed: bytes, levels: list[int]) -> None:
        # Purpose and coin type are random here too, so this goes through derive_indexes.
        with derive_indexes(seed, levels) as node:
            ours = public_key(node.private_key)
        assert ours == reference_public_key(seed, levels)

    @settings(max_examples=50, deadline=None)
    @given(seed=seed_strategy(), wallet=INDEXES)
    def test_fingerprint_matches(self, seed: bytes, wallet: int) -> None:
        assert derive_wallet_fingerprint(seed, wallet) == reference_fingerprint(seed, wallet)


SEEDS = {
    "16 bytes": bytes(range(1, 17)),
    "32 bytes": bytes(range(101, 133)),
    "64 bytes": bytes(range(200, 256)) + bytes(range(8)),
    "leading zeros": bytes(4) + bytes(range(1, 29)),
    "all zeros": bytes(16),
}


class TestExplicitCases:
    """Our batch derivation equals bip_utils on chosen edge cases."""

    @pytest.mark.parametrize("seed", list(SEEDS.values()), ids=list(SEEDS))
    def test_seed_length_matches(self, seed: bytes) -> None:
        levels = [1, 1, 1, 1, 99999, 1]
        assert plings_public_key(seed, levels) == reference_public_key(
            seed, [PURPOSE, COIN_TYPE, *levels]
        )

    @pytest.mark.parametrize("seed", list(SEEDS.values()), ids=list(SEEDS))
    def test_index_max_everywhere_matches(self, seed: bytes) -> None:
        levels = [INDEX_MAX] * 6
        assert plings_public_key(seed, levels) == reference_public_key(
            seed, [PURPOSE, COIN_TYPE, *levels]
        )

    @pytest.mark.parametrize("level", range(6))
    def test_index_max_at_one_level_matches(self, level: int) -> None:
        seed = SEEDS["32 bytes"]
        levels = [3, 7, 2, 5, 11, 13]
        levels[level] = INDEX_MAX
        assert plings_public_key(seed, levels) == reference_public_key(
            seed, [PURPOSE, COIN_TYPE, *levels]
        )

    def test_index_max_on_all_eight_levels_matches(self) -> None:
        seed = SEEDS["16 bytes"]
        with derive_indexes(seed, [INDEX_MAX] * 8) as node:
            ours = public_key(node.private_key)
        assert ours == reference_public_key(seed, [INDEX_MAX] * 8)

    def test_iter_keys_matches(self) -> None:
        seed = SEEDS["32 bytes"]
        prefix = BatchPrefix(1, 2, 3, 4, 5)
        with open_batch_node(seed, prefix) as node:
            keys = list(node.iter_keys(INDEX_MAX - 2, 3))
        instances = [key.path.instance for key in keys]
        assert instances == [INDEX_MAX - 2, INDEX_MAX - 1, INDEX_MAX]
        for key in keys:
            expected = reference_public_key(seed, list(key.path.indexes))
            assert key.public_key == expected

    def test_base58_key_is_solana_address(self) -> None:
        seed = SEEDS["32 bytes"]
        with open_batch_node(seed, BatchPrefix(1, 1, 1, 1, 1)) as node:
            key = node.derive(1)
        expected = reference_public_key(seed, [PURPOSE, COIN_TYPE, 1, 1, 1, 1, 1, 1])
        assert key.public_key_base58 == base58.b58encode(expected).decode("ascii")


class TestWalletFingerprint:
    """The wallet fingerprint is base58 of SHA-256 over the domain and the wallet key."""

    @pytest.mark.parametrize("seed", list(SEEDS.values()), ids=list(SEEDS))
    @pytest.mark.parametrize("wallet", [0, 1, 2, INDEX_MAX])
    def test_matches_reference(self, seed: bytes, wallet: int) -> None:
        assert derive_wallet_fingerprint(seed, wallet) == reference_fingerprint(seed, wallet)

    def test_differs_between_wallets(self) -> None:
        seed = SEEDS["32 bytes"]
        assert derive_wallet_fingerprint(seed, 1) != derive_wallet_fingerprint(seed, 2)

    def test_is_not_the_wallet_public_key(self) -> None:
        seed = SEEDS["32 bytes"]
        wallet_key = reference_public_key(seed, [PURPOSE, COIN_TYPE, 1])
        wallet_address = base58.b58encode(wallet_key).decode("ascii")
        assert derive_wallet_fingerprint(seed, 1) != wallet_address
