"""Fixtures of the key manager tests, shared with the identifier and end-to-end tests."""

from migration_support import (  # noqa: F401 - fixtures
    hsm_service,
    mig_backend,
    other_backend,
    tls_files,
)
