"""plings-hsm: SLIP-0010 ed25519 identifier keys from a PKCS#11 token."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("plings-hsm")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
