"""Identifier paths: parsing, text forms, index checks and instance ranges."""

from __future__ import annotations

import pytest

from plings_hsm.core.batch import check_instance_range
from plings_hsm.core.path import INDEX_MAX, BatchPrefix, IdentifierPath, check_index, parse_path
from plings_hsm.errors import InvalidPathError, InvalidRequestError

LEVEL_NAMES = [
    "purpose",
    "coinType",
    "walletVersion",
    "manufacturer",
    "category",
    "classId",
    "batch",
    "instanceNumber",
]
SAMPLE_INDEXES = [44, 501, 1, 2, 3, 4, 99999, 5]
SAMPLE_HARDENED = "m/44'/501'/1'/2'/3'/4'/99999'/5'"
SAMPLE_PATH = IdentifierPath(1, 2, 3, 4, 99999, 5)


def build_path(levels: list[str]) -> str:
    """Join level texts into a path starting with m/."""
    return "m/" + "/".join(levels)


class TestParsePathAccepts:
    """parse_path accepts eight hardened levels marked with ', h or H."""

    @pytest.mark.parametrize("marker", ["'", "h", "H"])
    def test_accepts_marker(self, marker: str) -> None:
        text = build_path([f"{index}{marker}" for index in SAMPLE_INDEXES])
        assert parse_path(text) == SAMPLE_PATH

    def test_accepts_mixed_markers(self) -> None:
        text = "m/44h/501H/1'/2h/3H/4'/99999h/5H"
        assert parse_path(text) == SAMPLE_PATH

    def test_accepts_zero_levels(self) -> None:
        assert parse_path("m/44'/501'/0'/0'/0'/0'/0'/0'") == IdentifierPath(0, 0, 0, 0, 0, 0)

    def test_accepts_index_max(self) -> None:
        text = build_path(["44'", "501'"] + [f"{INDEX_MAX}'"] * 6)
        assert parse_path(text) == IdentifierPath(*[INDEX_MAX] * 6)

    def test_accepts_surrounding_whitespace(self) -> None:
        assert parse_path(f"  {SAMPLE_HARDENED}\n") == SAMPLE_PATH

    def test_round_trips_hd_path(self) -> None:
        assert parse_path(SAMPLE_PATH.hd_path) == SAMPLE_PATH


class TestParsePathUnhardened:
    """parse_path rejects an unhardened level, naming it and showing the hardened form."""

    @pytest.mark.parametrize("position", range(8), ids=LEVEL_NAMES)
    def test_rejects_unhardened_level(self, position: int) -> None:
        levels = [f"{index}'" for index in SAMPLE_INDEXES]
        levels[position] = str(SAMPLE_INDEXES[position])
        with pytest.raises(InvalidPathError) as caught:
            parse_path(build_path(levels))
        message = str(caught.value)
        assert LEVEL_NAMES[position] in message
        assert SAMPLE_HARDENED in message

    def test_names_every_unhardened_level(self) -> None:
        with pytest.raises(InvalidPathError) as caught:
            parse_path("m/44'/501'/1/2'/3/4'/99999'/5'")
        message = str(caught.value)
        assert "walletVersion" in message
        assert "category" in message
        assert SAMPLE_HARDENED in message

    def test_rejects_fully_unhardened_path(self) -> None:
        with pytest.raises(InvalidPathError) as caught:
            parse_path("m/44/501/1/2/3/4/99999/5")
        assert SAMPLE_HARDENED in str(caught.value)


