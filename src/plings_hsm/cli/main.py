"""Entry point of the ``plings-hsm`` command: runs a command, maps errors to exit codes."""

from __future__ import annotations

import os
import sys

import structlog

from plings_hsm.cli import (  # noqa: F401 - registers commands
    apikey_cmd,
    derive_cmd,
    migrate_cmd,
    serve_cmd,
    token_cmds,
)
from plings_hsm.cli.app import app
from plings_hsm.cli.exit_codes import EXIT_INTERNAL, exit_code_of
from plings_hsm.errors import ConfigError, PlingsHsmError
from plings_hsm.logs import LOG_LEVELS, configure_logging

__all__ = ["main"]

log = structlog.get_logger(__name__)


def main() -> None:
    """Run the CLI; user errors print one line on stderr and exit non-zero, no traceback.

    Typer handles usage errors itself (exit 2); product errors map through
    :func:`~plings_hsm.cli.exit_codes.exit_code_of`.
    """
    level = os.environ.get("PLINGS_LOG_LEVEL", "").strip().upper() or "WARNING"
    if level not in LOG_LEVELS:
        print(
            f"error: PLINGS_LOG_LEVEL {level!r} is not a log level; use one of "
            f"{', '.join(LOG_LEVELS)}",
            file=sys.stderr,
        )
        sys.exit(exit_code_of(ConfigError("")))
    configure_logging(level)
    try:
        app(prog_name="plings-hsm")
    except BrokenPipeError:
        # The reader went away (derive | head); stop quietly like other Unix filters.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(0)
    except PlingsHsmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exit_code_of(exc))
    except NotImplementedError as exc:
        print(f"error: not implemented: {exc}", file=sys.stderr)
        sys.exit(EXIT_INTERNAL)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:
        log.error("command_failed", error=type(exc).__name__)
        print(
            f"error: internal error ({type(exc).__name__}); rerun with PLINGS_LOG_LEVEL=DEBUG",
            file=sys.stderr,
        )
        if os.environ.get("PLINGS_LOG_LEVEL", "").upper() == "DEBUG":
            raise
        sys.exit(EXIT_INTERNAL)
