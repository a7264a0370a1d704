"""The identifier API: the application-facing service over the key manager."""

from plings_hsm.identifier.app import (
    KEY_SOURCE_HEADER,
    IdentifierConfig,
    IdentifierDeriveRequest,
    create_identifier_app,
)

__all__ = [
    "KEY_SOURCE_HEADER",
    "IdentifierConfig",
    "IdentifierDeriveRequest",
    "create_identifier_app",
]
