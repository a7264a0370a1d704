"""API keys of the HSM service, stored as SHA-256 digests under a public key id."""

from __future__ import annotations

import datetime
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

import sqlalchemy as sa
import structlog
from sqlalchemy.orm import Mapped, Session, mapped_column

from plings_hsm.errors import InvalidRequestError
from plings_hsm.secrets import Secret
from plings_hsm.store.db import Base, Store

__all__ = [
    "API_KEY_PREFIX",
    "BUDGET_MAX_PER_MINUTE",
    "NAME_MAX_CHARS",
    "ApiKeyRecord",
    "ApiKeyRow",
    "ApiKeyStore",
    "has_store_key_prefix",
]

log = structlog.get_logger(__name__)

API_KEY_PREFIX = "plk"
"""First part of every stored API key: ``plk_{key id}_{secret}``."""

KEY_ID_BYTES = 8
"""Random bytes of the public key id (16 hex characters)."""

KEY_SECRET_BYTES = 32
"""Random bytes of the secret part; 256 bits make a fast hash such as SHA-256 enough."""

NAME_MAX_CHARS = 64
"""Maximum length of an API key's client name, in characters."""

BUDGET_MAX_PER_MINUTE = 100_000_000
"""Largest per-key budget the store accepts, in requests or keys a minute."""

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_KEY_RE = re.compile(rb"plk_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")
_KEY_PREFIX_BYTES = f"{API_KEY_PREFIX}_".encode("ascii")


def has_store_key_prefix(key: bytes) -> bool:
    """Tell whether ``key`` starts like a stored API key (``plk_``).

    Such a key is judged by the store alone, so no configured key may look like one.
    """
    return key.startswith(_KEY_PREFIX_BYTES)


class ApiKeyRow(Base):
    """One API key: public id, client name, SHA-256 of the key, budget and use times."""

    __tablename__ = "api_keys"
    __table_args__ = (
        # One active key per name; a revoked key keeps its row and frees the name.
        sa.Index(
            "ix_api_keys_active_name",
            "name",
            unique=True,
            sqlite_where=sa.text("revoked_at IS NULL"),
            postgresql_where=sa.text("revoked_at IS NULL"),
        ),
    )

    key_id: Mapped[str] = mapped_column(sa.String(2 * KEY_ID_BYTES), primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(NAME_MAX_CHARS))
    key_sha256: Mapped[bytes] = mapped_column(sa.LargeBinary(32))
    created_at: Mapped[datetime.datetime] = mapped_column(sa.DateTime(timezone=True))
    last_used_at: Mapped[datetime.datetime | None] = mapped_column(sa.DateTime(timezone=True))
    revoked_at: Mapped[datetime.datetime | None] = mapped_column(sa.DateTime(timezone=True))
    requests_per_minute: Mapped[int | None] = mapped_column(sa.Integer)
    keys_per_minute: Mapped[int | None] = mapped_column(sa.Integer)


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    """Public facts about one API key; a budget of ``None`` means the service default."""

    key_id: str
    name: str
    created_at: datetime.datetime
    last_used_at: datetime.datetime | None
    revoked_at: datetime.datetime | None
    requests_per_minute: int | None
    keys_per_minute: int | None

    @classmethod
    def of(cls, row: ApiKeyRow) -> ApiKeyRecord:
        """Copy the public columns of ``row``."""
        return cls(
            key_id=row.key_id,
            name=row.name,
            created_at=_utc(row.created_at),
            last_used_at=_utc(row.last_used_at) if row.last_used_at else None,
            revoked_at=_utc(row.revoked_at) if row.revoked_at else None,
            requests_per_minute=row.requests_per_minute,
            keys_per_minute=row.keys_per_minute,
        )


def _utc(moment: datetime.datetime) -> datetime.datetime:
    # SQLite returns naive datetimes; every value this module writes is UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.UTC)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def _check_name(name: str) -> None:
    if len(name) > NAME_MAX_CHARS or not _NAME_RE.fullmatch(name):
        raise InvalidRequestError(
            f"name {name!r} is invalid; use 1 to {NAME_MAX_CHARS} letters, digits, '.', '_' "
            "or '-', starting with a letter or digit",
            field="name",
        )


def _check_budget(field: str, value: int | None) -> None:
    if value is not None and not 1 <= value <= BUDGET_MAX_PER_MINUTE:
        raise InvalidRequestError(
            f"{field} {value} is out of range; allowed 1 to {BUDGET_MAX_PER_MINUTE}", field=field
        )


