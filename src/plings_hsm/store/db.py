"""Engine and sessions of the state store: a SQLite file by default, PostgreSQL when shared."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa
import structlog
from sqlalchemy import event
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

from plings_hsm.errors import StoreError

__all__ = ["Base", "Store", "default_database_url"]

log = structlog.get_logger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 10_000
"""How long a SQLite writer waits for another process's lock before failing."""


class Base(DeclarativeBase):
    """Declarative base of every table in the state store."""


def default_database_url(home: Path) -> str:
    """Return the SQLite URL of the embedded setup: ``$PLINGS_HSM_HOME/plings-hsm.db``."""
    return f"sqlite:///{home / 'plings-hsm.db'}"


def _sqlite_pragmas(dbapi_connection: object, _record: object) -> None:
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


DB_FILE_MODE = 0o600
"""Mode of a new SQLite file; SQLite gives its -wal and -shm files the same mode."""


def _create_sqlite_file(url: str) -> None:
    """Create a missing SQLite database file with mode 0600 before SQLite opens it.

    SQLite would create it with the process umask (0644 by default) and copy that mode
    to the -wal and -shm files, so the audit log would be readable by every local user.
    """
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return
    if parsed.database == ":memory:" or parsed.database.startswith("file:"):
        return
    path = Path(parsed.database)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, DB_FILE_MODE)
    except FileExistsError:
        return
    except OSError as exc:
        raise StoreError(f"cannot create state store file {path}: {exc.strerror}") from exc
    os.close(descriptor)
    log.info("store_file_created", path=str(path), mode=oct(DB_FILE_MODE))


class Store:
    """The state store: one engine, sessions with commit or rollback, tables created on open.

    Args:
        url: a SQLAlchemy URL; ``sqlite:///path`` or ``postgresql+psycopg://...``.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        try:
            _create_sqlite_file(url)
            self.engine = sa.create_engine(url, pool_pre_ping=True)
            if self.engine.dialect.name == "sqlite":
                event.listen(self.engine, "connect", _sqlite_pragmas)
            self._sessions = sessionmaker(self.engine, expire_on_commit=False)
            Base.metadata.create_all(self.engine)
        except SQLAlchemyError as exc:
            raise StoreError(
                f"cannot open state store {self.safe_url}: {type(exc).__name__}"
            ) from exc
        log.info("store_opened", url=self.safe_url)

    @property
    def safe_url(self) -> str:
        """The URL with any password masked, for logs and messages."""
        return sa.engine.make_url(self.url).render_as_string(hide_password=True)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """Open a session that commits on success and rolls back on any error.

        Raises:
            StoreError: when the database fails; nothing of the session is written.
        """
        session = self._sessions()
        try:
            yield session
            session.commit()
        except SQLAlchemyError as exc:
            session.rollback()
            raise StoreError(f"state store {self.safe_url} failed: {type(exc).__name__}") from exc
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def close(self) -> None:
        """Dispose of the engine's connections."""
        self.engine.dispose()
