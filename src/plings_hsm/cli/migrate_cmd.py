"""``plings-hsm migrate``, ``rollback``, ``validate`` and ``identifier serve``: the runbook."""

from __future__ import annotations

import getpass
import os
import ssl
import time
from pathlib import Path
from typing import Annotated

import click
import httpx
import typer
from rich.console import Console
from rich.table import Table

from plings_hsm.backends.env import EnvBackend
from plings_hsm.backends.remote import RemoteBackend
from plings_hsm.cli.app import app, context
from plings_hsm.cli.exit_codes import EXIT_CHECK_FAILED
from plings_hsm.cli.serve_cmd import _tls_files
from plings_hsm.errors import ConfigError, InvalidRequestError
from plings_hsm.home import DIR_MODE
from plings_hsm.identifier.build import build_identifier
from plings_hsm.logs import configure_logging
from plings_hsm.manager.backup import token_dir_of
from plings_hsm.manager.checks import Check, run_preflight, run_validate
from plings_hsm.manager.config import ManagerSettings
from plings_hsm.manager.migration import REMOVE_CONFIRMATION, Runbook, check_reason, describe
from plings_hsm.manager.notify import Notifier
from plings_hsm.service.server import ServiceServer, check_port_free, tls_config
from plings_hsm.store.audit import audit_head
from plings_hsm.store.db import Store
from plings_hsm.store.migration import MigrationState, latest_gate_readings, step_stats

__all__ = ["audit_app", "identifier_app", "migrate_app"]

_out = Console(highlight=False, soft_wrap=True, markup=False)

migrate_app = typer.Typer(
    help="Move from the env master to the HSM: preflight, start, advance, run, finalize.",
    no_args_is_help=True,
)
identifier_app = typer.Typer(help="Run the identifier API.", no_args_is_help=True)
audit_app = typer.Typer(help="Read the audit log.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")
app.add_typer(migrate_app, name="migrate")
app.add_typer(identifier_app, name="identifier")

ActorOption = Annotated[
    str | None,
    typer.Option(help="Name written into the audit log; default PLINGS_ACTOR or the login name."),
]


def _actor(given: str | None) -> str:
    return given or os.environ.get("PLINGS_ACTOR", "").strip() or getpass.getuser()


def _manager_settings() -> ManagerSettings:
    return ManagerSettings.from_env()


def _store() -> Store:
    ctx = context()
    if ctx.settings.database_url is None:
        ctx.home.root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    return Store(ctx.settings.store_url())


def _runbook(actor: str | None) -> Runbook:
    settings = _manager_settings()
    return Runbook(
        _store(),
        settings,
        Notifier(settings.webhook_urls, settings.webhook_timeout_s),
        _actor(actor),
    )


def _show_state(state: MigrationState, runbook: Runbook) -> None:
    table = Table("field", "value")
    table.add_row("mode", state.mode)
    table.add_row("percentage", f"{state.percentage} %")
    table.add_row("whitelist", f"{len(state.whitelist)} user id(s)")
    table.add_row("step", f"{state.step} (number {state.step_number})")
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(state.step_started_at))
    table.add_row("step started", f"{started}, {time.time() - state.step_started_at:.0f} s ago")
    table.add_row("fallback", "on" if state.fallback_enabled else "off")
    table.add_row("env master", "removed" if state.env_master_removed else "present")
    table.add_row("expected fingerprint", state.expected_fingerprint or "-")
    table.add_row("state version", f"{state.version} by {state.updated_by}")
    stats = step_stats(runbook.store, state.step_number)
    table.add_row(
        "this step",
        f"{stats.served} served, {stats.compared} compared, {stats.mismatches} mismatched, "
        f"{stats.errors} HSM errors, {stats.rate_limited} answered 429 by the HSM, "
        f"{stats.fallbacks} fallbacks",
    )
    for reading in latest_gate_readings(runbook.store, limit=3):
        verdict = "passed" if reading.passed else "FAILED"
        table.add_row(f"gate {reading.step}", f"{verdict}: {reading.reason}")
    _out.print(table)


