"""The remote backend: an HTTPS client of the HSM service with retries for derive calls."""

from __future__ import annotations

import base64
import hashlib
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import base58
import httpx
import structlog

from plings_hsm.backends.base import (
    WALLET_FINGERPRINT_HEADER,
    BackendHealth,
    KeyBackend,
    Signature,
    WalletInfo,
)
from plings_hsm.core.batch import DerivedKey, WalletScheme
from plings_hsm.core.path import BatchPrefix, IdentifierPath
from plings_hsm.errors import (
    AuthenticationError,
    ConfigError,
    HsmRateLimitedError,
    HsmServiceError,
    InvalidRequestError,
    WalletNotFoundError,
)
from plings_hsm.secrets import Secret

__all__ = [
    "BACKOFF_DEFAULT_S",
    "DEADLINE_DEFAULT_S",
    "RETRIES_DEFAULT",
    "TIMEOUT_DEFAULT_S",
    "RemoteBackend",
]

log = structlog.get_logger(__name__)

TIMEOUT_DEFAULT_S = 5.0
"""Connect, read and write timeout of one HTTPS call."""

DEADLINE_DEFAULT_S = 5.0
"""Time one derive call may take in total, across its retries and Retry-After waits."""

RETRIES_DEFAULT = 2
"""Extra attempts of a derive call after a connection error or a 5xx response."""

BACKOFF_DEFAULT_S = 0.1
"""Wait before the first retry; it doubles for each further retry."""

RATE_LIMIT_WAIT_MIN_S = 0.05
"""Shortest wait after a 429, whatever its Retry-After."""

MAX_CONNECTIONS_DEFAULT = 20
"""Connections kept open to the HSM service and reused across requests."""

PUBLIC_KEY_BYTES = 32
"""Length of an ed25519 public key."""


class _RetryableError(Exception):
    """A derive attempt failed in a way a retry may fix: a connection error or a 5xx."""


class _RateLimitedError(Exception):
    """The HSM service returned 429; ``retry_after_s`` is its Retry-After, if it sent one."""

    def __init__(self, retry_after_s: float | None) -> None:
        super().__init__("status 429")
        self.retry_after_s = retry_after_s


_RETRIED_TRANSPORT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout)
"""Transport errors after which no request reached the service, so a retry is safe and fast."""


def _retry_after_s(response: httpx.Response) -> float | None:
    text = response.headers.get("retry-after", "").strip()
    if not text.isdigit():
        return None
    return float(text)


def _decode_public_key(text: object, hd_path: str) -> bytes:
    if not isinstance(text, str):
        raise HsmServiceError(f"HSM service returned no publicKey text for {hd_path}")
    try:
        raw = bytes(base58.b58decode(text))
    except ValueError as exc:
        raise HsmServiceError(
            f"HSM service returned a publicKey for {hd_path} that is not base58"
        ) from exc
    if len(raw) != PUBLIC_KEY_BYTES:
        raise HsmServiceError(
            f"HSM service returned a {len(raw)}-byte publicKey for {hd_path}; "
            f"need {PUBLIC_KEY_BYTES}"
        )
    return raw


def _peer_of(response: httpx.Response) -> str | None:
    """Return ``address:port/certificate digest`` of the server that sent ``response``.

    A different value means another server (or a restarted one with a new certificate)
    sent it, so a fingerprint verified against the previous server no longer applies.
    """
    stream = response.extensions.get("network_stream")
    if stream is None:
        return None
    try:
        ssl_object = stream.get_extra_info("ssl_object")
        address = stream.get_extra_info("server_addr")
        # ssl.SSLSocket takes binary_form as a keyword, the C-level _SSLSocket positionally.
        certificate = ssl_object.getpeercert(True) if ssl_object is not None else None
    except (OSError, AttributeError, ValueError, TypeError):
        return None
    digest = hashlib.sha256(certificate).hexdigest()[:16] if certificate else "-"
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}/{digest}"
    return digest


