"""``plings-hsm serve`` and ``plings-hsm demo``: the HSM service, alone or end to end."""

from __future__ import annotations

import os
import ssl
import time
from typing import Annotated

import httpx
import typer

from plings_hsm.backends.env import EnvBackend
from plings_hsm.backends.pkcs11 import Pkcs11Backend
from plings_hsm.backends.token_init import check_pin, init_token
from plings_hsm.cli.app import app, context
from plings_hsm.cli.context import CliContext, output_console, value_table
from plings_hsm.cli.exit_codes import EXIT_CHECK_FAILED
from plings_hsm.core.path import BatchPrefix
from plings_hsm.core.seed import decode_master_key
from plings_hsm.errors import ConfigError
from plings_hsm.logs import configure_logging
from plings_hsm.service.app import create_app
from plings_hsm.service.config import (
    ServiceConfig,
    check_configured_key,
    service_config_from_env,
)
from plings_hsm.service.server import ServiceServer, tls_config
from plings_hsm.service.tls import TlsFiles, ensure_local_tls
from plings_hsm.store.api_keys import ApiKeyStore
from plings_hsm.store.db import Store

__all__ = ["DEMO_BATCH", "DEMO_QUANTITY", "DEMO_TOKEN_LABEL"]

_out = output_console()

DEMO_TOKEN_LABEL = "plings-demo"  # noqa: S105 - a label, not a password
"""Token label of the demo; it never touches the production label."""

DEMO_BATCH = BatchPrefix(wallet=1, manufacturer=1, category=1, class_id=1, batch=99999)
"""The demo batch: manufacturer 1, category 1, class 1, batch 99999 of wallet 1."""

DEMO_QUANTITY = 100
"""Keys the demo derives through the HTTPS API."""

DEMO_ROWS_SHOWN = 5
"""Rows printed from each end of the demo batch."""

HTTP_TIMEOUT_S = 30.0
"""Timeout of the demo's HTTPS calls."""


def _tls_files(ctx: CliContext) -> TlsFiles:
    settings = ctx.settings
    if (settings.tls_cert is None) != (settings.tls_key is None):
        missing = "PLINGS_TLS_KEY" if settings.tls_key is None else "PLINGS_TLS_CERT"
        raise ConfigError(f"{missing} is not set; set PLINGS_TLS_CERT and PLINGS_TLS_KEY together")
    if settings.tls_cert is not None and settings.tls_key is not None:
        ca = settings.tls_ca or settings.tls_cert
        named = {
            "PLINGS_TLS_CERT": settings.tls_cert,
            "PLINGS_TLS_KEY": settings.tls_key,
            "PLINGS_TLS_CA": ca,
        }
        for variable, path in named.items():
            if not path.is_file():
                raise ConfigError(f"{variable} {path} does not exist or is not a file")
        return TlsFiles(ca, settings.tls_cert, settings.tls_key)
    ctx.home.ensure()
    return ensure_local_tls(ctx.home.tls_dir)


def _service_config(ctx: CliContext) -> ServiceConfig:
    """Read the service settings: HSM_API_KEY (when set), the store's API keys, limits."""
    try:
        configured = ctx.api_keys()
    except ConfigError:
        configured = ()
    configured = tuple(check_configured_key("HSM_API_KEY", key) for key in configured)
    if ctx.settings.database_url is None:
        ctx.home.ensure()
    key_store = ApiKeyStore(Store(ctx.settings.store_url()))
    if not configured and not key_store.list_keys(include_revoked=False):
        raise ConfigError(
            "no API key: set HSM_API_KEY or create one with 'plings-hsm apikey create'"
        )
    return service_config_from_env(
        api_keys=configured,
        key_store=key_store,
        default_wallet=ctx.settings.default_wallet,
        quantity_max=ctx.settings.quantity_max,
    )


def _service_log_level() -> None:
    configure_logging(os.environ.get("PLINGS_LOG_LEVEL", "INFO"))


@app.command("serve")
def serve(
    host: Annotated[
        str | None, typer.Option(help="Listen address; default PLINGS_HSM_HOST.")
    ] = None,
    port: Annotated[
        int | None, typer.Option(min=1, max=65535, help="TCP port; default PLINGS_HSM_PORT.")
    ] = None,
) -> None:
    """Run the HSM service over HTTPS on the configured token until SIGINT or SIGTERM."""
    _service_log_level()
    ctx = context()
    backend = ctx.pkcs11_backend()
    try:
        # Fail at start, with the right exit code, when the token, PIN or wallets are
        # wrong, instead of serving 503 until a restart.
        if not backend.wallets():
            raise ConfigError(
                f"token {ctx.settings.token_label!r} contains no wallet; "
                "run 'plings-hsm keys import'"
            )
        service_config = _service_config(ctx)
        tls = _tls_files(ctx)
        server_app = create_app(backend, service_config)
        config = tls_config(
            server_app,
            host or ctx.settings.host,
            port or ctx.settings.port,
            tls.server_cert,
            tls.server_key,
        )
        ServiceServer(config).run()
    finally:
        backend.close()


def _demo_secrets(ctx: CliContext) -> None:
    """Create the development-only PINs, master and API key the demo uses when unset."""
    ctx.home.ensure()
    if ctx.settings.user_pin is None:
        ctx.home.dev_user_pin()
    if ctx.settings.so_pin is None:
        ctx.home.dev_so_pin()
    if ctx.settings.master_key is None:
        ctx.home.dev_master_key()
    if ctx.settings.api_key is None:
        ctx.home.dev_api_key()


