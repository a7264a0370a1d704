"""Commands on the token: ``token init|status``, ``keys import|list`` and ``doctor``."""

from __future__ import annotations

import getpass
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from plings_hsm.backends.pkcs11 import REQUIRED_MECHANISMS, Pkcs11Backend
from plings_hsm.backends.token import read_token_info
from plings_hsm.backends.token_init import init_token
from plings_hsm.cli.app import app, context, keys_app, token_app
from plings_hsm.cli.context import output_console, value_table
from plings_hsm.cli.exit_codes import EXIT_CHECK_FAILED
from plings_hsm.core.path import INDEX_MAX
from plings_hsm.core.seed import decode_master_key
from plings_hsm.errors import DuplicateTokenError, PlingsHsmError, TokenNotFoundError
from plings_hsm.secrets import Secret

__all__ = ["DoctorCheck", "run_doctor"]

_out = output_console()

WalletOption = Annotated[
    int, typer.Option("--wallet", min=0, max=INDEX_MAX, help="Wallet version (0 to 2^31 - 1).")
]


@token_app.command("init")
def token_init(
    label: Annotated[
        str | None, typer.Option(help="Token label; default PLINGS_TOKEN_LABEL.")
    ] = None,
) -> None:
    """Initialise the token (SO and user PIN from SOFTHSM_SO_PIN and SOFTHSM_USER_PIN)."""
    ctx = context()
    conf = ctx.softhsm_conf()
    token_label = label or ctx.settings.token_label
    created = init_token(
        ctx.settings.module_path(), token_label, ctx.so_pin(), ctx.user_pin(), conf
    )
    _out.print(
        f"token {token_label!r} {'initialised' if created else 'exists already; nothing changed'}"
    )


@token_app.command("status")
def token_status(
    label: Annotated[
        str | None, typer.Option(help="Token label; default PLINGS_TOKEN_LABEL.")
    ] = None,
) -> None:
    """Show the token's public facts: label, serial, flags, library."""
    ctx = context()
    ctx.softhsm_conf()
    info = read_token_info(ctx.settings.module_path(), label or ctx.settings.token_label)
    table = value_table("field", "value")
    for name, value in info.items():
        table.add_row(name, str(value))
    _out.print(table)


def _read_master_text() -> tuple[Secret, str]:
    """Return the master text and the name of its source, for error messages."""
    ctx = context()
    if ctx.settings.master_key is not None:
        return ctx.settings.master_key, "PLINGS_MASTER_KEY"
    if sys.stdin.isatty():
        return Secret(getpass.getpass("master key (base58, not echoed): ")), "master key input"
    return Secret(sys.stdin.buffer.read()), "master key on standard input"


@keys_app.command("import")
def keys_import(wallet: WalletOption = 1) -> None:
    """Import the env master into the token as wallet N.

    Reads PLINGS_MASTER_KEY from the environment, else from standard input.
    """
    ctx = context()
    text, source = _read_master_text()
    seed = decode_master_key(text.reveal(), variable=source)
    backend = ctx.pkcs11_backend()
    try:
        result = backend.import_master(wallet, seed)
    finally:
        seed[:] = bytes(len(seed))
        backend.close()
    if result.created:
        _out.print(f"wallet {wallet} imported as {result.label}; fingerprint {result.fingerprint}")
    else:
        _out.print(
            f"wallet {wallet} already holds this master ({result.label}); nothing changed; "
            f"fingerprint {result.fingerprint}"
        )


@keys_app.command("list")
def keys_list() -> None:
    """List the wallets in the token: version, label, scheme, fingerprint."""
    backend = context().pkcs11_backend()
    try:
        wallets = backend.wallets()
    finally:
        backend.close()
    table = value_table("wallet", "label", "scheme", "fingerprint")
    for info in wallets:
        table.add_row(str(info.version), info.label, str(info.scheme), info.fingerprint)
    _out.print(table)


@dataclass(frozen=True)
class DoctorCheck:
    """One doctor finding: what was checked, whether it passed, and how to fix it."""

    name: str
    ok: bool
    detail: str
    fix: str = ""


def _mode_check(name: str, root: Path) -> DoctorCheck:
    """Check that ``root`` and everything below it is closed to group and others."""
    if not root.exists():
        return DoctorCheck(name, False, f"{root} does not exist", "run 'plings-hsm token init'")
    open_paths = []
    for path in (root, *root.rglob("*")):
        mode = stat.S_IMODE(path.lstat().st_mode)
        if mode & 0o077:
            open_paths.append(f"{path} ({mode:o})")
    if open_paths:
        shown = ", ".join(open_paths[:3]) + (
            f" and {len(open_paths) - 3} more" if len(open_paths) > 3 else ""
        )
        return DoctorCheck(
            name,
            False,
            f"readable by group or others: {shown}",
            f"chmod -R go-rwx {root}",
        )
    return DoctorCheck(name, True, f"{root} and its contents are closed to group and others")


