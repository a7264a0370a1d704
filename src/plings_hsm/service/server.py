"""Run an ASGI app on uvicorn with TLS 1.2 or 1.3 only, in the foreground or in a thread."""

from __future__ import annotations

import contextlib
import signal
import socket
import ssl
import threading
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

import structlog
import uvicorn

from plings_hsm.errors import ConfigError

__all__ = ["STARTUP_TIMEOUT_S", "TLS12_CIPHERS", "ServiceServer", "check_port_free", "tls_config"]

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


class _QuietExitServer(uvicorn.Server):
    """A uvicorn server that treats SIGTERM like SIGINT and exits normally after both.

    uvicorn 0.55 raises the captured signal again after a graceful shutdown, so SIGTERM
    killed the process with status 143 before the caller could log the stop or close
    the token session.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {number: signal.signal(number, self.handle_exit) for number in handled}
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)


def check_port_free(host: str, port: int) -> None:
    """Raise ConfigError when ``host:port`` cannot be bound, before anything starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {host}:{port}: {exc.strerror or exc}; "
                "stop the other process or set PLINGS_HSM_PORT"
            ) from exc


class ServiceServer:
    """A uvicorn server with TLS, started and stopped from the calling thread."""

    def __init__(self, config: uvicorn.Config, name: str = "hsm-service") -> None:
        self.config = config
        self.name = name
        self._server = _QuietExitServer(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL of the service."""
        host = self.config.host
        shown = f"[{host}]" if ":" in host else host
        return f"https://{shown}:{self.config.port}"

    def run(self) -> None:
        """Serve in the foreground until SIGINT or SIGTERM.

        Raises:
            ConfigError: when the port cannot be bound.
        """
        check_port_free(self.config.host, self.config.port)
        # Catch SIGINT and SIGTERM from here on, not only once uvicorn runs, so a signal
        # during start-up also ends in a clean stop.
        previous = {
            number: signal.signal(number, self._server.handle_exit)
            for number in (signal.SIGINT, signal.SIGTERM)
        }
        log.info("service_started", service=self.name, url=self.url)
        try:
            self._server.run()
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
            log.info("service_stopped", service=self.name, url=self.url)

    def start(self) -> None:
        """Serve in a background thread and wait until the socket listens.

        Raises:
            ConfigError: when the port cannot be bound.
            RuntimeError: when the server did not start within STARTUP_TIMEOUT_S.
        """
        check_port_free(self.config.host, self.config.port)
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