def _show_checks(title: str, checks: list[Check]) -> bool:
    table = Table("check", "result", "detail", title=title)
    for check in checks:
        table.add_row(check.name, "pass" if check.ok else "FAIL", check.detail)
    _out.print(table)
    return all(check.ok for check in checks)


@migrate_app.command("status")
def status(actor: ActorOption = None) -> None:
    """Show the migration state, the current step's counts and the latest gate readings."""
    runbook = _runbook(actor)
    _show_state(runbook.status(), runbook)


@migrate_app.command("preflight")
def preflight(actor: ActorOption = None) -> None:
    """Check the env master, the token, both fingerprints, the HSM service, a backup and the store.

    Exits 9 when any check fails.
    """
    ctx = context()
    settings = _manager_settings()
    master = ctx.settings.master_key
    checks = run_preflight(
        settings=settings,
        store=_store(),
        master_key=master,
        token_backend=ctx.pkcs11_backend,
        token_label=ctx.settings.token_label,
        token_dir=lambda: token_dir_of(ctx.softhsm_conf()),
        backups_dir=ctx.home.root / "backups",
        actor=_actor(actor),
    )
    if not _show_checks("preflight", checks):
        raise typer.Exit(EXIT_CHECK_FAILED)


def _hsm_backend(settings: ManagerSettings) -> RemoteBackend:
    if settings.hsm_endpoint is None:
        raise ConfigError("HSM_ENDPOINT is not set; migrate start compares the HSM's fingerprint")
    if settings.hsm_api_key is None:
        raise ConfigError("HSM_API_KEY is not set; the HSM service needs it")
    return RemoteBackend(
        settings.hsm_endpoint,
        settings.hsm_api_key,
        settings.hsm_ca_file,
        timeout_s=settings.hsm_timeout_s,
        deadline_s=settings.hsm_deadline_s,
        retries=settings.hsm_retries,
        backoff_s=settings.hsm_backoff_s,
    )


@migrate_app.command("start")
def start(actor: ActorOption = None) -> None:
    """Enter dual mode at 0 % once the HSM service shows the env master's wallet fingerprint.

    Exits 21 when the HSM service cannot be reached or shows another fingerprint.
    """
    settings = _manager_settings()
    if settings.master_key is None:
        raise ConfigError("PLINGS_MASTER_KEY is not set; migrate start records its fingerprint")
    env = EnvBackend(settings.master_key, wallets=(settings.default_wallet,))
    try:
        fingerprint = env.wallet_fingerprint(settings.default_wallet)
    finally:
        env.close()
    hsm = _hsm_backend(settings)
    try:
        state = _runbook(actor).start(fingerprint, hsm)
    finally:
        hsm.close()
    _out.print(f"migration started: {describe(state)}; expected fingerprint {fingerprint}")


@migrate_app.command("advance")
def advance(
    to: Annotated[
        int | None,
        typer.Option(
            min=1, max=100, help="Rollout percentage; default the next of 5, 25, 50, 100."
        ),
    ] = None,
    actor: ActorOption = None,
) -> None:
    """Raise the rollout percentage by hand."""
    state = _runbook(actor).advance(to)
    _out.print(f"rollout advanced: {describe(state)}")


@migrate_app.command("run")
def run(
    soak: Annotated[
        float | None,
        typer.Option(min=0, help="Seconds each step is held; default PLINGS_MIGRATION_SOAK_S."),
    ] = None,
    poll: Annotated[
        float | None,
        typer.Option(min=0.05, help="Seconds between checks; default PLINGS_STATE_POLL_S."),
    ] = None,
    actor: ActorOption = None,
) -> None:
    """Hold 5, 25, 50 and 100 % in turn, each passed only through its gate.

    A failed gate or a mismatch rolls back to env by itself and exits 9.
    """
    runbook = _runbook(actor)
    result = runbook.run(soak, poll, progress=_out.print)
    _out.print(result.message)
    if not result.ok:
        raise typer.Exit(EXIT_CHECK_FAILED)


