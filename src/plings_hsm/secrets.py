"""A masked container for secrets read from configuration."""

from __future__ import annotations

import hmac

__all__ = ["Secret"]


class Secret:
    """Bytes of a PIN, an API key or a master text, masked in ``repr`` and ``str``.

    The mask keeps the value out of tracebacks, log fields and debug output. Read the
    value only where it is used, with :meth:`reveal` or :meth:`reveal_text`.
    """

    __slots__ = ("_value",)

    def __init__(self, value: bytes | str) -> None:
        self._value = bytearray(value.encode("utf-8") if isinstance(value, str) else value)

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __len__(self) -> int:
        return len(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)

    def __reduce__(self) -> str | tuple[object, ...]:
        raise TypeError("Secret cannot be pickled")

    def reveal(self) -> bytes:
        """Return the secret as bytes."""
        return bytes(self._value)

    def reveal_text(self) -> str:
        """Return the secret as text, for APIs such as python-pkcs11 that take ``str`` PINs."""
        return self._value.decode("utf-8")

    def equals(self, candidate: bytes) -> bool:
        """Compare with ``candidate`` in constant time for equal lengths."""
        return hmac.compare_digest(bytes(self._value), candidate)

    def wipe(self) -> None:
        """Overwrite the stored bytes with zeros (best effort: copies made by callers remain)."""
        self._value[:] = bytes(len(self._value))
