"""Decoding of PLINGS_MASTER_KEY: base58 text of a 16 to 64 byte seed."""

from __future__ import annotations

import pytest

from plings_hsm.core.seed import check_seed, decode_master_key
from plings_hsm.errors import ConfigError, MasterKeyFormatError

ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def encode_base58(data: bytes) -> str:
    """Encode bytes as Bitcoin base58 without the base58 package that the decoder uses."""
    number = int.from_bytes(data, "big")
    digits = ""
    while number:
        number, remainder = divmod(number, 58)
        digits = ALPHABET[remainder] + digits
    leading_zero_count = len(data) - len(data.lstrip(b"\x00"))
    return "1" * leading_zero_count + digits


SEED_16 = bytes(range(1, 17))
SEED_32 = bytes(range(101, 133))
SEED_64 = bytes(range(192, 256))
SEED_LEADING_ZEROS = bytes(3) + bytes(range(1, 30))
TEXT_32 = encode_base58(SEED_32)


def insert_middle(text: str, piece: str) -> str:
    """Return ``text`` with ``piece`` inserted in its middle."""
    middle = len(text) // 2
    return text[:middle] + piece + text[middle:]


class TestEncoderHelper:
    """The test's own base58 encoder agrees with fixed known values."""

    def test_encodes_leading_zeros_as_ones(self) -> None:
        assert encode_base58(bytes(3) + b"\x01") == "1112"

    def test_encodes_58_as_two_digits(self) -> None:
        assert encode_base58(b"\x3a") == "21"


class TestDecodeValid:
    """decode_master_key returns the seed bytes for valid base58 text."""

    @pytest.mark.parametrize(
        "seed",
        [SEED_16, SEED_32, SEED_64, SEED_LEADING_ZEROS],
        ids=["16 bytes", "32 bytes", "64 bytes", "leading zeros"],
    )
    def test_decodes_seed(self, seed: bytes) -> None:
        assert decode_master_key(encode_base58(seed)) == seed

    def test_leading_ones_become_zero_bytes(self) -> None:
        text = encode_base58(SEED_LEADING_ZEROS)
        assert text.startswith("111")
        assert decode_master_key(text)[:3] == bytes(3)

    def test_all_ones_is_all_zero_seed(self) -> None:
        assert decode_master_key("1" * 16) == bytes(16)

    def test_returns_bytearray(self) -> None:
        assert isinstance(decode_master_key(TEXT_32), bytearray)

    @pytest.mark.parametrize("suffix", ["\n", "\r\n", " ", "\t\n"])
    def test_accepts_trailing_whitespace(self, suffix: str) -> None:
        assert decode_master_key(TEXT_32 + suffix) == SEED_32

    def test_accepts_leading_whitespace(self) -> None:
        assert decode_master_key("  " + TEXT_32) == SEED_32

    def test_accepts_ascii_bytes(self) -> None:
        assert decode_master_key(TEXT_32.encode("ascii") + b"\n") == SEED_32


INVALID_TEXTS = {
    "inner space": insert_middle(TEXT_32, " "),
    "inner tab": insert_middle(TEXT_32, "\t"),
    "inner newline": insert_middle(TEXT_32, "\n"),
    "zero digit": insert_middle(TEXT_32, "0"),
    "capital O": insert_middle(TEXT_32, "O"),
    "capital I": insert_middle(TEXT_32, "I"),
    "lowercase l": insert_middle(TEXT_32, "l"),
    "plus": insert_middle(TEXT_32, "+"),
    "slash": insert_middle(TEXT_32, "/"),
    "e acute": insert_middle(TEXT_32, "\u00e9"),
    "fullwidth digit": insert_middle(TEXT_32, "\uff11"),
    "15 bytes": encode_base58(bytes(range(1, 16))),
    "65 bytes": encode_base58(bytes(range(1, 66))),
    "15 zero bytes": "1" * 15,
    "65 zero bytes": "1" * 65,
}

