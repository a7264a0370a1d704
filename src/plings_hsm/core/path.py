"""Identifier paths: the eight hardened SLIP-0010 levels of a Plings key."""

from __future__ import annotations

import re
from dataclasses import dataclass

from plings_hsm.errors import InvalidPathError

__all__ = [
    "COIN_TYPE",
    "HARDENED_OFFSET",
    "INDEX_MAX",
    "PURPOSE",
    "BatchPrefix",
    "IdentifierPath",
    "check_index",
    "parse_path",
]

HARDENED_OFFSET = 0x8000_0000
"""Added to an index to mark it hardened (BIP-32 and SLIP-0010)."""

INDEX_MAX = HARDENED_OFFSET - 1
"""Largest index a level accepts before hardening: 2^31 - 1."""

PURPOSE = 44
"""First level, the BIP-44 purpose."""

COIN_TYPE = 501
"""Second level, the SLIP-0044 coin type of Solana, whose addresses the tags print."""

_LEVEL_NAMES = (
    "purpose",
    "coinType",
    "walletVersion",
    "manufacturer",
    "category",
    "classId",
    "batch",
    "instanceNumber",
)
_LEVEL_RE = re.compile(r"(0|[1-9][0-9]*)(['hH]?)")


def check_index(field: str, value: object) -> int:
    """Return ``value`` when it is a level index: an int in ``[0, 2^31)``.

    Args:
        field: the wire name used in the error message.
        value: the candidate index; ``bool`` is rejected although it subclasses ``int``.

    Raises:
        InvalidPathError: when the value is not an int or lies outside the range.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidPathError(f"{field} must be an integer, got {type(value).__name__}")
    if value < 0 or value > INDEX_MAX:
        raise InvalidPathError(f"{field} {value} is out of range; allowed 0 to {INDEX_MAX}")
    return value


@dataclass(frozen=True, slots=True)
class BatchPrefix:
    """The levels a batch shares: wallet down to batch."""

    wallet: int
    manufacturer: int
    category: int
    class_id: int
    batch: int

    def __post_init__(self) -> None:
        check_index("walletVersion", self.wallet)
        check_index("manufacturer", self.manufacturer)
        check_index("category", self.category)
        check_index("classId", self.class_id)
        check_index("batch", self.batch)

    @property
    def indexes(self) -> tuple[int, ...]:
        """Unhardened indexes of the seven prefix levels, from the purpose on."""
        return (
            PURPOSE,
            COIN_TYPE,
            self.wallet,
            self.manufacturer,
            self.category,
            self.class_id,
            self.batch,
        )

    def instance(self, instance: int) -> IdentifierPath:
        """Return the full path of one instance of this batch."""
        return IdentifierPath(
            self.wallet, self.manufacturer, self.category, self.class_id, self.batch, instance
        )


@dataclass(frozen=True, slots=True)
class IdentifierPath:
    """A full identifier path ``m/44'/501'/{wallet}'/.../{instance}'``, all levels hardened."""

    wallet: int
    manufacturer: int
    category: int
    class_id: int
    batch: int
    instance: int

    def __post_init__(self) -> None:
        check_index("walletVersion", self.wallet)
        check_index("manufacturer", self.manufacturer)
        check_index("category", self.category)
        check_index("classId", self.class_id)
        check_index("batch", self.batch)
        check_index("instanceNumber", self.instance)

    @property
    def prefix(self) -> BatchPrefix:
        """The batch this instance belongs to."""
        return BatchPrefix(self.wallet, self.manufacturer, self.category, self.class_id, self.batch)

    @property
    def indexes(self) -> tuple[int, ...]:
        """Unhardened indexes of all eight levels."""
        return (*self.prefix.indexes, self.instance)

    @property
    def hd_path(self) -> str:
        """The path text with every level hardened, as ``hdPath`` on the wire."""
        return "m/" + "/".join(f"{index}'" for index in self.indexes)

    @property
    def human_readable(self) -> str:
        """The tag form ``{manufacturer}.{category}.C{classId}.{batch}.{instance:05d}``."""
        return (
            f"{self.manufacturer}.{self.category}.C{self.class_id}.{self.batch}.{self.instance:05d}"
        )


_SHOWN_CHARS_MAX = 24
"""Maximum length of user input repeated in a message."""


def _shorten(text: str) -> str:
    return text if len(text) <= _SHOWN_CHARS_MAX else f"{text[:_SHOWN_CHARS_MAX]}..."


def _level_fault(level: str) -> str:
    body = level.rstrip("'hH")
    if len(body) > 1 and body.isascii() and body.isdigit() and body.startswith("0"):
        return "has a leading zero; write the index without it"
    return "is not a decimal index followed by ', h or H"


def parse_path(text: str) -> IdentifierPath:
    """Parse a full eight-level path such as ``m/44'/501'/1'/1'/1'/1'/99999'/1'``.

    ``'``, ``h`` and ``H`` mark a hardened level. A level without a mark is rejected,
    not hardened silently: SLIP-0010 ed25519 defines hardened children only, and a
    guessed path could put a different key on a tag.

    Raises:
        InvalidPathError: on any deviation, naming the level and showing the expected form.
    """
    parts = text.strip().split("/")
    if not parts or parts[0] != "m":
        raise InvalidPathError(f"path {_shorten(text)!r} must start with 'm/'")
    levels = parts[1:]
    if len(levels) != len(_LEVEL_NAMES):
        raise InvalidPathError(
            f"path {_shorten(text)!r} has {len(levels)} levels; need {len(_LEVEL_NAMES)}: "
            "m/44'/501'/{walletVersion}'/{manufacturer}'/{category}'/{classId}'/{batch}'/{instance}'"
        )

    indexes: list[int] = []
    unhardened: list[str] = []
    for name, level in zip(_LEVEL_NAMES, levels, strict=True):
        match = _LEVEL_RE.fullmatch(level)
        if match is None:
            raise InvalidPathError(f"path level {name} {_shorten(level)!r} {_level_fault(level)}")
        digits = match.group(1)
        if len(digits) > len(str(INDEX_MAX)):
            raise InvalidPathError(
                f"path level {name} has {len(digits)} digits; allowed 0 to {INDEX_MAX}"
            )
        index = check_index(name, int(digits))
        if not match.group(2):
            unhardened.append(name)
        indexes.append(index)

    if indexes[0] != PURPOSE or indexes[1] != COIN_TYPE:
        raise InvalidPathError(
            f"path must start with m/{PURPOSE}'/{COIN_TYPE}'; got m/{indexes[0]}'/{indexes[1]}'"
        )
    if unhardened:
        hardened_form = "m/" + "/".join(f"{index}'" for index in indexes)
        levels_text = ", ".join(unhardened)
        verb = "is" if len(unhardened) == 1 else "are"
        noun = "level" if len(unhardened) == 1 else "levels"
        raise InvalidPathError(
            f"path {noun} {levels_text} {verb} not hardened; SLIP-0010 ed25519 defines "
            f"hardened children only. Hardened form: {hardened_form}"
        )

    return IdentifierPath(*indexes[2:])
