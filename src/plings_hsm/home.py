"""The embedded setup's state folder (``PLINGS_HSM_HOME``) and its files.

Layout, every folder 0700 and every file 0600::

    softhsm2.conf     SoftHSM2 config pointing at tokens/
    tokens/           SoftHSM2 token directory
    tls/              local CA and the service certificate
    dev/              development-only secrets: user.pin, so.pin, master.key, api.key

``dev/`` exists for the local demo alone. Production takes PINs and the env master from
its environment and never keeps them beside the token folder: the token folder plus the
user PIN is the seed.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

import base58

from plings_hsm.errors import ConfigError
from plings_hsm.secrets import Secret

__all__ = ["DIR_MODE", "FILE_MODE", "Home", "write_private_file"]

DIR_MODE = 0o700
"""Mode of every folder under the home."""

FILE_MODE = 0o600
"""Mode of every file under the home."""

DEV_SEED_BYTES = 32
"""Length of the generated demo env master."""


def write_private_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically with mode 0600, never readable by others."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _make_private_folder(folder: Path) -> None:
    try:
        folder.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        os.chmod(folder, DIR_MODE)
    except (FileExistsError, NotADirectoryError) as exc:
        raise ConfigError(
            f"cannot create folder {folder}: a file is in the way; set PLINGS_HSM_HOME to a folder"
        ) from exc
    except PermissionError as exc:
        raise ConfigError(
            f"cannot create folder {folder}: permission denied; "
            "set PLINGS_HSM_HOME to a writable folder"
        ) from exc


class Home:
    """Paths under the state folder, and the steps that create them."""

    def __init__(self, root: Path) -> None:
        self.root = root.absolute()

    @property
    def softhsm_conf(self) -> Path:
        """SoftHSM2 configuration of the embedded token directory."""
        return self.root / "softhsm2.conf"

    @property
    def token_dir(self) -> Path:
        """SoftHSM2 token directory."""
        return self.root / "tokens"

    @property
    def tls_dir(self) -> Path:
        """Local CA and service certificate."""
        return self.root / "tls"

    @property
    def dev_dir(self) -> Path:
        """Development-only secrets of the local demo."""
        return self.root / "dev"

    def ensure(self) -> None:
        """Create the folders with mode 0700 and the SoftHSM2 config; keep what exists.

        Raises:
            ConfigError: when a folder cannot be created, e.g. the home is a file.
        """
        for folder in (self.root, self.token_dir, self.tls_dir):
            _make_private_folder(folder)
        if not self.softhsm_conf.exists():
            conf = (
                f"directories.tokendir = {self.token_dir}\n"
                "objectstore.backend = file\n"
                "log.level = ERROR\n"
                "slots.removable = false\n"
            )
            write_private_file(self.softhsm_conf, conf.encode("utf-8"))

    def dev_secret(self, name: str, generate: Callable[[], bytes]) -> Secret:
        """Return the development secret ``dev/{name}``, generating it on first use."""
        path = self.dev_dir / name
        if not path.exists():
            _make_private_folder(self.dev_dir)
            write_private_file(path, generate())
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise ConfigError(f"{path} has mode {mode:o}; need 600 (run chmod 600 {path})")
        return Secret(path.read_bytes().strip())

    def dev_user_pin(self) -> Secret:
        """Development user PIN of the demo token."""
        return self.dev_secret("user.pin", lambda: secrets.token_hex(16).encode("ascii"))

    def dev_so_pin(self) -> Secret:
        """Development security officer PIN of the demo token."""
        return self.dev_secret("so.pin", lambda: secrets.token_hex(16).encode("ascii"))

    def dev_master_key(self) -> Secret:
        """Development env master, base58 text of a random 32-byte seed."""
        return self.dev_secret(
            "master.key", lambda: base58.b58encode(secrets.token_bytes(DEV_SEED_BYTES))
        )

    def dev_api_key(self) -> Secret:
        """Development API key of the demo service."""
        return self.dev_secret("api.key", lambda: secrets.token_urlsafe(32).encode("ascii"))
