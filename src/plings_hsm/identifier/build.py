"""Wiring of the identifier API from typed settings: backends, key manager, runbook, app."""

from __future__ import annotations

from dataclasses import dataclass

import structlog
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from plings_hsm.backends.base import KeyBackend
from plings_hsm.backends.env import EnvBackend
from plings_hsm.backends.remote import RemoteBackend
from plings_hsm.errors import ConfigError
from plings_hsm.identifier.app import IdentifierConfig, create_identifier_app
from plings_hsm.manager.config import KeyManagementMode, ManagerSettings
from plings_hsm.manager.key_manager import KeyManager
from plings_hsm.manager.metrics import ManagerMetrics
from plings_hsm.manager.migration import Runbook, open_state
from plings_hsm.manager.notify import Notifier
from plings_hsm.store.db import Store

__all__ = ["IdentifierStack", "build_identifier"]

log = structlog.get_logger(__name__)


@dataclass
class IdentifierStack:
    """The identifier app with the key manager it serves from; close it when done."""

    app: FastAPI
    manager: KeyManager
    runbook: Runbook

    def close(self) -> None:
        """Stop following the state and close both backends."""
        self.manager.close()


def _remote(settings: ManagerSettings) -> RemoteBackend | None:
    if settings.hsm_endpoint is None:
        return None
    if settings.hsm_api_key is None:
        raise ConfigError("HSM_ENDPOINT is set but HSM_API_KEY is not; the HSM service needs it")
    return RemoteBackend(
        settings.hsm_endpoint,
        settings.hsm_api_key,
        settings.hsm_ca_file,
        timeout_s=settings.hsm_timeout_s,
        deadline_s=settings.hsm_deadline_s,
        retries=settings.hsm_retries,
        backoff_s=settings.hsm_backoff_s,
    )


def build_identifier(
    settings: ManagerSettings, store: Store, instance: str = "identifier"
) -> IdentifierStack:
    """Build every part the identifier API needs, whatever the starting mode, and start the manager.

    Raises:
        ConfigError: when the stored mode needs a source that is not configured, or keys
            are missing.
        MasterKeyFormatError: when PLINGS_MASTER_KEY is not base58 of 16 to 64 bytes.
    """
    state = open_state(store, settings, instance)
    env_backend: KeyBackend | None = None
    if settings.master_key is not None and not state.env_master_removed:
        env_backend = EnvBackend(settings.master_key, wallets=(settings.default_wallet,))
    elif settings.master_key is not None:
        log.warning(
            "env_master_ignored", instance=instance, reason="removed in the migration state"
        )
    hsm_backend = _remote(settings)

    if state.mode in (KeyManagementMode.ENV, KeyManagementMode.DUAL) and env_backend is None:
        raise ConfigError(
            f"the migration state is {state.mode}, which needs PLINGS_MASTER_KEY; set it or "
            "finish the migration first"
        )
    if state.mode in (KeyManagementMode.DUAL, KeyManagementMode.HSM) and hsm_backend is None:
        raise ConfigError(f"the migration state is {state.mode}, which needs HSM_ENDPOINT")

    registry = CollectorRegistry()
    metrics = ManagerMetrics(registry)
    notifier = Notifier(settings.webhook_urls, settings.webhook_timeout_s)
    manager = KeyManager(
        store,
        env_backend=env_backend,
        hsm_backend=hsm_backend,
        poll_s=settings.state_poll_s,
        fallback_enabled=settings.fallback_enabled,
        metrics=metrics,
        notifier=notifier,
        instance=instance,
        default_wallet=settings.default_wallet,
    )
    runbook = Runbook(store, settings, notifier, actor=f"admin-api:{instance}")
    admin_keys = (settings.admin_api_key,) if settings.admin_api_key is not None else ()
    app = create_identifier_app(
        manager,
        runbook,
        metrics,
        IdentifierConfig(
            api_keys=settings.identifier_api_keys,
            admin_api_keys=admin_keys,
            quantity_max=settings.quantity_max,
            default_wallet=settings.default_wallet,
            env_master_configured=settings.master_key is not None,
            body_max_bytes=settings.body_max_bytes,
            json_depth_max=settings.json_depth_max,
            auth_failures_per_minute=settings.auth_failures_per_minute,
        ),
    )
    manager.start()
    return IdentifierStack(app, manager, runbook)
