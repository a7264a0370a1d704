"""Strict parsing of JSON request bodies, with errors that name the field at fault."""

from __future__ import annotations

import json
from typing import Any

__all__ = [
    "INT_DIGITS_MAX",
    "VALUE_SHOWN_MAX_CHARS",
    "JsonBodyError",
    "parse_json_body",
    "show_value",
]

INT_DIGITS_MAX = 20
"""Maximum digits of an integer literal; every index of the API fits in 10, a 64-bit value in 20.

Python's ``int()`` raises ValueError past ``sys.get_int_max_str_digits()`` (4300 by
default), which the framework turned into a 400 without a field.
"""

VALUE_SHOWN_MAX_CHARS = 24
"""Characters of a rejected value quoted in an error message; the rest is cut."""


class JsonBodyError(ValueError):
    """A request body that is not strict JSON: invalid UTF-8 or syntax, a bad literal or
    a key that appears twice in one object.

    Args:
        message: what is wrong, for the client.
        field: the object key at fault, or ``body`` when no key can be named.
        code: the error code of the response body.
    """

    def __init__(self, message: str, *, field: str, code: str) -> None:
        super().__init__(message)
        self.field = field
        self.code = code


class _InvalidLiteral:
    """A number literal the parser keeps aside, so the enclosing object can name its key."""

    __slots__ = ("reason", "text")

    def __init__(self, text: str, reason: str) -> None:
        self.text = text
        self.reason = reason


def _cut(text: str) -> str:
    if len(text) <= VALUE_SHOWN_MAX_CHARS:
        return text
    return f"{text[:VALUE_SHOWN_MAX_CHARS]}... ({len(text)} characters)"


def show_value(value: object) -> str:
    """Return ``value`` as JSON text, cut to VALUE_SHOWN_MAX_CHARS characters."""
    return _cut(json.dumps(value, default=repr))


def _parse_int(text: str) -> int | _InvalidLiteral:
    digits = len(text.lstrip("-"))
    if digits > INT_DIGITS_MAX:
        return _InvalidLiteral(text, f"has {digits} digits; the limit is {INT_DIGITS_MAX} digits")
    return int(text)


def _parse_constant(text: str) -> _InvalidLiteral:
    return _InvalidLiteral(text, "is not a JSON number (RFC 8259 has no NaN or Infinity)")


def _find_invalid(value: object) -> _InvalidLiteral | None:
    # Objects check their own values in _object_of, so only arrays need a search here.
    if isinstance(value, _InvalidLiteral):
        return value
    if isinstance(value, list):
        for item in value:
            found = _find_invalid(item)
            if found is not None:
                return found
    return None


def _literal_error(literal: _InvalidLiteral, field: str) -> JsonBodyError:
    return JsonBodyError(
        f"{field} {_cut(literal.text)} {literal.reason}", field=field, code="invalid_request"
    )


def _object_of(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        # json keeps the last of duplicate keys, so {"quantity": 99999999, "quantity": 1}
        # would pass validation with a value other parsers read differently.
        if key in result:
            raise JsonBodyError(
                f"{key} appears more than once in one object; send each field once",
                field=key,
                code="invalid_request",
            )
        literal = _find_invalid(value)
        if literal is not None:
            raise _literal_error(literal, key)
        result[key] = value
    return result


def parse_json_body(body: bytes) -> object:
    """Parse ``body`` as strict JSON (RFC 8259): UTF-8 text, no NaN, bounded integers,
    unique keys in each object.

    Raises:
        JsonBodyError: naming the field where one can be named.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JsonBodyError(
            f"body is not UTF-8: byte 0x{body[exc.start]:02x} at offset {exc.start} is "
            "invalid; send JSON encoded as UTF-8",
            field="body",
            code="invalid_json",
        ) from exc

    try:
        parsed = json.loads(
            text,
            parse_int=_parse_int,
            parse_constant=_parse_constant,
            object_pairs_hook=_object_of,
        )
    except JsonBodyError:
        raise
    except json.JSONDecodeError as exc:
        raise JsonBodyError(
            f"body is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}",
            field="body",
            code="invalid_json",
        ) from exc
    except RecursionError as exc:
        raise JsonBodyError(
            "body nests arrays and objects deeper than the parser can follow",
            field="body",
            code="too_deep",
        ) from exc

    literal = _find_invalid(parsed)
    if literal is not None:
        raise _literal_error(literal, "body")
    return parsed