def _token_dir_of(conf: Path) -> Path | None:
    for line in conf.read_text(encoding="utf-8").splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "directories.tokendir":
            return Path(value.strip())
    return None


def run_doctor() -> list[DoctorCheck]:
    """Run every check in order; a failed prerequisite stops the checks that need it."""
    ctx = context()
    checks: list[DoctorCheck] = []

    try:
        module = ctx.settings.module_path()
        found = module.exists()
        checks.append(
            DoctorCheck(
                "pkcs11 module",
                found,
                str(module),
                "" if found else "apt-get install softhsm2, or set PLINGS_PKCS11_MODULE",
            )
        )
    except PlingsHsmError as exc:
        checks.append(DoctorCheck("pkcs11 module", False, str(exc), "apt-get install softhsm2"))
        return checks
    if not found:
        return checks

    try:
        conf = ctx.softhsm_conf()
    except PlingsHsmError as exc:
        checks.append(
            DoctorCheck(
                "softhsm2 config",
                False,
                str(exc),
                "point SOFTHSM2_CONF at an existing config, or unset it",
            )
        )
        return checks
    checks.append(DoctorCheck("softhsm2 config", True, str(conf)))
    token_dir = _token_dir_of(conf)
    if token_dir is None:
        checks.append(
            DoctorCheck("token folder", False, f"{conf} sets no directories.tokendir", "add it")
        )
    else:
        checks.append(_mode_check("token folder modes", token_dir))

    label = ctx.settings.token_label
    try:
        info = read_token_info(module, label)
        checks.append(DoctorCheck("token by label", True, f"{label!r} serial {info['serial']}"))
    except PlingsHsmError as exc:
        fix = (
            "run 'plings-hsm token init'"
            if isinstance(exc, TokenNotFoundError)
            else "relabel or delete the extra token so one token carries the label"
            if isinstance(exc, DuplicateTokenError)
            else "check the module and SOFTHSM2_CONF"
        )
        checks.append(DoctorCheck("token by label", False, str(exc), fix))
        return checks

    backend: Pkcs11Backend | None = None
    try:
        backend = ctx.pkcs11_backend()
        versions = backend.wallet_versions()
        checks.append(DoctorCheck("login", True, "user PIN accepted"))
    except PlingsHsmError as exc:
        checks.append(DoctorCheck("login", False, str(exc), "check SOFTHSM_USER_PIN"))
        if backend is not None:
            backend.close()
        return checks

    try:
        missing = backend.check_mechanisms()
        needed = ", ".join(mechanism.name for mechanism in REQUIRED_MECHANISMS)
        checks.append(
            DoctorCheck(
                "mechanisms",
                not missing,
                f"missing {', '.join(missing)}" if missing else f"offers {needed}",
                "use a token that offers AES key generation and AES key wrap with padding"
                if missing
                else "",
            )
        )
        if not versions:
            checks.append(
                DoctorCheck("wallets", False, "no wallet master", "run 'plings-hsm keys import'")
            )
        for version in versions:
            try:
                attributes = backend.object_attributes(version)
                fingerprint = backend.fingerprint_of(version)
            except PlingsHsmError as exc:
                checks.append(
                    DoctorCheck(f"wallet {version}", False, str(exc), "keep one object per label")
                )
                continue
            protected = attributes["private"] and attributes["sensitive"]
            checks.append(
                DoctorCheck(
                    f"wallet {version}",
                    protected and not attributes["modifiable"],
                    f"one object, fingerprint {fingerprint}, attributes {attributes}",
                    "" if protected else "re-import the master: the object must be sensitive",
                )
            )
    finally:
        backend.close()

    if ctx.settings.user_pin is None and (ctx.home.dev_dir / "user.pin").exists():
        checks.append(
            DoctorCheck(
                "user PIN source",
                True,
                "development PIN file in use",
                "production: export SOFTHSM_USER_PIN and delete the dev/ folder",
            )
        )
    return checks


@app.command("doctor")
def doctor() -> None:
    """Check module, config, token folder modes, token, login, mechanisms and wallets."""
    checks = run_doctor()
    table = value_table("check", "result", "detail", "fix")
    for check in checks:
        table.add_row(check.name, "ok" if check.ok else "FAIL", check.detail, check.fix)
    _out.print(table)
    if not all(check.ok for check in checks):
        raise typer.Exit(EXIT_CHECK_FAILED)
    _out.print(f"all {len(checks)} checks passed (SOFTHSM2_CONF={os.environ['SOFTHSM2_CONF']})")