class ApiKeyStore:
    """Create, list, revoke and verify API keys in the state store.

    A key is ``plk_{key id}_{secret}``: the key id is public and finds the row, and only
    the SHA-256 digest of the whole key is stored. Verification compares digests with
    :func:`hmac.compare_digest`.

    Args:
        store: the state store that contains the ``api_keys`` table.
    """

    def __init__(self, store: Store) -> None:
        self.store = store

    def create(
        self,
        name: str,
        *,
        requests_per_minute: int | None = None,
        keys_per_minute: int | None = None,
    ) -> tuple[ApiKeyRecord, Secret]:
        """Create a key for client ``name``; the returned secret is the only copy.

        Raises:
            InvalidRequestError: when the name or a budget is invalid, or an active key
                already carries the name.
        """
        _check_name(name)
        _check_budget("requests_per_minute", requests_per_minute)
        _check_budget("keys_per_minute", keys_per_minute)

        key_id = secrets.token_hex(KEY_ID_BYTES)
        key = Secret(f"{API_KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(KEY_SECRET_BYTES)}")
        row = ApiKeyRow(
            key_id=key_id,
            name=name,
            key_sha256=_digest(key.reveal()),
            created_at=_now(),
            last_used_at=None,
            revoked_at=None,
            requests_per_minute=requests_per_minute,
            keys_per_minute=keys_per_minute,
        )
        with self.store.session() as session:
            taken = session.scalar(
                sa.select(ApiKeyRow.key_id).where(
                    ApiKeyRow.name == name, ApiKeyRow.revoked_at.is_(None)
                )
            )
            if taken is not None:
                raise InvalidRequestError(
                    f"name {name!r} already has an active API key ({taken}); revoke it first "
                    "or choose another name",
                    field="name",
                )
            session.add(row)
            session.flush()
            record = ApiKeyRecord.of(row)
        log.info("api_key_created", key_id=key_id, name=name)
        return record, key

    def list_keys(self, *, include_revoked: bool = True) -> list[ApiKeyRecord]:
        """Return the keys, oldest first."""
        query = sa.select(ApiKeyRow).order_by(ApiKeyRow.created_at, ApiKeyRow.key_id)
        if not include_revoked:
            query = query.where(ApiKeyRow.revoked_at.is_(None))
        with self.store.session() as session:
            return [ApiKeyRecord.of(row) for row in session.scalars(query)]

    def revoke(self, name_or_id: str) -> ApiKeyRecord:
        """Revoke the active key with this name or key id; the row stays for the record.

        Raises:
            InvalidRequestError: when no active key has that name or id.
        """
        with self.store.session() as session:
            row = self._active_row(session, name_or_id)
            row.revoked_at = _now()
            session.flush()
            record = ApiKeyRecord.of(row)
        log.info("api_key_revoked", key_id=record.key_id, name=record.name)
        return record

    def set_budget(
        self,
        name_or_id: str,
        *,
        requests_per_minute: int | None,
        keys_per_minute: int | None,
    ) -> ApiKeyRecord:
        """Set the budget of the active key with this name or key id; ``None`` is the default.

        A running service applies the new budget within the time it remembers a verified key.

        Raises:
            InvalidRequestError: when a budget is out of range or no active key matches.
        """
        _check_budget("requests_per_minute", requests_per_minute)
        _check_budget("keys_per_minute", keys_per_minute)
        with self.store.session() as session:
            row = self._active_row(session, name_or_id)
            row.requests_per_minute = requests_per_minute
            row.keys_per_minute = keys_per_minute
            session.flush()
            record = ApiKeyRecord.of(row)
        log.info(
            "api_key_budget_changed",
            key_id=record.key_id,
            name=record.name,
            requests_per_minute=requests_per_minute,
            keys_per_minute=keys_per_minute,
        )
        return record

    @staticmethod
    def _active_row(session: Session, name_or_id: str) -> ApiKeyRow:
        row = session.scalar(
            sa.select(ApiKeyRow).where(
                sa.or_(ApiKeyRow.name == name_or_id, ApiKeyRow.key_id == name_or_id),
                ApiKeyRow.revoked_at.is_(None),
            )
        )
        if row is None:
            raise InvalidRequestError(
                f"no active API key has name or key id {name_or_id!r}; "
                "see 'plings-hsm apikey list'",
                field="name",
            )
        return row

    def verify(self, presented: bytes) -> ApiKeyRecord | None:
        """Return the active key that ``presented`` is, or ``None``.

        The key id selects the row; the digests are compared in constant time. A
        malformed, unknown or revoked key all return ``None``.
        """
        match = _KEY_RE.fullmatch(presented)
        if match is None:
            return None
        key_id = match.group(1).decode("ascii")
        with self.store.session() as session:
            row = session.get(ApiKeyRow, key_id)
            if row is None or row.revoked_at is not None:
                return None
            if not hmac.compare_digest(row.key_sha256, _digest(presented)):
                return None
            return ApiKeyRecord.of(row)

    def mark_used(self, key_id: str, when: datetime.datetime | None = None) -> None:
        """Record that key ``key_id`` authenticated a request at ``when`` (default now)."""
        with self.store.session() as session:
            session.execute(
                sa.update(ApiKeyRow)
                .where(ApiKeyRow.key_id == key_id)
                .values(last_used_at=when or _now())
            )
