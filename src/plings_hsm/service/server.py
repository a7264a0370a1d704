"""Run an ASGI app on uvicorn with TLS 1.2 or 1.3 only, in the foreground or in a thread."""

from __future__ import annotations

import ssl
import threading
import time
from pathlib import Path
from typing import Any

import structlog
import uvicorn

__all__ = ["STARTUP_TIMEOUT_S", "TLS12_CIPHERS", "ServiceServer", "tls_config"]

log = structlog.get_logger(__name__)

TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
"""OpenSSL cipher string for TLS 1.2: ECDHE key exchange with AES-GCM or ChaCha20-Poly1305."""

STARTUP_TIMEOUT_S = 15.0
"""Time a background server may take to start listening."""


def tls_config(app: Any, host: str, port: int, cert: Path, key: Path) -> uvicorn.Config:
    """Return a uvicorn config that serves ``app`` over TLS 1.2 or 1.3 only."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        ssl_certfile=str(cert),
        ssl_keyfile=str(key),
        log_config=None,
        access_log=False,
        # Forwarding headers are read by the app, from configured proxies only;
        # uvicorn's own reader would trust loopback by default.
        proxy_headers=False,
        server_header=False,
        date_header=True,
        timeout_graceful_shutdown=10,
    )
    config.load()
    if config.ssl is None:
        raise RuntimeError("uvicorn did not build a TLS context")
    config.ssl.minimum_version = ssl.TLSVersion.TLSv1_2
    config.ssl.maximum_version = ssl.TLSVersion.TLSv1_3
    # TLS 1.2 suites with forward secrecy and AEAD only; TLS 1.3 suites are all AEAD.
    config.ssl.set_ciphers(TLS12_CIPHERS)
    return config


class ServiceServer:
    """A uvicorn server with TLS, started and stopped from the calling thread."""

    def __init__(self, config: uvicorn.Config, name: str = "hsm-service") -> None:
        self.config = config
        self.name = name
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL of the service."""
        host = self.config.host
        shown = f"[{host}]" if ":" in host else host
        return f"https://{shown}:{self.config.port}"

    def run(self) -> None:
        """Serve in the foreground until SIGINT or SIGTERM."""
        log.info("service_started", service=self.name, url=self.url)
        try:
            self._server.run()
        finally:
            log.info("service_stopped", service=self.name, url=self.url)

    def start(self) -> None:
        """Serve in a background thread and wait until the socket listens.

        Raises:
            RuntimeError: when the server did not start within STARTUP_TIMEOUT_S, for
                example because the port is taken.
        """
        self._thread = threading.Thread(target=self._server.run, name=self.name, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(
                    f"{self.name} failed to start on {self.url}; is the port already in use?"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not start within {STARTUP_TIMEOUT_S:.0f} s")
            time.sleep(0.02)
        log.info("service_started", service=self.name, url=self.url)

    def stop(self) -> None:
        """Ask the server to finish open requests and stop, then wait for it."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=STARTUP_TIMEOUT_S)
            self._thread = None
        log.info("service_stopped", service=self.name, url=self.url)
