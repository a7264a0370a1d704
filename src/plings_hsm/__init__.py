"""plings-hsm: SLIP-0010 ed25519 identifier keys from a PKCS#11 token."""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("plings-hsm")
except _metadata.PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