def _show_keys(keys: list[dict[str, object]]) -> None:
    table = value_table("instance", "humanReadablePath", "publicKey")
    shown = (
        keys
        if len(keys) <= 2 * DEMO_ROWS_SHOWN
        else [*keys[:DEMO_ROWS_SHOWN], {}, *keys[-DEMO_ROWS_SHOWN:]]
    )
    for key in shown:
        if not key:
            table.add_row("...", f"({len(keys) - 2 * DEMO_ROWS_SHOWN} more)", "...")
            continue
        table.add_row(
            str(key["instanceNumber"]), str(key["humanReadablePath"]), str(key["publicKey"])
        )
    _out.print(table)


@app.command("demo")
def demo() -> None:
    """Run the main job on the embedded default, end to end over HTTPS.

    Initialises token plings-demo if missing, imports wallet 1 from PLINGS_MASTER_KEY
    (else the development master), serves the HSM API on HTTPS, derives 100 keys of
    batch 1.1.C1.99999 through it and compares each with an in-process env derivation.
    """
    configure_logging(os.environ.get("PLINGS_LOG_LEVEL", "WARNING"))
    ctx = context()
    _demo_secrets(ctx)
    conf = ctx.softhsm_conf()
    module = ctx.settings.module_path()
    _out.print(f"home: {ctx.home.root}")
    if ctx.settings.user_pin is None or ctx.settings.master_key is None:
        _out.print(
            f"[development only] PINs, master and API key come from {ctx.home.dev_dir}; "
            "production sets them in its environment"
        )

    user_pin = ctx.user_pin()
    created = init_token(module, DEMO_TOKEN_LABEL, ctx.so_pin(), user_pin, conf)
    _out.print(f"token {DEMO_TOKEN_LABEL!r}: {'initialised' if created else 'present'}")

    backend = Pkcs11Backend(module, DEMO_TOKEN_LABEL, check_pin("SOFTHSM_USER_PIN", user_pin))
    env_backend = EnvBackend(ctx.master_key())
    try:
        if created:
            backend.token.reinitialize()
        seed_fingerprint = env_backend.wallet_fingerprint(DEMO_BATCH.wallet)
        seed = decode_master_key(ctx.master_key().reveal())
        try:
            result = backend.import_master(DEMO_BATCH.wallet, seed)
        finally:
            seed[:] = bytes(len(seed))
        _out.print(
            f"wallet {DEMO_BATCH.wallet}: {'imported' if result.created else 'already imported'}, "
            f"fingerprint {result.fingerprint}"
        )
        mismatches = _serve_and_compare(ctx, backend, env_backend)
    finally:
        backend.close()
        env_backend.close()

    if seed_fingerprint != result.fingerprint:
        _out.print("FAIL: token fingerprint differs from the env master's")
        raise typer.Exit(EXIT_CHECK_FAILED)
    if mismatches:
        _out.print(f"FAIL: {mismatches} of {DEMO_QUANTITY} keys differ from the env derivation")
        raise typer.Exit(EXIT_CHECK_FAILED)
    _out.print(
        f"OK: all {DEMO_QUANTITY} keys served over HTTPS equal the env derivation "
        f"(fingerprint {result.fingerprint})"
    )


def _serve_and_compare(ctx: CliContext, backend: Pkcs11Backend, env_backend: EnvBackend) -> int:
    tls = _tls_files(ctx)
    api_key = check_configured_key("HSM_API_KEY", ctx.api_keys()[0])
    server_app = create_app(
        backend,
        ServiceConfig(
            api_keys=(api_key,), default_wallet=1, quantity_max=ctx.settings.quantity_max
        ),
    )
    server = ServiceServer(
        tls_config(
            server_app, ctx.settings.host, ctx.settings.port, tls.server_cert, tls.server_key
        )
    )
    try:
        server.start()
    except RuntimeError as exc:
        # ServiceServer.start raises RuntimeError when the port is taken or the start
        # timed out, and a free port is the fix for both, not a bug report.
        raise ConfigError(f"{exc}; set PLINGS_HSM_PORT to a free port") from exc
    try:
        verify = ssl.create_default_context(cafile=str(tls.ca_cert))
        with httpx.Client(base_url=server.url, verify=verify, timeout=HTTP_TIMEOUT_S) as client:
            health = client.get("/health").json()
            _out.print(f"service {server.url}: {health['status']}, version {health['version']}")
            started = time.perf_counter()
            response = client.post(
                "/api/derive-keys",
                headers={"Authorization": f"Bearer {api_key.reveal_text()}"},
                json={
                    "manufacturer": DEMO_BATCH.manufacturer,
                    "category": DEMO_BATCH.category,
                    "classId": DEMO_BATCH.class_id,
                    "batch": DEMO_BATCH.batch,
                    "quantity": DEMO_QUANTITY,
                    "walletVersion": DEMO_BATCH.wallet,
                },
            )
            elapsed_ms = (time.perf_counter() - started) * 1000
            response.raise_for_status()
            served = response.json()["keys"]
    finally:
        server.stop()

    expected = [key.to_wire() for key in env_backend.derive_keys(DEMO_BATCH, 1, DEMO_QUANTITY)]
    _show_keys(served)
    mismatches = sum(1 for got, want in zip(served, expected, strict=False) if got != want)
    mismatches += abs(len(served) - len(expected))
    _out.print(
        f"derived {len(served)} keys over HTTPS in {elapsed_ms:.0f} ms; "
        f"compared with the env derivation: {len(expected) - mismatches} equal, {mismatches} differ"
    )
    return mismatches
