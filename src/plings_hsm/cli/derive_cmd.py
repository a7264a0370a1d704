"""``plings-hsm derive``: derive keys from the env master or the token and print them."""

from __future__ import annotations

import csv
import enum
import itertools
import json
import re
import sys
from collections.abc import Iterator
from typing import Annotated, TextIO, cast

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


_INDEX_RE = re.compile(r"0|[1-9][0-9]*")
_SHOWN_CHARS_MAX = 24
_BATCH_OPTIONS = ("--manufacturer", "--category", "--class", "--batch")


def _parse_index(option: str, text: str | None, low: int = 0) -> int | None:
    """Parse an option value as a plain decimal index; no sign, underscore or leading zero."""
    if text is None:
        return None
    if _INDEX_RE.fullmatch(text) is None:
        shown = text if len(text) <= _SHOWN_CHARS_MAX else f"{text[:_SHOWN_CHARS_MAX]}..."
        raise InvalidRequestError(
            f"{option} {shown!r} is not a plain decimal number "
            f"(digits only, no sign, no leading zero); allowed {low} to {INDEX_MAX}"
        )
    if len(text) > len(str(INDEX_MAX)) or int(text) > INDEX_MAX or int(text) < low:
        shown = text if len(text) <= _SHOWN_CHARS_MAX else f"{len(text)}-digit number"
        raise InvalidRequestError(f"{option} {shown} is out of range; allowed {low} to {INDEX_MAX}")
    return int(text)


IndexOption = Annotated[str | None, typer.Option(metavar="INDEX", show_default=False)]


@app.command("derive")
def derive(
    path: Annotated[
        str | None,
        typer.Option(help="Full path m/44'/501'/w'/m'/c'/class'/batch'/instance'; one key."),
    ] = None,
    manufacturer: IndexOption = None,
    category: IndexOption = None,
    class_id: Annotated[str | None, typer.Option("--class", metavar="INDEX")] = None,
    batch: IndexOption = None,
    wallet: Annotated[
        str | None,
        typer.Option(metavar="INDEX", help="Wallet version; default PLINGS_DEFAULT_WALLET."),
    ] = None,
    start: Annotated[str | None, typer.Option(metavar="INDEX", help="First instance [1].")] = None,
    quantity: Annotated[str | None, typer.Option(metavar="N", help="Number of keys [1].")] = None,
    backend: Annotated[BackendChoice, typer.Option(help="Source of the master.")] = (
        BackendChoice.PKCS11
    ),
    output_format: Annotated[OutputFormat, typer.Option("--format")] = OutputFormat.TABLE,
) -> None:
    """Derive keys by full path or by batch levels, and print them."""
    ctx = context()
    levels = {
        "--manufacturer": _parse_index("--manufacturer", manufacturer),
        "--category": _parse_index("--category", category),
        "--class": _parse_index("--class", class_id),
        "--batch": _parse_index("--batch", batch),
        "--wallet": _parse_index("--wallet", wallet),
        "--start": _parse_index("--start", start),
        "--quantity": _parse_index("--quantity", quantity, low=1),
    }
    if path is not None:
        given = [name for name, value in levels.items() if value is not None]
        if given:
            raise InvalidRequestError(f"--path names one key; it excludes {', '.join(given)}")
        full = parse_path(path)
        prefix, first, count = full.prefix, full.instance, 1
    else:
        batch_levels = [levels[name] for name in _BATCH_OPTIONS]
        missing = [
            name for name, value in zip(_BATCH_OPTIONS, batch_levels, strict=True) if value is None
        ]
        if missing:
            raise InvalidRequestError(f"missing {', '.join(missing)} (or give --path)")
        chosen_wallet = levels["--wallet"]
        prefix = BatchPrefix(
            ctx.settings.default_wallet if chosen_wallet is None else chosen_wallet,
            *cast(list[int], batch_levels),
        )
        first = 1 if levels["--start"] is None else levels["--start"]
        count = 1 if levels["--quantity"] is None else levels["--quantity"]
    check_instance_range(first, count, CLI_QUANTITY_MAX)

    key_backend = _open_backend(backend)
    try:
        keys = key_backend.iter_keys(prefix, first, count)
        # Derive the first key before printing anything, so a missing wallet, token or
        # login fails with no partial output.
        head = next(keys)
        keys = itertools.chain((head,), keys)
        if count >= PROGRESS_MIN_KEYS:
            keys = _with_progress(keys, count)
        write_keys(keys, count, output_format, sys.stdout)
    finally:
        key_backend.close()
