"""SLIP-0010 ed25519 derivation checked against the published test vectors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from plings_hsm.core.path import INDEX_MAX
from plings_hsm.core.slip10 import derive_child, derive_indexes, master_key, public_key
from plings_hsm.errors import InvalidPathError, MasterKeyFormatError

VECTORS_FILE = Path(__file__).parent / "data" / "slip10_ed25519_vectors.json"


def load_chains() -> list[tuple[str, bytes, dict[str, Any]]]:
    """Return (test id, seed, chain entry) for every chain level of every vector."""
    document = json.loads(VECTORS_FILE.read_text(encoding="utf-8"))
    cases = []
    for vector in document["vectors"]:
        seed = bytes.fromhex(vector["seed"])
        for chain in vector["chains"]:
            cases.append((f"{vector['name']} {chain['path']}", seed, chain))
    return cases


CHAINS = load_chains()
CHAIN_IDS = [case_id for case_id, _, _ in CHAINS]


class TestVectorFile:
    """The vector file contains both published ed25519 vectors with all their levels."""

    def test_has_twelve_chain_levels(self) -> None:
        assert len(CHAINS) == 12

    def test_names_its_source(self) -> None:
        document = json.loads(VECTORS_FILE.read_text(encoding="utf-8"))
        assert document["source"]["repository"] == "satoshilabs/slips"
        assert document["source"]["path"] == "slip-0010.md"


class TestPublishedVectors:
    """Every chain level of the published vectors derives to the published values."""

    @pytest.mark.parametrize(("case_id", "seed", "chain"), CHAINS, ids=CHAIN_IDS)
    def test_chain_code_matches(self, case_id: str, seed: bytes, chain: dict[str, Any]) -> None:
        node = derive_indexes(seed, chain["indexes"])
        assert node.chain_code.hex() == chain["chain_code"]

    @pytest.mark.parametrize(("case_id", "seed", "chain"), CHAINS, ids=CHAIN_IDS)
    def test_private_key_matches(self, case_id: str, seed: bytes, chain: dict[str, Any]) -> None:
        node = derive_indexes(seed, chain["indexes"])
        assert node.private_key.hex() == chain["private"]

    @pytest.mark.parametrize(("case_id", "seed", "chain"), CHAINS, ids=CHAIN_IDS)
    def test_public_key_matches(self, case_id: str, seed: bytes, chain: dict[str, Any]) -> None:
        node = derive_indexes(seed, chain["indexes"])
        # The specification prints ed25519 public keys with a 00 prefix byte.
        assert "00" + public_key(node.private_key).hex() == chain["public"]

    @pytest.mark.parametrize(("case_id", "seed", "chain"), CHAINS, ids=CHAIN_IDS)
    def test_step_by_step_matches(self, case_id: str, seed: bytes, chain: dict[str, Any]) -> None:
        node = master_key(seed)
        for index in chain["indexes"]:
            node = derive_child(node, index)
        assert node.private_key.hex() == chain["private"]
        assert node.chain_code.hex() == chain["chain_code"]


class TestMasterKey:
    """master_key accepts seeds of 16 to 64 bytes only."""

    def test_rejects_15_byte_seed(self) -> None:
        with pytest.raises(MasterKeyFormatError):
            master_key(bytes(15))

    def test_rejects_65_byte_seed(self) -> None:
        with pytest.raises(MasterKeyFormatError):
            master_key(bytes(65))

    def test_accepts_16_byte_seed(self) -> None:
        assert len(master_key(bytes(16)).private_key) == 32

    def test_accepts_64_byte_seed(self) -> None:
        assert len(master_key(bytes(64)).private_key) == 32

    def test_rejection_message_omits_seed(self) -> None:
        seed = bytes(range(100, 115))
        with pytest.raises(MasterKeyFormatError) as caught:
            master_key(seed)
        assert seed.hex() not in str(caught.value)
        assert "15 bytes" in str(caught.value)


class TestDeriveChild:
    """derive_child takes an index before hardening, in [0, 2^31)."""

    def test_rejects_negative_index(self) -> None:
        with pytest.raises(InvalidPathError):
            derive_child(master_key(bytes(16)), -1)

    def test_rejects_index_2_pow_31(self) -> None:
        with pytest.raises(InvalidPathError):
            derive_child(master_key(bytes(16)), 2**31)

    def test_accepts_index_max(self) -> None:
        child = derive_child(master_key(bytes(16)), 2**31 - 1)
        assert len(child.private_key) == 32
        assert len(child.chain_code) == 32

    def test_index_max_is_2_pow_31_minus_1(self) -> None:
        assert INDEX_MAX == 2**31 - 1

    def test_leaves_parent_unchanged(self) -> None:
        parent = master_key(bytes(16))
        before = (bytes(parent.private_key), bytes(parent.chain_code))
        derive_child(parent, 0)
        assert (bytes(parent.private_key), bytes(parent.chain_code)) == before


class TestExtendedKeyWipe:
    """ExtendedKey.wipe overwrites the private key and chain code with zeros."""

    def test_wipe_zeroes_both_buffers(self) -> None:
        node = master_key(bytes(16))
        node.wipe()
        assert node.private_key == bytearray(32)
        assert node.chain_code == bytearray(32)

    def test_context_exit_wipes(self) -> None:
        with master_key(bytes(16)) as node:
            pass
        assert node.private_key == bytearray(32)

    def test_repr_hides_secret(self) -> None:
        node = master_key(bytes(16))
        assert node.private_key.hex() not in repr(node)