def _error_of(response: httpx.Response) -> tuple[str, str | None]:
    try:
        body = response.json()
        error = body.get("error", {})
        return str(error.get("message", response.reason_phrase)), error.get("field")
    except (ValueError, AttributeError):
        return response.reason_phrase, None


def _wallets_of(body: dict[str, Any]) -> list[WalletInfo]:
    return [
        WalletInfo(
            int(item["walletVersion"]),
            str(item["label"]),
            WalletScheme(item["scheme"]),
            str(item["fingerprint"]),
        )
        for item in body.get("wallets", [])
    ]


class RemoteBackend(KeyBackend):
    """Derives keys by calling the HSM service over HTTPS.

    A derive call retries a connection error (connect failed or timed out) and a 5xx
    response with exponential backoff, and waits out a 429's Retry-After, all within
    ``deadline_s`` in total. A read timeout is not retried: the service got the request
    and is slow, so another attempt would only add to the wait. Other 4xx responses are
    not retried. The TLS certificate is verified against ``ca_file`` (or the system store
    when it is None).

    Args:
        endpoint: base URL of the HSM service, ``https://host:port``.
        api_key: the bearer key the service accepts (HSM_API_KEY).
        ca_file: CA certificate that signed the service certificate.
        timeout_s: timeout of each call.
        deadline_s: total time of one derive call across retries and waits.
        retries: extra attempts of a derive call.
        backoff_s: wait before the first retry, doubled for each further one.

    Raises:
        ConfigError: when the endpoint is not an https URL.
    """

    name = "remote"

    def __init__(
        self,
        endpoint: str,
        api_key: Secret,
        ca_file: Path | None,
        *,
        timeout_s: float = TIMEOUT_DEFAULT_S,
        deadline_s: float = DEADLINE_DEFAULT_S,
        retries: int = RETRIES_DEFAULT,
        backoff_s: float = BACKOFF_DEFAULT_S,
        max_connections: int = MAX_CONNECTIONS_DEFAULT,
    ) -> None:
        url = httpx.URL(endpoint)
        if url.scheme != "https" or not url.host:
            raise ConfigError(f"HSM_ENDPOINT {endpoint!r} is not an https URL; TLS is required")
        if ca_file is not None and not ca_file.is_file():
            raise ConfigError(f"HSM CA file {ca_file} does not exist")
        self.endpoint = str(url).rstrip("/")
        self._api_key = api_key
        self._retries = retries
        self._backoff_s = backoff_s
        self._timeout_s = timeout_s
        self._deadline_s = deadline_s
        self._calls = threading.local()
        verify = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        self._client = httpx.Client(
            base_url=self.endpoint,
            verify=verify,
            timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
        )

    def __repr__(self) -> str:
        return f"RemoteBackend(endpoint={self.endpoint!r})"

    def last_peer(self) -> str | None:
        """Return ``address:port/certificate digest`` of the server of this thread's last call."""
        peer: str | None = getattr(self._calls, "peer", None)
        return peer

    def _note_peer(self, response: httpx.Response) -> None:
        self._calls.peer = _peer_of(response)
        self._calls.fingerprint = response.headers.get(WALLET_FINGERPRINT_HEADER)

    def last_fingerprint(self) -> str | None:
        """Return the wallet fingerprint the last response on this thread carried, if any."""
        fingerprint: str | None = getattr(self._calls, "fingerprint", None)
        return fingerprint

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._api_key.reveal_text()}"}

    def _raise_for_client_error(self, response: httpx.Response) -> None:
        message, field = _error_of(response)
        status = response.status_code
        if status == 401:
            raise AuthenticationError(f"HSM service {self.endpoint} rejected HSM_API_KEY")
        if status == 404:
            raise WalletNotFoundError(message)
        if status == 422:
            raise InvalidRequestError(message, field=field)
        raise HsmServiceError(f"HSM service {self.endpoint} returned {status}: {message}")

    def _post_once(self, route: str, body: dict[str, Any], timeout_s: float) -> Any:
        try:
            response = self._client.post(
                route, json=body, headers=self._headers(), timeout=httpx.Timeout(timeout_s)
            )
        except _RETRIED_TRANSPORT_ERRORS as exc:
            raise _RetryableError(type(exc).__name__) from exc
        except httpx.TimeoutException as exc:
            raise HsmServiceError(
                f"HSM service {self.endpoint}{route} timed out after {timeout_s:g} s "
                f"({type(exc).__name__}); not retried"
            ) from exc
        except httpx.TransportError as exc:
            raise HsmServiceError(
                f"HSM service {self.endpoint}{route} failed: {type(exc).__name__}"
            ) from exc
        self._note_peer(response)
        if response.status_code == 429:
            raise _RateLimitedError(_retry_after_s(response))
        if response.status_code == 501:
            # The HSM service cannot derive this wallet's scheme; a retry cannot change it.
            raise HsmServiceError(
                f"HSM service {self.endpoint}{route} returned 501: wallet scheme not supported"
            )
        if response.status_code >= 500:
            raise _RetryableError(f"status {response.status_code}")
        if response.status_code >= 400:
            self._raise_for_client_error(response)
        try:
            return response.json()
        except ValueError as exc:
            raise HsmServiceError(
                f"HSM service {self.endpoint} returned a body that is not JSON"
            ) from exc

    def _post(self, route: str, body: dict[str, Any], *, retry: bool) -> Any:
        """POST ``body``; with ``retry``, retry and wait within the deadline.

        Raises:
            HsmRateLimitedError: on a 429 whose Retry-After does not fit the deadline.
            HsmServiceError: on any other failure once the retries or the deadline ran out.
        """
        deadline = time.monotonic() + self._deadline_s
        attempts = 1 + (self._retries if retry else 0)
        attempt = 0
        while True:
            attempt += 1
            remaining_s = deadline - time.monotonic()
            try:
                return self._post_once(route, body, max(0.01, min(self._timeout_s, remaining_s)))
            except _RateLimitedError as exc:
                wait_s = exc.retry_after_s
                remaining_s = deadline - time.monotonic()
                if not retry or wait_s is None or wait_s >= remaining_s:
                    log.warning(
                        "remote_call_rate_limited",
                        endpoint=self.endpoint,
                        route=route,
                        retry_after_s=wait_s,
                        remaining_s=round(max(0.0, remaining_s), 3),
                    )
                    raise HsmRateLimitedError(
                        f"HSM service {self.endpoint}{route} returned 429 with Retry-After "
                        f"{wait_s if wait_s is not None else 'missing'} s; the call's deadline "
                        f"HSM_DEADLINE_S leaves {max(0.0, remaining_s):.2f} s"
                    ) from exc
                log.info("remote_call_retried", endpoint=self.endpoint, route=route, delay_s=wait_s)
                # Retry-After: 0 still waits a little, so a busy service is not hammered.
                time.sleep(max(wait_s, RATE_LIMIT_WAIT_MIN_S))
            except _RetryableError as exc:
                delay_s = self._backoff_s * 2 ** (attempt - 1)
                remaining_s = deadline - time.monotonic()
                if attempt >= attempts or delay_s >= remaining_s:
                    log.warning(
                        "remote_call_failed",
                        endpoint=self.endpoint,
                        route=route,
                        attempts=attempt,
                        error=str(exc),
                    )
                    raise HsmServiceError(
                        f"HSM service {self.endpoint}{route} failed after {attempt} "
                        f"attempt(s): {exc}"
                    ) from exc
                log.info(
                    "remote_call_retried",
                    endpoint=self.endpoint,
                    route=route,
                    attempt=attempt,
                    error=str(exc),
                    delay_s=delay_s,
                )
                time.sleep(delay_s)

    def derive_keys(self, prefix: BatchPrefix, start: int, quantity: int) -> list[DerivedKey]:
        """Derive a batch through ``POST /api/derive-keys`` and check each returned path.

        Raises:
            HsmServiceError: when the service cannot be reached after the retries, fails
                with 5xx, or returns keys for other paths than requested.
            AuthenticationError, WalletNotFoundError, InvalidRequestError: on 401, 404, 422.
        """
        body = {
            "manufacturer": prefix.manufacturer,
            "category": prefix.category,
            "classId": prefix.class_id,
            "batch": prefix.batch,
            "quantity": quantity,
            "walletVersion": prefix.wallet,
            "startInstance": start,
        }
        payload = self._post("/api/derive-keys", body, retry=True)
        items = payload.get("keys") if isinstance(payload, dict) else None
        if not isinstance(items, list) or len(items) != quantity:
            count = len(items) if isinstance(items, list) else 0
            raise HsmServiceError(f"HSM service returned {count} keys; requested {quantity}")

        keys = []
        for offset, item in enumerate(items):
            path = prefix.instance(start + offset)
            if not isinstance(item, dict) or item.get("hdPath") != path.hd_path:
                raise HsmServiceError(
                    f"HSM service returned key {offset} for another path than {path.hd_path}"
                )
            keys.append(DerivedKey(path, _decode_public_key(item.get("publicKey"), path.hd_path)))
        return keys

    def iter_keys(self, prefix: BatchPrefix, start: int, quantity: int) -> Iterator[DerivedKey]:
        yield from self.derive_keys(prefix, start, quantity)

    def sign(self, path: IdentifierPath, message: bytes) -> Signature:
        """Sign ``message`` through ``POST /api/sign``; signing is not retried.

        Raises:
            HsmServiceError: when the service fails or returns no valid signature.
        """
        body = {
            "walletVersion": path.wallet,
            "manufacturer": path.manufacturer,
            "category": path.category,
            "classId": path.class_id,
            "batch": path.batch,
            "instanceNumber": path.instance,
            "message": base64.b64encode(message).decode("ascii"),
        }
        payload = self._post("/api/sign", body, retry=False)
        try:
            signature = base64.b64decode(payload["signature"], validate=True)
        except (KeyError, TypeError, ValueError) as exc:
            raise HsmServiceError("HSM service returned no valid base64 signature") from exc
        return Signature(_decode_public_key(payload.get("publicKey"), path.hd_path), signature)

    def _health_body(self) -> tuple[int, dict[str, Any]]:
        response = self._client.get("/health")
        self._note_peer(response)
        body = response.json()
        if not isinstance(body, dict):
            raise ValueError("health body is not an object")
        return response.status_code, body

    def wallets(self) -> list[WalletInfo]:
        """List the wallets the HSM service reports on ``/health``.

        Raises:
            HsmServiceError: when the service cannot be reached or reports no wallets.
        """
        try:
            _status, body = self._health_body()
        except (httpx.HTTPError, ValueError) as exc:
            raise HsmServiceError(
                f"HSM service {self.endpoint}/health failed: {type(exc).__name__}"
            ) from exc
        try:
            return _wallets_of(body)
        except (KeyError, TypeError, ValueError) as exc:
            raise HsmServiceError(
                f"HSM service {self.endpoint}/health returned a malformed wallet list"
            ) from exc

    def health(self) -> BackendHealth:
        try:
            status, body = self._health_body()
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("backend_health_failed", backend=self.name, error=type(exc).__name__)
            return BackendHealth(
                self.name, False, f"{self.endpoint} unreachable: {type(exc).__name__}"
            )
        ok = status == 200 and bool(body.get("tokenReachable"))
        try:
            wallets = _wallets_of(body)
        except (KeyError, TypeError, ValueError):
            return BackendHealth(
                self.name, False, f"{self.endpoint} returned a malformed health body"
            )
        detail = f"{self.endpoint} status {status}, token {'reachable' if ok else 'unavailable'}"
        return BackendHealth(self.name, ok, detail, wallets)

    def close(self) -> None:
        self._client.close()
