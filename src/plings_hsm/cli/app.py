"""The Typer application object and the context every command reads."""

from __future__ import annotations

import typer

from plings_hsm.cli.context import CliContext
from plings_hsm.settings import Settings

__all__ = ["app", "context", "keys_app", "token_app"]

app = typer.Typer(
    name="plings-hsm",
    help="Derive Plings identifier keys from wallet masters held in a PKCS#11 token.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
token_app = typer.Typer(help="Initialise and inspect the token.", no_args_is_help=True)
keys_app = typer.Typer(help="Import and list wallet masters in the token.", no_args_is_help=True)
app.add_typer(token_app, name="token")
app.add_typer(keys_app, name="keys")

_context: CliContext | None = None


def context() -> CliContext:
    """Return the process's CLI context, reading the settings on first use."""
    global _context
    if _context is None:
        _context = CliContext(Settings.from_env())
    return _context