@migrate_app.command("finalize")
def finalize(actor: ActorOption = None) -> None:
    """Switch every service to hsm once 100 % has soaked and passed its gate."""
    state = _runbook(actor).finalize()
    _out.print(f"migration finalized: {describe(state)}")


@migrate_app.command("remove-env-master")
def remove_env_master(
    confirm: Annotated[
        str | None,
        typer.Option(help=f"Type {REMOVE_CONFIRMATION!r} to confirm without a prompt."),
    ] = None,
    actor: ActorOption = None,
) -> None:
    """Record that the env master is gone; services drop it and never fall back to it.

    Delete PLINGS_MASTER_KEY from the services' environments and env files afterwards;
    rollback then needs it supplied again.
    """
    runbook = _runbook(actor)
    runbook.check_removable()
    typed = confirm
    if typed is None:
        try:
            typed = typer.prompt(f"Type {REMOVE_CONFIRMATION!r} to confirm")
        except (typer.Abort, click.exceptions.Abort) as exc:
            raise typer.BadParameter(
                f"no confirmation given; type {REMOVE_CONFIRMATION!r} or pass --confirm",
                param_hint="--confirm",
            ) from exc
    if typed != REMOVE_CONFIRMATION:
        raise typer.BadParameter(
            f"confirmation {typed[:40]!r} does not match; type exactly {REMOVE_CONFIRMATION!r}",
            param_hint="--confirm",
        )
    state = runbook.remove_env_master(typed)
    _out.print(
        f"env master removed: {describe(state)}. Delete PLINGS_MASTER_KEY from every service "
        "environment and env file, then run 'plings-hsm validate'"
    )


WAIT_TIMEOUT_S = 30.0
"""How long ``rollback --wait`` polls the identifier APIs before it gives up."""


def _checked_urls(urls: list[str]) -> list[str]:
    """Return the identifier API URLs, or stop with exit 2 naming the first invalid one."""
    for url in urls:
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL:
            parsed = None
        if parsed is None or parsed.scheme not in ("https", "http") or not parsed.host:
            raise typer.BadParameter(
                f"{url!r} is not an http(s) URL of an identifier API, such as "
                "https://127.0.0.1:8444",
                param_hint="--url",
            )
    return urls


def _serves_env(client: httpx.Client, url: str) -> bool:
    try:
        response = client.get(f"{url.rstrip('/')}/health")
        body = response.json()
    except (httpx.HTTPError, ValueError):
        return False
    if response.status_code != 200 or not isinstance(body, dict):
        return False
    return body.get("mode") == "env" and body.get("serving", "env") == "env"


def _wait_for_env(urls: list[str], ca_file: Path | None, started: float) -> list[str]:
    """Poll each URL's /health until it is 200 and serves env; return those that never did."""
    pending = list(urls)
    verify = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    with httpx.Client(verify=verify, timeout=5.0) as client:
        while pending and time.monotonic() - started < WAIT_TIMEOUT_S:
            pending = [url for url in pending if not _serves_env(client, url)]
            if pending:
                time.sleep(0.05)
    return pending