class TestParsePathRejects:
    """parse_path rejects any other deviation from m/44'/501' followed by six hardened indexes."""

    @pytest.mark.parametrize("count", [1, 2, 6, 7, 9, 10])
    def test_rejects_wrong_level_count(self, count: int) -> None:
        text = build_path(["44'", "501'", *["1'"] * max(0, count - 2)][:count])
        with pytest.raises(InvalidPathError) as caught:
            parse_path(text)
        assert f"has {count} levels" in str(caught.value)

    def test_rejects_bare_m(self) -> None:
        with pytest.raises(InvalidPathError):
            parse_path("m")

    def test_rejects_trailing_slash(self) -> None:
        with pytest.raises(InvalidPathError):
            parse_path(SAMPLE_HARDENED + "/")

    def test_rejects_wrong_purpose(self) -> None:
        with pytest.raises(InvalidPathError) as caught:
            parse_path("m/45'/501'/1'/2'/3'/4'/99999'/5'")
        assert "m/44'/501'" in str(caught.value)

    def test_rejects_wrong_coin_type(self) -> None:
        with pytest.raises(InvalidPathError) as caught:
            parse_path("m/44'/60'/1'/2'/3'/4'/99999'/5'")
        assert "m/44'/501'" in str(caught.value)

    @pytest.mark.parametrize(
        "level",
        ["abc'", "0x1'", "1.5'", "1e3'", "'", "", " 1'", "1 '", "1''", "1'h", "\uff11'", "+1'"],
    )
    def test_rejects_non_decimal_level(self, level: str) -> None:
        levels = [f"{index}'" for index in SAMPLE_INDEXES]
        levels[5] = level
        with pytest.raises(InvalidPathError) as caught:
            parse_path(build_path(levels))
        assert "classId" in str(caught.value)

    @pytest.mark.parametrize("level", ["01'", "00'", "0099999'"])
    def test_rejects_leading_zeros(self, level: str) -> None:
        levels = [f"{index}'" for index in SAMPLE_INDEXES]
        levels[6] = level
        with pytest.raises(InvalidPathError) as caught:
            parse_path(build_path(levels))
        assert "batch" in str(caught.value)

    def test_rejects_negative_level(self) -> None:
        with pytest.raises(InvalidPathError) as caught:
            parse_path("m/44'/501'/1'/2'/3'/4'/99999'/-1'")
        assert "instanceNumber" in str(caught.value)

    @pytest.mark.parametrize("index", [2**31, 2**31 + 1, 2**32, 10**20])
    def test_rejects_index_from_2_pow_31(self, index: int) -> None:
        with pytest.raises(InvalidPathError) as caught:
            parse_path(f"m/44'/501'/1'/2'/3'/4'/99999'/{index}'")
        message = str(caught.value)
        assert "instanceNumber" in message
        assert str(INDEX_MAX) in message

    @pytest.mark.parametrize(
        "text",
        [
            "44'/501'/1'/2'/3'/4'/99999'/5'",
            "/44'/501'/1'/2'/3'/4'/99999'/5'",
            "M/44'/501'/1'/2'/3'/4'/99999'/5'",
            "n/44'/501'/1'/2'/3'/4'/99999'/5'",
            "",
        ],
    )
    def test_rejects_missing_m_prefix(self, text: str) -> None:
        with pytest.raises(InvalidPathError) as caught:
            parse_path(text)
        assert "'m/'" in str(caught.value)

    def test_rejects_newline_inside_path(self) -> None:
        with pytest.raises(InvalidPathError):
            parse_path("m/44'/501'/1'\n/2'/3'/4'/99999'/5'")


class TestIdentifierPathText:
    """IdentifierPath renders the hdPath and the human-readable tag form."""

    def test_hd_path_hardens_every_level(self) -> None:
        assert SAMPLE_PATH.hd_path == SAMPLE_HARDENED

    def test_human_readable_pads_instance(self) -> None:
        path = IdentifierPath(1, 1, 1, 1, 99999, 1)
        assert path.human_readable == "1.1.C1.99999.00001"

    def test_human_readable_keeps_five_digit_instance(self) -> None:
        path = IdentifierPath(1, 1, 1, 1, 99999, 99999)
        assert path.human_readable == "1.1.C1.99999.99999"

    def test_human_readable_keeps_long_instance(self) -> None:
        path = IdentifierPath(1, 1, 1, 1, 99999, 123456)
        assert path.human_readable == "1.1.C1.99999.123456"

    def test_human_readable_keeps_index_max_instance(self) -> None:
        path = IdentifierPath(1, 1, 1, 1, 99999, INDEX_MAX)
        assert path.human_readable == f"1.1.C1.99999.{INDEX_MAX}"

    def test_human_readable_omits_wallet(self) -> None:
        path = IdentifierPath(7, 2, 3, 4, 5, 6)
        assert path.human_readable == "2.3.C4.5.00006"

    def test_indexes_start_with_purpose_and_coin(self) -> None:
        assert SAMPLE_PATH.indexes == tuple(SAMPLE_INDEXES)

    def test_prefix_drops_instance(self) -> None:
        assert SAMPLE_PATH.prefix == BatchPrefix(1, 2, 3, 4, 99999)

    def test_prefix_instance_round_trips(self) -> None:
        assert SAMPLE_PATH.prefix.instance(5) == SAMPLE_PATH

    def test_rejects_out_of_range_instance(self) -> None:
        with pytest.raises(InvalidPathError):
            IdentifierPath(1, 1, 1, 1, 1, 2**31)

    @pytest.mark.parametrize("position", range(5))
    def test_rejects_out_of_range_prefix_level(self, position: int) -> None:
        levels = [1, 1, 1, 1, 1, 1]
        levels[position] = -1
        with pytest.raises(InvalidPathError):
            IdentifierPath(*levels)


