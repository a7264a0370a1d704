"""The runbook commands as an operator runs them: child processes on a real store and token."""

# Fixtures are imported from migration_support, so every test parameter redefines one.
# ruff: noqa: F811

from __future__ import annotations

import os
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import ClassVar

import base58
import httpx
import pytest
from migration_support import (  # noqa: F401 - fixtures
    HSM_API_KEY,
    MIG_TOKEN_LABEL,
    MIG_USER_PIN,
    OTHER_SEED,
    TEST_MASTER_KEY,
    RunningService,
    hsm_service,
    mig_backend,
    module_path,
    pick_port,
    tls_files,
    wait_until,
)

from plings_hsm.backends.pkcs11 import Pkcs11Backend
from plings_hsm.service.tls import TlsFiles
from plings_hsm.store.audit import list_audit
from plings_hsm.store.db import Store
from plings_hsm.store.migration import load_state

OTHER_MASTER_KEY = base58.b58encode(OTHER_SEED).decode("ascii")
DERIVE_BODY = {"manufacturer": 1, "category": 1, "classId": 1, "batch": 7, "quantity": 2}
CLI = [sys.executable, "-c", "from plings_hsm.cli.main import main; main()"]


class _Receiver(BaseHTTPRequestHandler):
    bodies: ClassVar[list[bytes]] = []

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        _Receiver.bodies.append(self.rfile.read(length))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        return


@pytest.fixture
def webhook() -> Iterator[str]:
    """A tiny HTTP receiver on 127.0.0.1 that keeps the bodies it gets."""
    _Receiver.bodies = []
    server = HTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()
    server.server_close()


