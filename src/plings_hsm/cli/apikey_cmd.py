"""``plings-hsm apikey create|list|budget|revoke``: API keys of the HSM service in the store."""

from __future__ import annotations

import datetime
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from plings_hsm.cli.app import app, context
from plings_hsm.service.config import KEYS_PER_MINUTE_DEFAULT, REQUESTS_PER_MINUTE_DEFAULT
from plings_hsm.store.api_keys import BUDGET_MAX_PER_MINUTE, ApiKeyRecord, ApiKeyStore
from plings_hsm.store.db import Store

__all__ = ["apikey_app"]

apikey_app = typer.Typer(
    help="Create, list, budget and revoke API keys of the HSM service.", no_args_is_help=True
)
app.add_typer(apikey_app, name="apikey")

# Outside a terminal Rich assumes 80 columns and folds the table; pipes get room for a row.
_out = Console(
    highlight=False, soft_wrap=True, markup=False, width=None if sys.stdout.isatty() else 160
)
_err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)


def _key_store() -> ApiKeyStore:
    ctx = context()
    if ctx.settings.database_url is None:
        ctx.home.ensure()
    return ApiKeyStore(Store(ctx.settings.store_url()))


def _when(moment: datetime.datetime | None) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ") if moment else "never"


def _budget(record: ApiKeyRecord) -> str:
    requests = record.requests_per_minute or "default"
    keys = record.keys_per_minute or "default"
    return f"{requests} requests/min, {keys} keys/min"


@apikey_app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="Client name, e.g. identifier-api.")],
    requests_per_minute: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=BUDGET_MAX_PER_MINUTE,
            help=f"Requests a minute; default PLINGS_REQUESTS_PER_MINUTE "
            f"({REQUESTS_PER_MINUTE_DEFAULT}).",
        ),
    ] = None,
    keys_per_minute: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=BUDGET_MAX_PER_MINUTE,
            help=f"Keys derived or signed with a minute; default PLINGS_KEYS_PER_MINUTE "
            f"({KEYS_PER_MINUTE_DEFAULT}).",
        ),
    ] = None,
) -> None:
    """Create an API key and print it once on standard output; only its hash is stored."""
    record, key = _key_store().create(
        name, requests_per_minute=requests_per_minute, keys_per_minute=keys_per_minute
    )
    _err.print(
        f"API key {record.key_id} for {record.name!r} created ({_budget(record)}). "
        "It is shown once, below; store it now."
    )
    sys.stdout.write(key.reveal_text() + "\n")
    sys.stdout.flush()


@apikey_app.command("list")
def list_command(
    include_revoked: Annotated[bool, typer.Option("--all", help="Show revoked keys too.")] = False,
) -> None:
    """List API keys: key id, name, created, last used, budget and status; never the key."""
    records = _key_store().list_keys(include_revoked=include_revoked)
    table = Table("key id", "name", "created", "last used", "budget", "status")
    for record in records:
        status = f"revoked {_when(record.revoked_at)}" if record.revoked_at else "active"
        table.add_row(
            record.key_id,
            record.name,
            _when(record.created_at),
            _when(record.last_used_at),
            _budget(record),
            status,
        )
    _out.print(table)


@apikey_app.command("budget")
def budget(
    name_or_id: Annotated[str, typer.Argument(help="Client name or key id of an active key.")],
    requests_per_minute: Annotated[
        int | None,
        typer.Option(min=1, max=BUDGET_MAX_PER_MINUTE, help="Requests a minute."),
    ] = None,
    keys_per_minute: Annotated[
        int | None,
        typer.Option(
            min=1, max=BUDGET_MAX_PER_MINUTE, help="Keys derived or signed with a minute."
        ),
    ] = None,
) -> None:
    """Set a key's budget; an option left out goes back to the service default."""
    record = _key_store().set_budget(
        name_or_id, requests_per_minute=requests_per_minute, keys_per_minute=keys_per_minute
    )
    _out.print(f"API key {record.key_id} of {record.name!r}: {_budget(record)}")


@apikey_app.command("revoke")
def revoke(
    name_or_id: Annotated[str, typer.Argument(help="Client name or key id of an active key.")],
) -> None:
    """Revoke an API key; a running service rejects it within 5 seconds."""
    record = _key_store().revoke(name_or_id)
    _out.print(f"API key {record.key_id} of {record.name!r} revoked at {_when(record.revoked_at)}")
