"""A minimal token backup: the SoftHSM2 token folder, already encrypted under its PINs, archived."""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from plings_hsm.errors import ConfigError
from plings_hsm.home import DIR_MODE, FILE_MODE, write_private_file

__all__ = ["TokenBackup", "find_recent_backup", "make_token_backup", "token_dir_of"]

log = structlog.get_logger(__name__)

BACKUP_PREFIX = "token-"
"""File name prefix of token archives under the backups folder."""


@dataclass(frozen=True, slots=True)
class TokenBackup:
    """An archive of the token folder and the manifest that lists its SHA-256 digests."""

    archive: Path
    manifest: Path
    sha256: str
    created_at: float


def token_dir_of(softhsm2_conf: Path) -> Path:
    """Return ``directories.tokendir`` of a SoftHSM2 configuration file.

    Raises:
        ConfigError: when the file is missing or names no token folder.
    """
    try:
        lines = softhsm2_conf.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read SoftHSM2 config {softhsm2_conf}: {exc.strerror}") from exc
    for line in lines:
        key, _, value = line.partition("=")
        if key.strip() == "directories.tokendir" and value.strip():
            return Path(value.strip())
    raise ConfigError(f"SoftHSM2 config {softhsm2_conf} sets no directories.tokendir")


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 16), b""):
            digest.update(chunk)
    return digest.hexdigest()


def make_token_backup(token_dir: Path, backups_dir: Path, token_label: str) -> TokenBackup:
    """Archive ``token_dir`` into ``backups_dir`` with mode 0600 and write a SHA-256 manifest.

    The archive contains SoftHSM2's object files as they are on disk. SoftHSM2 encrypts
    them under keys derived from the PINs, so no master is written in plain text.

    NOTE: the archive restores only onto SoftHSM2 with the same PINs. A full backup and
    restore would also wrap the masters under a backup key split among several people,
    test a restore on a spare token by fingerprint, and keep copies off the host.
    """
    if not token_dir.is_dir():
        raise ConfigError(f"token folder {token_dir} does not exist")
    backups_dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    os.chmod(backups_dir, DIR_MODE)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    archive = backups_dir / f"{BACKUP_PREFIX}{token_label}-{stamp}.tar.gz"

    files = sorted(path for path in token_dir.rglob("*") if path.is_file())
    fd = os.open(archive, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    with os.fdopen(fd, "wb") as handle, tarfile.open(fileobj=handle, mode="w:gz") as tar:
        for path in files:
            tar.add(path, arcname=str(path.relative_to(token_dir)))

    digest = _sha256_of(archive)
    created_at = time.time()
    manifest = archive.with_name(archive.name + ".manifest.json")
    body = {
        "archive": archive.name,
        "sha256": digest,
        "token_label": token_label,
        "token_dir": str(token_dir),
        "created_at": created_at,
        "files": [
            {"path": str(path.relative_to(token_dir)), "sha256": _sha256_of(path)} for path in files
        ],
    }
    write_private_file(manifest, json.dumps(body, indent=2).encode("utf-8"))
    log.info("token_backup_created", archive=str(archive), files=len(files), sha256=digest)
    return TokenBackup(archive, manifest, digest, created_at)


def find_recent_backup(backups_dir: Path, token_label: str, max_age_s: float) -> TokenBackup | None:
    """Return the newest intact backup of ``token_label`` younger than ``max_age_s``."""
    if not backups_dir.is_dir():
        return None
    newest: TokenBackup | None = None
    for manifest in backups_dir.glob(f"{BACKUP_PREFIX}{token_label}-*.manifest.json"):
        try:
            body = json.loads(manifest.read_text(encoding="utf-8"))
            archive = manifest.with_name(str(body["archive"]))
            created_at = float(body["created_at"])
            sha256 = str(body["sha256"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if time.time() - created_at > max_age_s or not archive.is_file():
            continue
        if _sha256_of(archive) != sha256:
            log.warning("token_backup_corrupt", archive=str(archive))
            continue
        if newest is None or created_at > newest.created_at:
            newest = TokenBackup(archive, manifest, sha256, created_at)
    return newest
