"""Building blocks the commands share: settings, home, PINs, backends."""

from __future__ import annotations

import os
from pathlib import Path

import structlog
from rich.console import Console
from rich.table import Column, Table

from plings_hsm.backends.env import EnvBackend
from plings_hsm.backends.pkcs11 import Pkcs11Backend
from plings_hsm.backends.token_init import check_pin
from plings_hsm.errors import ConfigError
from plings_hsm.home import Home
from plings_hsm.secrets import Secret
from plings_hsm.settings import Settings

__all__ = ["PIPED_OUTPUT_COLUMNS", "CliContext", "output_console", "value_table"]

log = structlog.get_logger(__name__)

PIPED_OUTPUT_COLUMNS = 200
"""Width of output written to a pipe or a file; rich assumes 80 columns there."""


def output_console() -> Console:
    """Return the console commands print to, wide when standard output is not a terminal."""
    console = Console(highlight=False, soft_wrap=True, markup=False)
    if not console.is_terminal:
        console.width = PIPED_OUTPUT_COLUMNS
    return console


def value_table(*headers: str) -> Table:
    """Return a table that wraps long cells, such as fingerprints, instead of cutting them."""
    return Table(*(Column(header, overflow="fold") for header in headers))


class CliContext:
    """Settings read once at the edge, and the objects commands build from them."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.home = Home(settings.home)

    def softhsm_conf(self) -> Path:
        """Return the SoftHSM2 config in force and export it for the PKCS#11 module.

        SOFTHSM2_CONF wins when set; otherwise the embedded home's config is created and
        used. SoftHSM reads the variable when the module initialises, so this runs
        before any token call.
        """
        if self.settings.softhsm2_conf is not None:
            conf = self.settings.softhsm2_conf
            if not conf.exists():
                raise ConfigError(
                    f"SOFTHSM2_CONF {conf} does not exist; create it with a "
                    "'directories.tokendir = FOLDER' line, or unset SOFTHSM2_CONF to use "
                    "the one under PLINGS_HSM_HOME"
                )
        else:
            self.home.ensure()
            conf = self.home.softhsm_conf
        os.environ["SOFTHSM2_CONF"] = str(conf)
        return conf

    def _secret_or_dev_file(self, value: Secret | None, variable: str, dev_name: str) -> Secret:
        if value is not None:
            return value
        dev_file = self.home.dev_dir / dev_name
        if dev_file.exists():
            log.warning("development_secret_used", variable=variable, path=str(dev_file))
            return self.home.dev_secret(dev_name, lambda: b"")
        raise ConfigError(f"{variable} is not set; export it before running this command")

    def user_pin(self) -> Secret:
        """Return SOFTHSM_USER_PIN, or the embedded setup's development PIN file."""
        pin = self._secret_or_dev_file(self.settings.user_pin, "SOFTHSM_USER_PIN", "user.pin")
        return check_pin("SOFTHSM_USER_PIN", pin)

    def so_pin(self) -> Secret:
        """Return SOFTHSM_SO_PIN, or the embedded setup's development PIN file."""
        pin = self._secret_or_dev_file(self.settings.so_pin, "SOFTHSM_SO_PIN", "so.pin")
        return check_pin("SOFTHSM_SO_PIN", pin)

    def master_key(self) -> Secret:
        """Return PLINGS_MASTER_KEY, or the embedded setup's development master file."""
        return self._secret_or_dev_file(self.settings.master_key, "PLINGS_MASTER_KEY", "master.key")

    def api_keys(self) -> tuple[Secret, ...]:
        """Return HSM_API_KEY, or the embedded setup's development API key file."""
        return (self._secret_or_dev_file(self.settings.api_key, "HSM_API_KEY", "api.key"),)

    def pkcs11_backend(self, token_label: str | None = None) -> Pkcs11Backend:
        """Open the pkcs11 backend on the configured (or given) token label."""
        self.softhsm_conf()
        return Pkcs11Backend(
            self.settings.module_path(), token_label or self.settings.token_label, self.user_pin()
        )

    def env_backend(self) -> EnvBackend:
        """Build the env backend from PLINGS_MASTER_KEY."""
        return EnvBackend(self.master_key())
