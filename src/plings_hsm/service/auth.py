"""Bearer API keys of the HSM service: configured keys and keys in the state store."""

from __future__ import annotations

import hashlib
import hmac
import threading
from dataclasses import dataclass

from plings_hsm.secrets import Secret
from plings_hsm.service.config import ServiceConfig
from plings_hsm.store.api_keys import ApiKeyStore, has_store_key_prefix

__all__ = [
    "LAST_USED_INTERVAL_S",
    "STORE_KEY_CACHE_S",
    "ApiClient",
    "Authenticator",
    "bearer_token",
]

STORE_KEY_CACHE_S = 5.0
"""Seconds a verified store key is accepted from memory, so a revocation or budget change
takes up to this long to apply. A store lookup on every request halved the request rate."""

VERIFIED_KEYS_MAX = 10_000
"""Remembered store keys before the expired ones are dropped."""

LAST_USED_INTERVAL_S = 60.0
"""A key's last-used time is written at most this often, so a busy key costs no write a request."""


def _digest(key: Secret) -> bytes:
    return hashlib.sha256(key.reveal()).digest()


@dataclass(frozen=True, slots=True)
class ApiClient:
    """An authenticated client: its key id, name and budgets (never the key itself)."""

    key_id: str
    name: str
    requests_per_minute: int
    keys_per_minute: int


def bearer_token(authorization: str | None) -> bytes | None:
    """Return the token of an ``Authorization: Bearer`` header, or ``None``.

    Starlette decodes headers as latin-1, so encoding back gives the bytes on the wire;
    a non-ASCII token stays bytes and simply matches no key.
    """
    if authorization is None:
        return None
    raw = authorization.encode("latin-1")
    scheme, _, token = raw.strip().partition(b" ")
    token = token.strip()
    if scheme.lower() != b"bearer" or not token:
        return None
    return token


class Authenticator:
    """Find the client a bearer token belongs to.

    A token that starts with ``plk_`` is judged by the store alone, so revoking a store
    key takes effect even if a configured key has the same text, and the key's own
    budget applies. Other tokens are compared with the configured keys (HSM_API_KEY) by
    SHA-256 digest in constant time, every one of them on every request. Store keys are
    found by their public key id and compared by digest, then remembered for
    STORE_KEY_CACHE_S under that digest.

    Args:
        config: the service configuration with the configured keys, the store and the
            default budgets.
    """

    def __init__(self, config: ServiceConfig) -> None:
        # Digests of equal length make the comparison time independent of the key length.
        self._static: tuple[tuple[bytes, ApiClient], ...] = tuple(
            (_digest(key), self._static_client(config, index))
            for index, key in enumerate(config.api_keys)
        )
        self._store: ApiKeyStore | None = config.key_store
        self._requests_per_minute = config.budget_requests_per_minute
        self._keys_per_minute = config.budget_keys_per_minute
        self._clock = config.clock
        self._last_written: dict[str, float] = {}
        self._verified: dict[bytes, tuple[ApiClient, float]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _static_client(config: ServiceConfig, index: int) -> ApiClient:
        name = config.static_key_name if index == 0 else f"{config.static_key_name}#{index + 1}"
        return ApiClient(
            key_id=f"config-{index + 1}",
            name=name,
            requests_per_minute=config.budget_requests_per_minute,
            keys_per_minute=config.budget_keys_per_minute,
        )

    @property
    def uses_store(self) -> bool:
        """Whether keys may have to be looked up in the state store."""
        return self._store is not None

    def authenticate_in_memory(self, token: bytes | None) -> ApiClient | None:
        """Return the client of ``token`` if a configured or recently verified key matches.

        ``None`` means only that memory does not know the token; the store may.
        """
        if token is None:
            return None
        presented = hashlib.sha256(token).digest()
        if not has_store_key_prefix(token):
            found: ApiClient | None = None
            for digest, client in self._static:
                if hmac.compare_digest(digest, presented):
                    found = client
            return found

        # A dictionary lookup by the SHA-256 of the token: its timing depends on digest
        # bytes a client cannot choose, not on the bytes of a stored key.
        with self._lock:
            cached = self._verified.get(presented)
        if cached is not None and cached[1] > self._clock():
            return cached[0]
        return None

    def authenticate(self, token: bytes | None) -> ApiClient | None:
        """Return the client of ``token``, or ``None`` when it matches no active key.

        Blocks on the state store; call it from a worker thread.

        Raises:
            StoreError: when the state store fails.
        """
        found = self.authenticate_in_memory(token)
        if found is not None or token is None or self._store is None:
            return found

        record = self._store.verify(token)
        if record is None:
            return None
        self._mark_used(record.key_id)
        client = ApiClient(
            key_id=record.key_id,
            name=record.name,
            requests_per_minute=record.requests_per_minute or self._requests_per_minute,
            keys_per_minute=record.keys_per_minute or self._keys_per_minute,
        )
        self._remember(hashlib.sha256(token).digest(), client)
        return client

    def _remember(self, digest: bytes, client: ApiClient) -> None:
        now = self._clock()
        with self._lock:
            if len(self._verified) > VERIFIED_KEYS_MAX:
                self._verified = {
                    known: entry for known, entry in self._verified.items() if entry[1] > now
                }
            self._verified[digest] = (client, now + STORE_KEY_CACHE_S)

    def _mark_used(self, key_id: str) -> None:
        if self._store is None:
            return
        now = self._clock()
        with self._lock:
            last = self._last_written.get(key_id)
            if last is not None and now - last < LAST_USED_INTERVAL_S:
                return
            self._last_written[key_id] = now
        self._store.mark_used(key_id)