# Texts whose every six-character fragment is unlikely to occur in a fixed message by chance,
# so finding one there means the message copied part of the input.
SECRET_LIKE_TEXTS = {name: text for name, text in INVALID_TEXTS.items() if set(text) != {"1"}}


class TestDecodeInvalid:
    """decode_master_key rejects text that is not base58 of 16 to 64 bytes."""

    @pytest.mark.parametrize("text", ["", " ", "\n", " \t\r\n"], ids=repr)
    def test_rejects_empty(self, text: str) -> None:
        with pytest.raises(MasterKeyFormatError) as caught:
            decode_master_key(text)
        assert "PLINGS_MASTER_KEY" in str(caught.value)

    @pytest.mark.parametrize("text", list(INVALID_TEXTS.values()), ids=list(INVALID_TEXTS))
    def test_rejects_invalid_text(self, text: str) -> None:
        with pytest.raises(MasterKeyFormatError):
            decode_master_key(text)

    @pytest.mark.parametrize("text", list(INVALID_TEXTS.values()), ids=list(INVALID_TEXTS))
    def test_message_names_variable(self, text: str) -> None:
        with pytest.raises(MasterKeyFormatError) as caught:
            decode_master_key(text)
        assert "PLINGS_MASTER_KEY" in str(caught.value)

    @pytest.mark.parametrize("text", list(INVALID_TEXTS.values()), ids=list(INVALID_TEXTS))
    def test_message_omits_text(self, text: str) -> None:
        with pytest.raises(MasterKeyFormatError) as caught:
            decode_master_key(text)
        assert text not in str(caught.value)
        assert text.strip() not in str(caught.value)

    @pytest.mark.parametrize("text", list(SECRET_LIKE_TEXTS.values()), ids=list(SECRET_LIKE_TEXTS))
    def test_message_omits_any_part_of_text(self, text: str) -> None:
        with pytest.raises(MasterKeyFormatError) as caught:
            decode_master_key(text)
        message = str(caught.value)
        fragments = {text[start : start + 6] for start in range(len(text) - 5)}
        leaked = sorted(fragment for fragment in fragments if fragment in message)
        assert leaked == []

    @pytest.mark.parametrize("text", ["0", "O", "I", "l", "+", "\u00e9"])
    def test_rejects_single_invalid_character(self, text: str) -> None:
        with pytest.raises(MasterKeyFormatError) as caught:
            decode_master_key(text)
        assert "PLINGS_MASTER_KEY" in str(caught.value)

    def test_rejects_non_ascii_bytes(self) -> None:
        text = TEXT_32.encode("ascii") + b"\xff"
        with pytest.raises(MasterKeyFormatError) as caught:
            decode_master_key(text)
        message = str(caught.value)
        assert "PLINGS_MASTER_KEY" in message
        assert TEXT_32 not in message

    def test_message_gives_decoded_length(self) -> None:
        with pytest.raises(MasterKeyFormatError) as caught:
            decode_master_key(INVALID_TEXTS["65 bytes"])
        assert "65 bytes" in str(caught.value)

    def test_message_uses_given_variable(self) -> None:
        with pytest.raises(MasterKeyFormatError) as caught:
            decode_master_key("", variable="PLINGS_MASTER_KEY_V2")
        assert "PLINGS_MASTER_KEY_V2" in str(caught.value)

    def test_error_is_config_error(self) -> None:
        with pytest.raises(ConfigError):
            decode_master_key("0")


class TestCheckSeed:
    """check_seed accepts seeds of 16 to 64 bytes."""

    @pytest.mark.parametrize("length", [16, 17, 32, 63, 64])
    def test_accepts_length(self, length: int) -> None:
        assert check_seed(bytes(length)) is None

    @pytest.mark.parametrize("length", [0, 15, 65, 128])
    def test_rejects_length(self, length: int) -> None:
        with pytest.raises(MasterKeyFormatError) as caught:
            check_seed(bytes(length))
        assert f"{length} bytes" in str(caught.value)

    def test_accepts_bytearray(self) -> None:
        assert check_seed(bytearray(32)) is None