@pytest.fixture
def cli_env(
    tmp_path: Path, webhook: str, hsm_service: RunningService, tls_files: TlsFiles
) -> dict[str, str]:
    """Environment of a CLI child: a home in tmp_path, the test master, the HSM, two webhooks."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PLINGS_", "SOFTHSM_", "HSM_", "KEY_MANAGEMENT"))
    }
    env.update(
        {
            "PLINGS_HSM_HOME": str(tmp_path / "home"),
            "PLINGS_MASTER_KEY": TEST_MASTER_KEY,
            "PLINGS_ACTOR": "cli-test",
            "PLINGS_WEBHOOK_URLS": f"{webhook},http://127.0.0.1:{pick_port()}/down",
            "PLINGS_WEBHOOK_TIMEOUT_S": "1",
            "HSM_ENDPOINT": hsm_service.url,
            "HSM_API_KEY": HSM_API_KEY.reveal_text(),
            "HSM_CA_FILE": str(tls_files.ca_cert),
            "HSM_RETRIES": "0",
            "PYTHONPATH": os.pathsep.join(sys.path),
        }
    )
    return env


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def state_of(env: dict[str, str]) -> tuple[str, int]:
    store = Store(f"sqlite:///{Path(env['PLINGS_HSM_HOME']) / 'plings-hsm.db'}")
    state = load_state(store)
    store.close()
    assert state is not None
    return state.mode, state.percentage


def stored_mode(env: dict[str, str]) -> str | None:
    store = Store(f"sqlite:///{Path(env['PLINGS_HSM_HOME']) / 'plings-hsm.db'}")
    state = load_state(store)
    store.close()
    return state.mode if state is not None else None


class TestRunbookCommands:
    """start, advance, status and rollback change the stored state and audit it."""

    def test_start_enters_dual(self, cli_env: dict[str, str]) -> None:
        result = run_cli(cli_env, "migrate", "start")
        assert result.returncode == 0, result.stderr
        assert state_of(cli_env) == ("dual", 0)

    def test_advance_steps(self, cli_env: dict[str, str]) -> None:
        run_cli(cli_env, "migrate", "start")
        run_cli(cli_env, "migrate", "advance")
        assert state_of(cli_env) == ("dual", 5)
        run_cli(cli_env, "migrate", "advance", "--to", "50")
        assert state_of(cli_env) == ("dual", 50)

    def test_advance_before_start_exit_22(self, cli_env: dict[str, str]) -> None:
        result = run_cli(cli_env, "migrate", "advance")
        assert result.returncode == 22
        assert "needs mode dual" in result.stderr

    def test_status_shows_mode(self, cli_env: dict[str, str]) -> None:
        run_cli(cli_env, "migrate", "start")
        result = run_cli(cli_env, "migrate", "status")
        assert "dual" in result.stdout

    def test_rollback_returns_to_env(self, cli_env: dict[str, str]) -> None:
        run_cli(cli_env, "migrate", "start")
        run_cli(cli_env, "migrate", "advance", "--to", "25")
        result = run_cli(cli_env, "rollback", "--reason", "drill")
        assert result.returncode == 0, result.stderr
        assert state_of(cli_env) == ("env", 0)

    def test_rollback_posts_webhook(self, cli_env: dict[str, str]) -> None:
        run_cli(cli_env, "migrate", "start")
        result = run_cli(cli_env, "rollback", "--reason", "drill")
        assert result.returncode == 0
        assert any(b'"text"' in body and b"drill" in body for body in _Receiver.bodies)

    def test_rollback_audited(self, cli_env: dict[str, str]) -> None:
        run_cli(cli_env, "migrate", "start")
        run_cli(cli_env, "rollback", "--reason", "drill")
        store = Store(f"sqlite:///{Path(cli_env['PLINGS_HSM_HOME']) / 'plings-hsm.db'}")
        with store.session() as session:
            entries = list_audit(session, action="rolled_back")
        assert entries[0].actor == "cli-test"

    def test_finalize_needs_100(self, cli_env: dict[str, str]) -> None:
        run_cli(cli_env, "migrate", "start")
        result = run_cli(cli_env, "migrate", "finalize")
        assert result.returncode == 22

    def test_remove_needs_finalize(self, cli_env: dict[str, str]) -> None:
        result = run_cli(cli_env, "migrate", "remove-env-master", "--confirm", "remove env master")
        assert result.returncode == 22

    def test_no_master_in_output(self, cli_env: dict[str, str]) -> None:
        result = run_cli(cli_env, "migrate", "start")
        assert TEST_MASTER_KEY not in result.stdout + result.stderr


class TestStepsNotSkipped:
    """start checks the HSM's fingerprint and finalize needs every step's gate."""

    def test_finalize_skipped_steps_exit_22(self, cli_env: dict[str, str]) -> None:
        env = {**cli_env, "PLINGS_MIGRATION_SOAK_S": "0", "PLINGS_GATE_MIN_REQUESTS": "0"}
        run_cli(env, "migrate", "start")
        run_cli(env, "migrate", "advance", "--to", "100")
        result = run_cli(env, "migrate", "finalize")
        assert result.returncode == 22
        assert "missing: dual-5, dual-25, dual-50" in result.stderr
        assert state_of(env) == ("dual", 100)

    def test_finalize_after_run_passes(self, cli_env: dict[str, str]) -> None:
        env = {**cli_env, "PLINGS_MIGRATION_SOAK_S": "0", "PLINGS_GATE_MIN_REQUESTS": "0"}
        run_cli(env, "migrate", "start")
        assert run_cli(env, "migrate", "run", "--poll", "0.05").returncode == 0
        assert run_cli(env, "migrate", "finalize").returncode == 0
        assert state_of(env) == ("hsm", 100)

    def test_gates_of_earlier_migration_ignored(self, cli_env: dict[str, str]) -> None:
        env = {**cli_env, "PLINGS_MIGRATION_SOAK_S": "0", "PLINGS_GATE_MIN_REQUESTS": "0"}
        run_cli(env, "migrate", "start")
        assert run_cli(env, "migrate", "run", "--poll", "0.05").returncode == 0
        run_cli(env, "rollback", "--reason", "drill")
        run_cli(env, "migrate", "start")
        run_cli(env, "migrate", "advance", "--to", "100")
        result = run_cli(env, "migrate", "finalize")
        assert result.returncode == 22
        assert "dual-5" in result.stderr

    def test_start_unreachable_hsm_exit_21(self, cli_env: dict[str, str]) -> None:
        env = {**cli_env, "HSM_ENDPOINT": f"https://127.0.0.1:{pick_port()}"}
        result = run_cli(env, "migrate", "start")
        assert result.returncode == 21
        assert stored_mode(env) is None

    def test_start_without_endpoint_exit_3(self, cli_env: dict[str, str]) -> None:
        env = {key: value for key, value in cli_env.items() if key != "HSM_ENDPOINT"}
        result = run_cli(env, "migrate", "start")
        assert result.returncode == 3
        assert "HSM_ENDPOINT" in result.stderr

    def test_start_other_master_exit_21(self, cli_env: dict[str, str]) -> None:
        other = {**cli_env, "PLINGS_MASTER_KEY": OTHER_MASTER_KEY}
        result = run_cli(other, "migrate", "start")
        assert result.returncode == 21
        assert "fingerprint" in result.stderr
        assert stored_mode(other) is None


def plain(text: str) -> str:
    """Return ``text`` without the frame and line breaks of a usage error box."""
    return " ".join(text.replace("│", " ").split())


def run_cli_stdin(env: dict[str, str], stdin: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def finalized_env(cli_env: dict[str, str]) -> dict[str, str]:
    env = {**cli_env, "PLINGS_MIGRATION_SOAK_S": "0", "PLINGS_GATE_MIN_REQUESTS": "0"}
    run_cli(env, "migrate", "start")
    assert run_cli(env, "migrate", "run", "--poll", "0.05").returncode == 0
    assert run_cli(env, "migrate", "finalize").returncode == 0
    return env


class TestExitCodes:
    """State errors come before prompts, and usage errors exit 2 naming the value."""

    def test_remove_in_env_mode_exit_22(self, cli_env: dict[str, str]) -> None:
        result = run_cli_stdin(cli_env, "", "migrate", "remove-env-master")
        assert result.returncode == 22
        assert "needs a finalized migration" in result.stderr

    def test_remove_without_stdin_exit_2(self, cli_env: dict[str, str]) -> None:
        env = finalized_env(cli_env)
        result = run_cli_stdin(env, "", "migrate", "remove-env-master")
        assert result.returncode == 2
        assert "no confirmation given" in plain(result.stderr)
        assert state_of(env) == ("hsm", 100)

    @pytest.mark.parametrize("typed", ["remove env master ", " remove env master", "yes"])
    def test_remove_inexact_confirmation_exit_2(self, cli_env: dict[str, str], typed: str) -> None:
        env = finalized_env(cli_env)
        result = run_cli(env, "migrate", "remove-env-master", "--confirm", typed)
        assert result.returncode == 2
        assert "does not match" in plain(result.stderr)
        assert state_of(env) == ("hsm", 100)

    def test_remove_typed_confirmation(self, cli_env: dict[str, str]) -> None:
        env = finalized_env(cli_env)
        result = run_cli_stdin(env, "remove env master\n", "migrate", "remove-env-master")
        assert result.returncode == 0, result.stderr

    @pytest.mark.parametrize("value", ["notaurl", "ftp://hooks.example/x", "https://"])
    def test_webhook_url_invalid_exit_3(self, cli_env: dict[str, str], value: str) -> None:
        result = run_cli({**cli_env, "PLINGS_WEBHOOK_URLS": value}, "migrate", "status")
        assert result.returncode == 3
        assert repr(value) in result.stderr

    def test_reason_with_newline_exit_2(self, cli_env: dict[str, str]) -> None:
        run_cli(cli_env, "migrate", "start")
        result = run_cli(cli_env, "rollback", "--reason", "drill\nforged line")
        assert result.returncode == 2
        assert "U+000A" in plain(result.stderr)
        assert state_of(cli_env) == ("dual", 0)


class TestRemovedMaster:
    """After remove-env-master, rollback needs the env master again."""

    def test_rollback_without_master_fails(self, cli_env: dict[str, str]) -> None:
        env = {**cli_env, "PLINGS_MIGRATION_SOAK_S": "0", "PLINGS_GATE_MIN_REQUESTS": "0"}
        run_cli(env, "migrate", "start")
        assert run_cli(env, "migrate", "run", "--poll", "0.05").returncode == 0
        assert run_cli(env, "migrate", "finalize").returncode == 0
        wrong = run_cli(env, "migrate", "remove-env-master", "--confirm", "yes")
        assert wrong.returncode == 2
        assert (
            run_cli(
                env, "migrate", "remove-env-master", "--confirm", "remove env master"
            ).returncode
            == 0
        )
        no_master = {key: value for key, value in env.items() if key != "PLINGS_MASTER_KEY"}
        result = run_cli(no_master, "rollback")
        assert result.returncode == 23
        assert "supply PLINGS_MASTER_KEY again" in result.stderr
        assert run_cli(env, "rollback").returncode == 0


class TestRollbackWait:
    """rollback --wait checks its URLs before it stores anything."""

    @pytest.mark.parametrize("value", ["notaurl", "ftp://127.0.0.1/", "https://"])
    def test_invalid_url_exit_2(self, cli_env: dict[str, str], value: str) -> None:
        run_cli(cli_env, "migrate", "start")
        started = time.monotonic()
        result = run_cli(cli_env, "rollback", "--wait", "--url", value)
        assert result.returncode == 2
        assert value in result.stderr
        assert time.monotonic() - started < 15
        assert state_of(cli_env) == ("dual", 0)


class TestPreflight:
    """preflight checks the real token, the real HSM service and makes a backup."""

    def test_passes_and_backs_up(
        self, cli_env: dict[str, str], hsm_service: RunningService, mig_backend: Pkcs11Backend
    ) -> None:
        env = {
            **cli_env,
            "SOFTHSM2_CONF": os.environ["SOFTHSM2_CONF"],
            "PLINGS_PKCS11_MODULE": str(module_path()),
            "PLINGS_TOKEN_LABEL": MIG_TOKEN_LABEL,
            "SOFTHSM_USER_PIN": MIG_USER_PIN.reveal_text(),
            "HSM_ENDPOINT": hsm_service.url,
            "HSM_API_KEY": HSM_API_KEY.reveal_text(),
            "HSM_CA_FILE": str(hsm_service.ca_file),
        }
        result = run_cli(env, "migrate", "preflight")
        assert result.returncode == 0, result.stdout + result.stderr
        archives = list((Path(env["PLINGS_HSM_HOME"]) / "backups").glob("token-*.tar.gz"))
        assert len(archives) == 1
        assert archives[0].stat().st_mode & 0o777 == 0o600

    def test_fails_without_hsm(self, cli_env: dict[str, str], mig_backend: Pkcs11Backend) -> None:
        env = {
            **cli_env,
            "SOFTHSM2_CONF": os.environ["SOFTHSM2_CONF"],
            "PLINGS_PKCS11_MODULE": str(module_path()),
            "PLINGS_TOKEN_LABEL": MIG_TOKEN_LABEL,
            "SOFTHSM_USER_PIN": MIG_USER_PIN.reveal_text(),
            "HSM_ENDPOINT": f"https://127.0.0.1:{pick_port()}",
            "HSM_API_KEY": HSM_API_KEY.reveal_text(),
        }
        result = run_cli(env, "migrate", "preflight")
        assert result.returncode == 9
        assert "FAIL" in result.stdout


class TestIdentifierServe:
    """identifier serve runs the identifier API over TLS in its own process."""

    def test_serves_and_follows_rollback(
        self, cli_env: dict[str, str], hsm_service: RunningService, tls_files: TlsFiles
    ) -> None:
        port = pick_port()
        env = {
            **cli_env,
            "HSM_ENDPOINT": hsm_service.url,
            "HSM_API_KEY": HSM_API_KEY.reveal_text(),
            "HSM_CA_FILE": str(tls_files.ca_cert),
            "PLINGS_TLS_CERT": str(tls_files.server_cert),
            "PLINGS_TLS_KEY": str(tls_files.server_key),
            "PLINGS_TLS_CA": str(tls_files.ca_cert),
            "PLINGS_IDENTIFIER_PORT": str(port),
            "PLINGS_IDENTIFIER_API_KEYS": "cli-client-key-0123456789abcdef0123",
            "PLINGS_ADMIN_API_KEY": "cli-admin-key-0123456789abcdef01234",
            "PLINGS_STATE_POLL_S": "0.2",
            "PLINGS_LOG_LEVEL": "WARNING",
        }
        run_cli(env, "migrate", "start")
        run_cli(env, "migrate", "advance", "--to", "100")
        process = subprocess.Popen(
            [*CLI, "identifier", "serve"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        client = httpx.Client(
            base_url=f"https://127.0.0.1:{port}",
            verify=ssl.create_default_context(cafile=str(tls_files.ca_cert)),
            timeout=5.0,
        )

        def source() -> str:
            try:
                response = client.post(
                    "/api/derive-keys",
                    json={**DERIVE_BODY, "userId": "someone"},
                    headers={"Authorization": "Bearer cli-client-key-0123456789abcdef0123"},
                )
            except httpx.HTTPError:
                return ""
            return response.headers.get("X-Key-Source", "")

        try:
            assert wait_until(lambda: source() == "hsm", 30, step_s=0.2)
            result = run_cli(env, "rollback", "--reason", "drill", "--wait")
            print(result.stdout)
            assert result.returncode == 0, result.stdout + result.stderr
            assert "serve env" in result.stdout
            assert source() == "env"
        finally:
            client.close()
            process.terminate()
            process.wait(timeout=30)


class TestMessages:
    """Command output names fields and values, not Python classes or other variables."""

    def test_busy_port_names_own_variable(
        self, cli_env: dict[str, str], tls_files: TlsFiles
    ) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen(1)
            port = busy.getsockname()[1]
            env = {
                **cli_env,
                "PLINGS_TLS_CERT": str(tls_files.server_cert),
                "PLINGS_TLS_KEY": str(tls_files.server_key),
                "PLINGS_TLS_CA": str(tls_files.ca_cert),
                "PLINGS_IDENTIFIER_PORT": str(port),
                "PLINGS_IDENTIFIER_API_KEYS": "cli-client-key-0123456789abcdef0123",
                "PLINGS_ADMIN_API_KEY": "cli-admin-key-0123456789abcdef01234",
            }
            result = run_cli(env, "identifier", "serve")
        text = plain(result.stderr)
        assert result.returncode == 3
        assert "PLINGS_IDENTIFIER_PORT" in text
        assert "PLINGS_HSM_PORT" not in text

    def test_validate_hides_class_names(self, cli_env: dict[str, str], tmp_path: Path) -> None:
        env = {
            **cli_env,
            "PLINGS_IDENTIFIER_URL": f"https://127.0.0.1:{pick_port()}",
            "PLINGS_ENV_FILES": str(tmp_path / "missing.env"),
        }
        result = run_cli(env, "validate")
        assert result.returncode == 9
        for leaked in ("Error:", "[Errno", "Traceback"):
            assert leaked not in result.stdout + result.stderr


class TestAuditHead:
    """audit head prints the newest row; validate --audit-head finds deleted last rows."""

    def test_deleted_last_row_detected(self, cli_env: dict[str, str]) -> None:
        env = finalized_env(cli_env)
        run_cli(env, "migrate", "remove-env-master", "--confirm", "remove env master")
        head = run_cli(env, "audit", "head")
        fields = head.stdout.split()
        row_id, row_hash = int(fields[1]), fields[2]
        assert head.returncode == 0
        assert len(row_hash) == 64

        kept = plain(run_cli(env, "validate", "--audit-head", row_hash).stdout)
        assert f"kept head row {row_id} present" in kept

        database = sqlite3.connect(Path(env["PLINGS_HSM_HOME"]) / "plings-hsm.db")
        database.execute("DELETE FROM audit_log WHERE id = ?", (row_id,))
        database.commit()
        database.close()
        deleted = plain(run_cli(env, "validate", "--audit-head", row_hash).stdout)
        assert "no audit row has the kept head hash" in deleted


class TestStoreFileModes:
    """The SQLite file and its -wal and -shm files are readable by the owner only."""

    def test_files_are_0600(self, cli_env: dict[str, str]) -> None:
        run_cli(cli_env, "migrate", "start")
        path = Path(cli_env["PLINGS_HSM_HOME"]) / "plings-hsm.db"
        store = Store(f"sqlite:///{path}")
        try:
            load_state(store)
            for suffix in ("", "-wal", "-shm"):
                mode = (path.parent / f"{path.name}{suffix}").stat().st_mode & 0o777
                assert mode == 0o600, f"{path.name}{suffix} has mode {mode:o}"
        finally:
            store.close()