@app.command("rollback")
def rollback(
    reason: Annotated[str, typer.Option(help="Why; written into the audit log and the notice.")] = (
        "manual rollback"
    ),
    wait: Annotated[
        bool,
        typer.Option(
            "--wait",
            help="Poll the identifier APIs' /health until each serves env, and print the time.",
        ),
    ] = False,
    url: Annotated[
        list[str] | None,
        typer.Option(
            help="Identifier API to poll with --wait; repeat it; default PLINGS_IDENTIFIER_URL."
        ),
    ] = None,
    actor: ActorOption = None,
) -> None:
    """Switch every running service back to env from any step, within one poll interval.

    After remove-env-master, PLINGS_MASTER_KEY must be set again in this command's
    environment, with the fingerprint recorded at migrate start.
    """
    try:
        check_reason(reason)
    except InvalidRequestError as exc:
        raise typer.BadParameter(str(exc), param_hint="--reason") from exc
    settings = _manager_settings()
    urls = _checked_urls(url or [settings.identifier_url]) if wait else []
    fingerprint = None
    if settings.master_key is not None:
        env = EnvBackend(settings.master_key, wallets=(settings.default_wallet,))
        try:
            fingerprint = env.wallet_fingerprint(settings.default_wallet)
        finally:
            env.close()
    runbook = _runbook(actor)
    before = runbook.status()
    started = time.monotonic()
    after = runbook.rollback(reason, master_fingerprint=fingerprint)
    if after.version == before.version:
        _out.print(f"already on env: {describe(after)}")
        return
    _out.print(
        f"rolled back: {describe(before)} -> {describe(after)}; running services follow within "
        f"{settings.state_poll_s:g} s"
    )
    if before.env_master_removed:
        _out.print("services started without PLINGS_MASTER_KEY must be restarted with it")
    if not wait:
        return
    pending = _wait_for_env(urls, settings.identifier_ca_file, started)
    if pending:
        _out.print(
            f"the rollback is stored, but these identifier APIs did not answer /health 200 "
            f"serving env within {WAIT_TIMEOUT_S:.0f} s: {', '.join(pending)}. An instance "
            "without PLINGS_MASTER_KEY serves from the verified HSM until restarted with it"
        )
        raise typer.Exit(EXIT_CHECK_FAILED)
    took_s = time.monotonic() - started
    _out.print(
        f"{len(urls)} identifier API(s) serve env, {took_s * 1000:.0f} ms after the rollback"
    )


@app.command("validate")
def validate(
    audit_head: Annotated[
        str | None,
        typer.Option(
            help="Row hash from 'plings-hsm audit head', kept outside the store; the audit "
            "check fails when that row is gone."
        ),
    ] = None,
) -> None:
    """Check a finished migration: both services, 100 keys in under 5 s, no env master, audit.

    Exits 9 when any check fails.
    """
    settings = _manager_settings()
    checks = run_validate(
        settings=settings, store=_store(), environ=os.environ, audit_head=audit_head
    )
    if not _show_checks("validate", checks):
        raise typer.Exit(EXIT_CHECK_FAILED)


@audit_app.command("head")
def show_audit_head() -> None:
    """Print the newest audit row's id and hash; keep them outside the store.

    Its hash covers every row before it, so 'plings-hsm validate --audit-head HASH'
    later finds deleted last rows, which the chain alone cannot show.
    """
    with _store().session() as session:
        head = audit_head(session)
    if head is None:
        _out.print("the audit log is empty")
        return
    at = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(head.at))
    _out.print(f"row {head.id} {head.row_hash} {head.action} {at}")


def _check_identifier_port(host: str, port: int) -> None:
    """Raise ConfigError naming PLINGS_IDENTIFIER_PORT when ``host:port`` cannot be bound."""
    try:
        check_port_free(host, port)
    except ConfigError as exc:
        cause = exc.__cause__
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else "in use"
        raise ConfigError(
            f"cannot listen on {host}:{port}: {reason}; stop the other process or set "
            "PLINGS_IDENTIFIER_PORT (or --port) to a free port"
        ) from exc


@identifier_app.command("serve")
def serve_identifier(
    host: Annotated[
        str | None, typer.Option(help="Listen address; default PLINGS_IDENTIFIER_HOST.")
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(min=1, max=65535, help="TCP port; default PLINGS_IDENTIFIER_PORT."),
    ] = None,
) -> None:
    """Run the identifier API over HTTPS until SIGINT or SIGTERM."""
    configure_logging(os.environ.get("PLINGS_LOG_LEVEL", "INFO"))
    ctx = context()
    settings = _manager_settings()
    stack = build_identifier(settings, _store(), instance=f"identifier:{os.getpid()}")
    try:
        tls = _tls_files(ctx)
        _check_identifier_port(host or settings.identifier_host, port or settings.identifier_port)
        config = tls_config(
            stack.app,
            host or settings.identifier_host,
            port or settings.identifier_port,
            tls.server_cert,
            tls.server_key,
        )
        ServiceServer(config, name="identifier-api").run()
    finally:
        stack.close()
