"""The ``plings-hsm`` command line."""

from plings_hsm.cli.main import main

__all__ = ["main"]
