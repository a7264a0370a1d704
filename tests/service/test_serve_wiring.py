"""``plings-hsm serve`` reads API keys from the state store and settings from the env."""

# Fixtures are imported from svc_support, so every test parameter redefines one.
# ruff: noqa: F811

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import TEST_USER_PIN
from svc_support import SVC_TOKEN_LABEL, derive_body, svc_backend  # noqa: F401

from plings_hsm.backends.pkcs11 import Pkcs11Backend
from plings_hsm.secrets import Secret
from plings_hsm.store.api_keys import ApiKeyStore
from plings_hsm.store.db import Store

CLI = [sys.executable, "-c", "from plings_hsm.cli import main; main()"]
STARTUP_TIMEOUT_S = 30.0


@dataclass
class Served:
    """A running ``plings-hsm serve`` child, its URL, its CA and a store key."""

    process: subprocess.Popen[str]
    url: str
    verify: ssl.SSLContext
    key: Secret


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def serve_env(svc_backend: Pkcs11Backend, tmp_path: Path) -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("PLINGS_", "SOFTHSM_", "HSM_"))
    }
    env.update(
        {
            "PLINGS_PKCS11_MODULE": str(svc_backend.token.module),
            "PLINGS_TOKEN_LABEL": SVC_TOKEN_LABEL,
            "SOFTHSM_USER_PIN": TEST_USER_PIN,
            "PLINGS_HSM_HOME": str(tmp_path / "home"),
            "PLINGS_DATABASE_URL": f"sqlite:///{tmp_path / 'serve.db'}",
            "PLINGS_HSM_PORT": str(_free_port()),
            "PLINGS_AUTH_FAILURES_PER_MINUTE": "2",
        }
    )
    return env


@pytest.fixture
def served(serve_env: dict[str, str], tmp_path: Path) -> Iterator[Served]:
    store = Store(serve_env["PLINGS_DATABASE_URL"])
    _, key = ApiKeyStore(store).create("identifier-api")
    store.close()
    process = subprocess.Popen(
        [*CLI, "serve"],
        env=serve_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"https://127.0.0.1:{serve_env['PLINGS_HSM_PORT']}"
    ca = tmp_path / "home" / "tls" / "ca.pem"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while True:
            if process.poll() is not None:
                raise AssertionError(f"serve exited with {process.returncode}")
            if time.monotonic() > deadline:
                raise AssertionError("serve did not answer /health in time")
            if ca.exists():
                verify = ssl.create_default_context(cafile=str(ca))
                try:
                    httpx.get(f"{url}/health", verify=verify, timeout=2)
                    break
                except httpx.HTTPError:
                    pass
            time.sleep(0.1)
        yield Served(process, url, verify, key)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)


def _stop(served: Served) -> list[dict[str, object]]:
    served.process.send_signal(signal.SIGTERM)
    _, stderr = served.process.communicate(timeout=30)
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


