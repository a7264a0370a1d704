"""``plings-hsm derive``: derive keys from the env master or the token and print them."""

from __future__ import annotations

import csv
import enum
import json
import sys
from collections.abc import Iterator
from typing import Annotated, TextIO

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

from plings_hsm.backends.base import KeyBackend
from plings_hsm.cli.app import app, context
from plings_hsm.core.batch import DerivedKey, check_instance_range
from plings_hsm.core.path import INDEX_MAX, BatchPrefix, parse_path
from plings_hsm.errors import InvalidRequestError

__all__ = ["BackendChoice", "OutputFormat", "write_keys"]

PROGRESS_MIN_KEYS = 10_000
"""Batches at least this long show a progress bar on standard error."""

CLI_QUANTITY_MAX = INDEX_MAX
"""The CLI streams, so its only limit is the index range."""


class BackendChoice(enum.StrEnum):
    """Source of the master: the environment or the token."""

    ENV = "env"
    PKCS11 = "pkcs11"


class OutputFormat(enum.StrEnum):
    """Output format of derived keys."""

    TABLE = "table"
    JSON = "json"
    CSV = "csv"
    NDJSON = "ndjson"


def write_keys(
    keys: Iterator[DerivedKey], count: int, output_format: OutputFormat, out: TextIO
) -> int:
    """Write keys to ``out`` as they arrive; no format keeps the whole batch in memory.

    Returns:
        The number of keys written.
    """
    written = 0
    if output_format is OutputFormat.JSON:
        # The wire shape, written piecewise so a long batch streams.
        out.write(f'{{"success": true, "count": {count}, "keys": [')
        for key in keys:
            out.write(("," if written else "") + "\n  " + json.dumps(key.to_wire()))
            written += 1
        out.write("\n]}\n")
    elif output_format is OutputFormat.NDJSON:
        for key in keys:
            out.write(json.dumps(key.to_wire()) + "\n")
            written += 1
    elif output_format is OutputFormat.CSV:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["instanceNumber", "humanReadablePath", "hdPath", "publicKey"])
        for key in keys:
            writer.writerow(
                [
                    key.path.instance,
                    key.path.human_readable,
                    key.path.hd_path,
                    key.public_key_base58,
                ]
            )
            written += 1
    else:
        out.write(f"{'instance':>10}  {'humanReadablePath':<28}  publicKey\n")
        for key in keys:
            out.write(
                f"{key.path.instance:>10}  {key.path.human_readable:<28}  {key.public_key_base58}\n"
            )
            written += 1
    return written


def _with_progress(keys: Iterator[DerivedKey], total: int) -> Iterator[DerivedKey]:
    console = Console(stderr=True)
    columns = (BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("deriving", total=total)
        for key in keys:
            yield key
            bar.advance(task)


def _open_backend(choice: BackendChoice) -> KeyBackend:
    ctx = context()
    if choice is BackendChoice.ENV:
        return ctx.env_backend()
    return ctx.pkcs11_backend()


@app.command("derive")
def derive(
    path: Annotated[
        str | None,
        typer.Option(help="Full path m/44'/501'/w'/m'/c'/class'/batch'/instance'; one key."),
    ] = None,
    manufacturer: Annotated[int | None, typer.Option(min=0, max=INDEX_MAX)] = None,
    category: Annotated[int | None, typer.Option(min=0, max=INDEX_MAX)] = None,
    class_id: Annotated[int | None, typer.Option("--class", min=0, max=INDEX_MAX)] = None,
    batch: Annotated[int | None, typer.Option(min=0, max=INDEX_MAX)] = None,
    wallet: Annotated[int | None, typer.Option(min=0, max=INDEX_MAX)] = None,
    start: Annotated[int, typer.Option(min=0, max=INDEX_MAX, help="First instance.")] = 1,
    quantity: Annotated[int, typer.Option(min=1, max=INDEX_MAX, help="Number of keys.")] = 1,
    backend: Annotated[BackendChoice, typer.Option(help="Source of the master.")] = (
        BackendChoice.PKCS11
    ),
    output_format: Annotated[OutputFormat, typer.Option("--format")] = OutputFormat.TABLE,
) -> None:
    """Derive keys by full path or by batch levels, and print them."""
    ctx = context()
    levels = {
        "--manufacturer": manufacturer,
        "--category": category,
        "--class": class_id,
        "--batch": batch,
    }
    if path is not None:
        given = [name for name, value in levels.items() if value is not None]
        if given or wallet is not None:
            raise InvalidRequestError(f"--path excludes {', '.join(given) or '--wallet'}")
        full = parse_path(path)
        prefix, start, quantity = full.prefix, full.instance, 1
    else:
        if manufacturer is None or category is None or class_id is None or batch is None:
            missing = [name for name, value in levels.items() if value is None]
            raise InvalidRequestError(f"missing {', '.join(missing)} (or give --path)")
        prefix = BatchPrefix(
            ctx.settings.default_wallet if wallet is None else wallet,
            manufacturer,
            category,
            class_id,
            batch,
        )
    check_instance_range(start, quantity, CLI_QUANTITY_MAX)

    key_backend = _open_backend(backend)
    try:
        keys = key_backend.iter_keys(prefix, start, quantity)
        if quantity >= PROGRESS_MIN_KEYS:
            keys = _with_progress(keys, quantity)
        write_keys(keys, quantity, output_format, sys.stdout)
    finally:
        key_backend.close()
