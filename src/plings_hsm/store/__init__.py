"""The state store: SQLAlchemy tables shared by the services and the CLI."""

from plings_hsm.store import audit, migration  # noqa: F401 - registers the tables
from plings_hsm.store.api_keys import ApiKeyRecord, ApiKeyStore
from plings_hsm.store.db import Base, Store, default_database_url

__all__ = ["ApiKeyRecord", "ApiKeyStore", "Base", "Store", "default_database_url"]