class TestServeWiring:
    """serve authenticates store keys, budgets by env settings and logs both events."""

    def test_store_key_accepted(self, served: Served) -> None:
        response = httpx.post(
            f"{served.url}/api/derive-keys",
            headers={"Authorization": f"Bearer {served.key.reveal_text()}"},
            json=derive_body(),
            verify=served.verify,
            timeout=30,
        )
        assert response.status_code == 200
        assert response.json()["count"] == 3

    def test_env_auth_budget(self, served: Served) -> None:
        statuses = [
            httpx.post(
                f"{served.url}/api/derive-keys",
                headers={"Authorization": "Bearer wrong"},
                json=derive_body(),
                verify=served.verify,
                timeout=30,
            ).status_code
            for _ in range(3)
        ]
        assert statuses == [401, 401, 429]

    def test_logs(self, served: Served) -> None:
        with httpx.Client(verify=served.verify, timeout=30) as client:
            client.post(
                f"{served.url}/api/derive-keys",
                headers={"Authorization": f"Bearer {served.key.reveal_text()}"},
                json=derive_body(quantity=4),
            )
            client.post(f"{served.url}/api/derive-keys", headers={"Authorization": "Bearer x"})
        events = _stop(served)
        completed = [event for event in events if event["event"] == "request_completed"]
        assert {"key_name": "identifier-api", "keys_derived": 4, "status": 200}.items() <= (
            completed[-2].items()
        )
        assert any(event["event"] == "authentication_failed" for event in events)

    def test_fail2ban_line(self, served: Served) -> None:
        httpx.post(
            f"{served.url}/api/sign",
            headers={"Authorization": "Bearer x"},
            verify=served.verify,
            timeout=30,
        )
        served.process.send_signal(signal.SIGTERM)
        _, stderr = served.process.communicate(timeout=30)
        lines = [line for line in stderr.splitlines() if "authentication_failed" in line]
        match = re.search(
            r'^(?=.*"event": "authentication_failed").*"client": "([0-9.]+)"', lines[0]
        )
        assert match is not None
        assert match.group(1) == "127.0.0.1"

    def test_no_key_exits_3(self, serve_env: dict[str, str]) -> None:
        completed = subprocess.run(
            [*CLI, "serve"],
            env=serve_env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert completed.returncode == 3
        assert "no API key" in completed.stderr

    def test_store_format_hsm_api_key_exits_3(self, serve_env: dict[str, str]) -> None:
        store = Store(serve_env["PLINGS_DATABASE_URL"])
        _, key = ApiKeyStore(store).create("identifier-api")
        store.close()
        completed = subprocess.run(
            [*CLI, "serve"],
            env={**serve_env, "HSM_API_KEY": key.reveal_text()},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert completed.returncode == 3
        assert "HSM_API_KEY starts with 'plk_'" in completed.stderr
        assert key.reveal_text() not in completed.stderr
        assert key.reveal_text() not in completed.stdout

    @pytest.mark.parametrize(
        ("value", "length"),
        [("a", 1), (" ", 0), ("x" * 31, 31), (" " + "y" * 30 + " ", 30)],
    )
    def test_short_hsm_api_key_exits_3(
        self, serve_env: dict[str, str], value: str, length: int
    ) -> None:
        completed = subprocess.run(
            [*CLI, "serve"],
            env={**serve_env, "HSM_API_KEY": value},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert completed.returncode == 3
        assert f"HSM_API_KEY is {length} characters" in completed.stderr
        assert "the minimum is 32" in completed.stderr

    def test_hsm_api_key_with_space_exits_3(self, serve_env: dict[str, str]) -> None:
        value = "z" * 20 + " inner-space " + "z" * 20
        completed = subprocess.run(
            [*CLI, "serve"],
            env={**serve_env, "HSM_API_KEY": value},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert completed.returncode == 3
        assert "HSM_API_KEY (53 characters) contains whitespace" in completed.stderr
        assert value not in completed.stderr

    def test_strong_hsm_api_key_stripped(self, serve_env: dict[str, str], tmp_path: Path) -> None:
        key = "k" * 40
        env = {**serve_env, "HSM_API_KEY": f"  {key}\n"}
        process = subprocess.Popen(
            [*CLI, "serve"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        url = f"https://127.0.0.1:{serve_env['PLINGS_HSM_PORT']}"
        ca = tmp_path / "home" / "tls" / "ca.pem"
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        status = 0
        try:
            while status == 0 and process.poll() is None and time.monotonic() < deadline:
                if ca.exists():
                    with contextlib.suppress(httpx.HTTPError):
                        status = httpx.post(
                            f"{url}/api/derive-keys",
                            headers={"Authorization": f"Bearer {key}"},
                            json=derive_body(),
                            verify=ssl.create_default_context(cafile=str(ca)),
                            timeout=5,
                        ).status_code
                time.sleep(0.1)
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            process.communicate(timeout=30)
        assert status == 200