class TestCheckIndex:
    """check_index accepts an int in [0, 2^31) and nothing else."""

    @pytest.mark.parametrize("value", [True, False])
    def test_rejects_bool(self, value: bool) -> None:
        with pytest.raises(InvalidPathError) as caught:
            check_index("batch", value)
        assert "batch" in str(caught.value)

    @pytest.mark.parametrize("value", [1.0, 0.5, float("nan")])
    def test_rejects_float(self, value: float) -> None:
        with pytest.raises(InvalidPathError):
            check_index("batch", value)

    @pytest.mark.parametrize("value", ["1", "1'", ""])
    def test_rejects_str(self, value: str) -> None:
        with pytest.raises(InvalidPathError):
            check_index("batch", value)

    def test_rejects_none(self) -> None:
        with pytest.raises(InvalidPathError):
            check_index("batch", None)

    @pytest.mark.parametrize("value", [-1, 2**31])
    def test_rejects_out_of_range(self, value: int) -> None:
        with pytest.raises(InvalidPathError) as caught:
            check_index("classId", value)
        message = str(caught.value)
        assert "classId" in message
        assert str(value) in message

    @pytest.mark.parametrize("value", [0, 1, INDEX_MAX])
    def test_accepts_in_range(self, value: int) -> None:
        assert check_index("classId", value) == value


class TestCheckInstanceRange:
    """check_instance_range rejects empty, too long and 2^31-crossing ranges."""

    def test_rejects_quantity_zero(self) -> None:
        with pytest.raises(InvalidRequestError) as caught:
            check_instance_range(1, 0, 1000)
        assert caught.value.field == "quantity"

    def test_rejects_negative_quantity(self) -> None:
        with pytest.raises(InvalidRequestError):
            check_instance_range(1, -1, 1000)

    def test_rejects_quantity_over_max(self) -> None:
        with pytest.raises(InvalidRequestError) as caught:
            check_instance_range(1, 1001, 1000)
        assert "1000" in str(caught.value)

    def test_accepts_quantity_at_max(self) -> None:
        assert check_instance_range(1, 1000, 1000) is None

    def test_accepts_quantity_one(self) -> None:
        assert check_instance_range(0, 1, 1000) is None

    def test_accepts_last_instance_index_max(self) -> None:
        assert check_instance_range(INDEX_MAX, 1, 1000) is None

    def test_accepts_range_ending_at_index_max(self) -> None:
        assert check_instance_range(INDEX_MAX - 999, 1000, 1000) is None

    def test_rejects_range_crossing_2_pow_31(self) -> None:
        with pytest.raises(InvalidRequestError) as caught:
            check_instance_range(INDEX_MAX, 2, 1000)
        message = str(caught.value)
        assert str(2**31) in message
        assert str(INDEX_MAX) in message

    def test_rejects_long_range_crossing_2_pow_31(self) -> None:
        with pytest.raises(InvalidRequestError):
            check_instance_range(INDEX_MAX - 998, 1000, 1000)


class TestCheckInstanceRangeStart:
    """check_instance_range rejects a start outside [0, 2^31)."""

    @pytest.mark.parametrize("start", [-1, 2**31])
    def test_rejects_start_out_of_range(self, start: int) -> None:
        with pytest.raises(InvalidRequestError) as caught:
            check_instance_range(start, 1, 10)
        assert caught.value.field == "startInstance"


class TestParsePathMessages:
    """parse_path messages point at the real fault and never echo long input."""

    def test_leading_zero_named(self) -> None:
        with pytest.raises(InvalidPathError) as caught:
            parse_path("m/44'/501'/1'/01'/1'/1'/99999'/1'")
        assert "leading zero" in str(caught.value)

    def test_long_index_not_echoed(self) -> None:
        digits = "9" * 4000
        with pytest.raises(InvalidPathError) as caught:
            parse_path(f"m/44'/501'/1'/{digits}'/1'/1'/99999'/1'")
        assert digits[:100] not in str(caught.value)
        assert "4000 digits" in str(caught.value)

    def test_wrong_coin_reported_before_hardening(self) -> None:
        with pytest.raises(InvalidPathError) as caught:
            parse_path("m/44/60/1/1/1/1/99999/1")
        assert "must start with m/44'/501'" in str(caught.value)
        assert "Hardened form" not in str(caught.value)
