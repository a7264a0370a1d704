"""The audit table: who changed what, when, from which value to which, in a hash chain."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import sqlalchemy as sa
import structlog
from sqlalchemy.orm import Mapped, Session, mapped_column

from plings_hsm.errors import StoreError
from plings_hsm.store.db import Base, Store

__all__ = [
    "GENESIS_HASH",
    "AuditEntry",
    "AuditRow",
    "ChainCheck",
    "append_audit",
    "audit_head",
    "find_audit_row",
    "list_audit",
    "record_audit",
    "verify_audit_chain",
]

log = structlog.get_logger(__name__)

GENESIS_HASH = "0" * 64
"""The previous hash of the first row."""

_FIELD_SEPARATOR = "\x1f"


class AuditRow(Base):
    """One change: actor, action, subject, old and new value, and the chain hashes.

    Each row carries SHA-256 over the previous row's hash and its own content, and the
    previous hash is unique, so an edited, deleted or inserted row breaks the chain where
    :func:`verify_audit_chain` finds it. Someone who can write the database can still
    rewrite the whole chain from the edit on; anchoring the latest hash elsewhere would
    detect that.
    """

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(sa.Float, nullable=False)
    actor: Mapped[str] = mapped_column(sa.String(200), nullable=False)
    action: Mapped[str] = mapped_column(sa.String(100), nullable=False, index=True)
    subject: Mapped[str] = mapped_column(sa.String(100), nullable=False, default="")
    old_value: Mapped[str] = mapped_column(sa.Text, nullable=False, default="")
    new_value: Mapped[str] = mapped_column(sa.Text, nullable=False, default="")
    detail: Mapped[str] = mapped_column(sa.Text, nullable=False, default="")
    prev_hash: Mapped[str] = mapped_column(sa.String(64), nullable=False, unique=True)
    row_hash: Mapped[str] = mapped_column(sa.String(64), nullable=False, unique=True)


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """A change as callers see it."""

    id: int
    at: float
    actor: str
    action: str
    subject: str
    old_value: str
    new_value: str
    detail: str
    row_hash: str


@dataclass(frozen=True, slots=True)
class ChainCheck:
    """Result of checking the chain: rows checked and the first broken row id, if any."""

    rows: int
    broken_at: int | None

    @property
    def ok(self) -> bool:
        """Whether every row's hash follows from its predecessor and content."""
        return self.broken_at is None


def _row_hash(prev_hash: str, at: float, fields: tuple[str, ...]) -> str:
    content = _FIELD_SEPARATOR.join((prev_hash, repr(at), *fields))
    return hashlib.sha256(content.encode("utf-8")).hexdigest()


def append_audit(
    session: Session,
    *,
    actor: str,
    action: str,
    subject: str = "",
    old_value: str = "",
    new_value: str = "",
    detail: str = "",
) -> AuditRow:
    """Add a row after the newest one, in the caller's transaction.

    Two writers that read the same newest row collide on the unique previous hash, so
    one transaction fails and the caller retries it; the chain never forks.
    """
    newest = session.scalars(sa.select(AuditRow).order_by(AuditRow.id.desc()).limit(1)).first()
    prev_hash = newest.row_hash if newest is not None else GENESIS_HASH
    at = time.time()
    fields = (actor, action, subject, old_value, new_value, detail)
    row = AuditRow(
        at=at,
        actor=actor,
        action=action,
        subject=subject,
        old_value=old_value,
        new_value=new_value,
        detail=detail,
        prev_hash=prev_hash,
        row_hash=_row_hash(prev_hash, at, fields),
    )
    session.add(row)
    session.flush()
    return row


APPEND_ATTEMPTS = 5
"""Attempts of :func:`record_audit` when another writer took the newest row first."""


def record_audit(store: Store, **fields: str) -> None:
    """Append one audit row in a transaction of its own, retrying a lost race.

    Args:
        fields: ``actor``, ``action`` and optionally ``subject``, ``old_value``,
            ``new_value`` and ``detail``, as for :func:`append_audit`.

    Raises:
        StoreError: when every attempt failed.
    """
    for attempt in range(1, APPEND_ATTEMPTS + 1):
        try:
            with store.session() as session:
                append_audit(session, **fields)
            return
        except StoreError:
            if attempt == APPEND_ATTEMPTS:
                raise
            log.info("audit_append_retried", action=fields.get("action", ""), attempt=attempt)


def list_audit(session: Session, action: str | None = None, limit: int = 1000) -> list[AuditEntry]:
    """Return the newest ``limit`` rows in insertion order, optionally of one action."""
    query = sa.select(AuditRow).order_by(AuditRow.id.desc()).limit(limit)
    if action is not None:
        query = query.where(AuditRow.action == action)
    rows = list(reversed(session.scalars(query).all()))
    return [
        AuditEntry(
            row.id,
            row.at,
            row.actor,
            row.action,
            row.subject,
            row.old_value,
            row.new_value,
            row.detail,
            row.row_hash,
        )
        for row in rows
    ]


def audit_head(session: Session) -> AuditEntry | None:
    """Return the newest audit row, whose hash covers every row before it, or None."""
    entries = list_audit(session, limit=1)
    return entries[0] if entries else None


def find_audit_row(session: Session, row_hash: str) -> AuditEntry | None:
    """Return the audit row whose hash is ``row_hash``, or None."""
    row = session.scalar(sa.select(AuditRow).where(AuditRow.row_hash == row_hash))
    if row is None:
        return None
    return AuditEntry(
        row.id,
        row.at,
        row.actor,
        row.action,
        row.subject,
        row.old_value,
        row.new_value,
        row.detail,
        row.row_hash,
    )


def verify_audit_chain(session: Session) -> ChainCheck:
    """Recompute every row's hash in id order and return the first row that does not match."""
    prev_hash = GENESIS_HASH
    count = 0
    for row in session.scalars(sa.select(AuditRow).order_by(AuditRow.id)):
        count += 1
        fields = (row.actor, row.action, row.subject, row.old_value, row.new_value, row.detail)
        if row.prev_hash != prev_hash or row.row_hash != _row_hash(prev_hash, row.at, fields):
            return ChainCheck(count, row.id)
        prev_hash = row.row_hash
    return ChainCheck(count, None)
