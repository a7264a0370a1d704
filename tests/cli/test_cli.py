"""The ``plings-hsm`` command in child processes, on a real SoftHSM2 token.

PINs and master texts reach the children only through the environment or standard
input, never through arguments, and no output may contain them.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import base58
import httpx
import pytest
from conftest import (
    TEST_MASTER_KEY,
    TEST_SEED,
    TEST_SO_PIN,
    TEST_USER_PIN,
    TokenInfo,
    make_token,
)
from slip10_reference import reference_fingerprint, reference_wire

from plings_hsm.backends import EnvBackend
from plings_hsm.core import BatchPrefix
from plings_hsm.secrets import Secret

CLI = Path(sys.executable).with_name("plings-hsm")
CLI_TIMEOUT_S = 60
CLI_TOKEN_LABEL = "cli-test"
API_KEY = "cli-test-api-key-93d0c1-0123456789abcdef"
OTHER_SEED = hashlib.sha256(b"cli other seed").digest()
OTHER_MASTER_KEY = base58.b58encode(OTHER_SEED).decode("ascii")

BATCH_ARGS = ["--manufacturer", "1", "--category", "1", "--class", "1", "--batch", "99999"]
PREFIX = BatchPrefix(1, 1, 1, 1, 99999)
SECRETS = [
    TEST_SEED.hex(),
    TEST_MASTER_KEY,
    OTHER_SEED.hex(),
    OTHER_MASTER_KEY,
    TEST_USER_PIN,
    TEST_SO_PIN,
    API_KEY,
]


def assert_no_secrets(output: str) -> None:
    """Fail when the output contains a seed in hex, a master text, a PIN or the API key."""
    for secret in SECRETS:
        assert secret not in output


def run_cli(
    args: list[str], env: dict[str, Any], stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``plings-hsm`` in a child process and check its output for secrets."""
    for arg in args:
        assert all(secret not in arg for secret in SECRETS)
    completed = subprocess.run(
        [str(CLI), *args],
        env=env,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )
    assert_no_secrets(completed.stdout + completed.stderr)
    return completed


def token_env(info: TokenInfo, home: Path) -> dict[str, str]:
    """Build the environment of ``pkcs11_token_env`` for a module-scoped fixture."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PLINGS_", "SOFTHSM_", "HSM_"))
    }
    env.update(
        {
            "SOFTHSM2_CONF": str(info.softhsm2_conf),
            "PLINGS_PKCS11_MODULE": str(info.module),
            "PLINGS_TOKEN_LABEL": info.label,
            "SOFTHSM_USER_PIN": info.user_pin,
            "SOFTHSM_SO_PIN": info.so_pin,
            "PLINGS_HSM_HOME": str(home),
        }
    )
    return env


@pytest.fixture(scope="module")
def cli_token() -> TokenInfo:
    return make_token(CLI_TOKEN_LABEL)


@pytest.fixture(scope="module")
def imports(
    cli_token: TokenInfo, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, subprocess.CompletedProcess[str]]:
    """Import wallet 1 from PLINGS_MASTER_KEY and wallet 2 from standard input, then again."""
    env = token_env(cli_token, tmp_path_factory.mktemp("cli-home"))
    with_master = {**env, "PLINGS_MASTER_KEY": TEST_MASTER_KEY}
    return {
        "env": run_cli(["keys", "import", "--wallet", "1"], with_master),
        "env-again": run_cli(["keys", "import", "--wallet", "1"], with_master),
        "stdin": run_cli(["keys", "import", "--wallet", "2"], env, stdin=TEST_MASTER_KEY + "\n"),
        "stdin-again": run_cli(["keys", "import", "--wallet", "2"], env, stdin=TEST_MASTER_KEY),
    }


@pytest.fixture
def cli_env(
    pkcs11_token_env: dict[str, str],
    cli_token: TokenInfo,
    imports: dict[str, subprocess.CompletedProcess[str]],
) -> dict[str, str]:
    """CLI environment on the cli-test token with wallets 1 and 2 imported."""
    return {**pkcs11_token_env, "PLINGS_TOKEN_LABEL": cli_token.label}


class TestTokenInit:
    """token init creates a token once and changes nothing the second time."""

    def test_init_twice(self, pkcs11_token_env: dict[str, str]) -> None:
        env = {**pkcs11_token_env, "PLINGS_TOKEN_LABEL": "cli-init"}
        first = run_cli(["token", "init"], env)
        second = run_cli(["token", "init"], env)
        assert first.returncode == 0, first.stderr
        assert "'cli-init' initialised" in first.stdout
        assert second.returncode == 0, second.stderr
        assert "nothing changed" in second.stdout

    def test_label_of_32_bytes(self, pkcs11_token_env: dict[str, str]) -> None:
        label = "cli-label-of-exactly-32-bytes-xx"
        assert len(label.encode()) == 32
        env = {**pkcs11_token_env, "PLINGS_TOKEN_LABEL": label}
        init = run_cli(["token", "init"], env)
        status = run_cli(["token", "status"], env)
        assert init.returncode == 0, init.stderr
        assert status.returncode == 0, status.stderr
        assert label in status.stdout

    def test_long_label_rejected(self, pkcs11_token_env: dict[str, str]) -> None:
        label = "cli-label-longer-than-32-bytes-xyz"
        first = run_cli(["token", "init", "--label", label], pkcs11_token_env)
        second = run_cli(["token", "init", "--label", label], pkcs11_token_env)
        assert first.returncode == 3, first.stdout + first.stderr
        assert "34 bytes" in first.stderr
        # A cut-short label would have made a second token under the same 32 bytes.
        assert second.returncode == 3, second.stdout + second.stderr

    def test_short_pin_rejected(self, pkcs11_token_env: dict[str, str]) -> None:
        env = {**pkcs11_token_env, "PLINGS_TOKEN_LABEL": "cli-short", "SOFTHSM_USER_PIN": "123"}
        completed = run_cli(["token", "init"], env)
        assert completed.returncode == 3
        assert "SOFTHSM_USER_PIN is 3 bytes" in completed.stderr

    def test_missing_so_pin(self, pkcs11_token_env: dict[str, str]) -> None:
        env = {**pkcs11_token_env, "PLINGS_TOKEN_LABEL": "cli-nopin"}
        del env["SOFTHSM_SO_PIN"]
        completed = run_cli(["token", "init"], env)
        assert completed.returncode == 3
        assert "SOFTHSM_SO_PIN" in completed.stderr


class TestTokenStatus:
    """token status shows the token's public facts."""

    def test_status(self, cli_env: dict[str, str]) -> None:
        completed = run_cli(["token", "status"], cli_env)
        assert completed.returncode == 0, completed.stderr
        assert CLI_TOKEN_LABEL in completed.stdout
        assert re.search(r"user_pin_initialized\s*│\s*True", completed.stdout)
        assert "serial" in completed.stdout
        assert "SoftHSM" in completed.stdout


class TestKeysImport:
    """keys import reads the master from the environment or standard input, once."""

    def test_from_env(self, imports: dict[str, subprocess.CompletedProcess[str]]) -> None:
        completed = imports["env"]
        assert completed.returncode == 0, completed.stderr
        assert "wallet 1 imported as plings_master_v1" in completed.stdout
        assert reference_fingerprint(TEST_SEED, 1) in completed.stdout

    def test_from_env_again(self, imports: dict[str, subprocess.CompletedProcess[str]]) -> None:
        completed = imports["env-again"]
        assert completed.returncode == 0, completed.stderr
        assert "nothing changed" in completed.stdout
        assert reference_fingerprint(TEST_SEED, 1) in completed.stdout

    def test_from_stdin(self, imports: dict[str, subprocess.CompletedProcess[str]]) -> None:
        completed = imports["stdin"]
        assert completed.returncode == 0, completed.stderr
        assert "wallet 2 imported as plings_master_v2" in completed.stdout
        assert reference_fingerprint(TEST_SEED, 2) in completed.stdout

    def test_from_stdin_again(self, imports: dict[str, subprocess.CompletedProcess[str]]) -> None:
        completed = imports["stdin-again"]
        assert completed.returncode == 0, completed.stderr
        assert "nothing changed" in completed.stdout

    def test_other_master_rejected(self, cli_env: dict[str, str]) -> None:
        completed = run_cli(
            ["keys", "import", "--wallet", "1"], {**cli_env, "PLINGS_MASTER_KEY": OTHER_MASTER_KEY}
        )
        assert completed.returncode == 16
        assert "plings_master_v1" in completed.stderr

    def test_malformed_stdin(self, cli_env: dict[str, str]) -> None:
        completed = run_cli(
            ["keys", "import", "--wallet", "3"], cli_env, stdin=TEST_MASTER_KEY[:20] + "0OIl"
        )
        assert completed.returncode == 4
        assert "standard input" in completed.stderr
        assert TEST_MASTER_KEY[:20] not in completed.stderr


class TestKeysList:
    """keys list shows wallet, label, scheme and the whole fingerprint."""

    def test_lists_wallets(self, cli_env: dict[str, str]) -> None:
        completed = run_cli(["keys", "list"], cli_env)
        assert completed.returncode == 0, completed.stderr
        rows = [line for line in completed.stdout.splitlines() if "plings_master_v" in line]
        assert len(rows) == 2
        for wallet, row in zip((1, 2), rows, strict=True):
            cells = [cell.strip() for cell in row.strip("│ ").split("│")]
            assert cells == [
                str(wallet),
                f"plings_master_v{wallet}",
                "slip10-ed25519",
                reference_fingerprint(TEST_SEED, wallet),
            ]


def _derive(env: dict[str, str], backend: str, output_format: str, *extra: str) -> str:
    completed = run_cli(
        ["derive", *BATCH_ARGS, "--backend", backend, "--format", output_format, *extra], env
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


class TestDerive:
    """derive prints the same keys from the env master and the token, in every format."""

    @pytest.mark.parametrize("output_format", ["table", "json", "csv", "ndjson"])
    def test_env_equals_pkcs11(self, cli_env: dict[str, str], output_format: str) -> None:
        env = {**cli_env, "PLINGS_MASTER_KEY": TEST_MASTER_KEY}
        extra = ("--start", "3", "--quantity", "7")
        from_env = _derive(env, "env", output_format, *extra)
        from_token = _derive(env, "pkcs11", output_format, *extra)
        assert from_env == from_token
        assert len(from_env.splitlines()) >= 7

    def test_long_batch_streams(self, cli_env: dict[str, str]) -> None:
        # From 10,000 keys on, a progress bar goes to stderr; stdout keeps only the keys.
        output = _derive(cli_env, "pkcs11", "ndjson", "--start", "0", "--quantity", "10000")
        lines = output.splitlines()
        assert len(lines) == 10000
        assert json.loads(lines[0]) == reference_wire(TEST_SEED, PREFIX, 0, 1)[0]
        assert json.loads(lines[-1]) == reference_wire(TEST_SEED, PREFIX, 9999, 1)[0]

    def test_json_is_wire_shape(self, cli_env: dict[str, str]) -> None:
        output = _derive(cli_env, "pkcs11", "json", "--quantity", "5")
        assert json.loads(output) == {
            "success": True,
            "count": 5,
            "keys": reference_wire(TEST_SEED, PREFIX, 1, 5),
        }

    def test_ndjson_lines(self, cli_env: dict[str, str]) -> None:
        output = _derive(cli_env, "pkcs11", "ndjson", "--start", "0", "--quantity", "3")
        lines = [json.loads(line) for line in output.splitlines()]
        assert lines == reference_wire(TEST_SEED, PREFIX, 0, 3)

    def test_csv_rows(self, cli_env: dict[str, str]) -> None:
        output = _derive(cli_env, "pkcs11", "csv", "--quantity", "3")
        rows = list(csv.DictReader(io.StringIO(output)))
        expected = reference_wire(TEST_SEED, PREFIX, 1, 3)
        assert [row["publicKey"] for row in rows] == [key["publicKey"] for key in expected]
        assert [row["hdPath"] for row in rows] == [key["hdPath"] for key in expected]
        assert [row["humanReadablePath"] for row in rows] == ["1.1.C1.99999.00001"] + [
            f"1.1.C1.99999.0000{i}" for i in (2, 3)
        ]

    def test_table_keys(self, cli_env: dict[str, str]) -> None:
        output = _derive(cli_env, "pkcs11", "table", "--quantity", "2")
        expected = reference_wire(TEST_SEED, PREFIX, 1, 2)
        rows = output.splitlines()[1:]
        assert [row.split() for row in rows] == [
            [str(key["instanceNumber"]), key["humanReadablePath"], key["publicKey"]]
            for key in expected
        ]

    def test_wallet_option(self, cli_env: dict[str, str]) -> None:
        output = _derive(cli_env, "pkcs11", "json", "--wallet", "2")
        assert json.loads(output)["keys"] == reference_wire(
            TEST_SEED, BatchPrefix(2, 1, 1, 1, 99999), 1, 1
        )

    def test_full_path(self, cli_env: dict[str, str]) -> None:
        env = {**cli_env, "PLINGS_MASTER_KEY": TEST_MASTER_KEY}
        completed = run_cli(
            [
                "derive",
                "--path",
                "m/44'/501'/1'/1'/1'/1'/99999'/42'",
                "--backend",
                "env",
                "--format",
                "json",
            ],
            env,
        )
        assert completed.returncode == 0, completed.stderr
        assert json.loads(completed.stdout)["keys"] == reference_wire(TEST_SEED, PREFIX, 42, 1)

    def test_path_h_marks(self, cli_env: dict[str, str]) -> None:
        completed = run_cli(
            ["derive", "--path", "m/44h/501H/1h/1h/1h/1h/99999h/42h", "--format", "ndjson"],
            cli_env,
        )
        assert completed.returncode == 0, completed.stderr
        assert json.loads(completed.stdout) == reference_wire(TEST_SEED, PREFIX, 42, 1)[0]

    def test_unhardened_path_exit_5(self, cli_env: dict[str, str]) -> None:
        completed = run_cli(
            ["derive", "--path", "m/44'/501'/1'/1'/1'/1'/99999'/1", "--backend", "env"],
            {**cli_env, "PLINGS_MASTER_KEY": TEST_MASTER_KEY},
        )
        assert completed.returncode == 5
        assert completed.stdout == ""
        assert "Traceback" not in completed.stderr
        lines = completed.stderr.splitlines()
        assert len(lines) == 1
        assert "m/44'/501'/1'/1'/1'/1'/99999'/1'" in lines[0]
        assert "instanceNumber" in lines[0]

    @pytest.mark.parametrize(
        "path",
        [
            "m/44'/501'/1'/1'/1'/1'/99999'/2147483648'",
            "m/44'/0'/1'/1'/1'/1'/99999'/1'",
            "m/44'/501'/1'/1'/1'/1'/99999'",
            "44'/501'/1'/1'/1'/1'/99999'/1'",
            "m/44'/501'/1'/1'/1'/1'/99999'/-1'",
        ],
        ids=["index-2-31", "coin-type", "seven-levels", "no-m", "negative"],
    )
    def test_invalid_path_exit_5(self, cli_env: dict[str, str], path: str) -> None:
        completed = run_cli(["derive", "--path", path, "--backend", "env"], cli_env)
        assert completed.returncode == 5, completed.stderr
        assert "Traceback" not in completed.stderr
        assert len(completed.stderr.splitlines()) == 1

    def test_path_with_levels_exit_5(self, cli_env: dict[str, str]) -> None:
        completed = run_cli(
            ["derive", "--path", "m/44'/501'/1'/1'/1'/1'/99999'/1'", "--manufacturer", "1"],
            cli_env,
        )
        assert completed.returncode == 5
        assert "--manufacturer" in completed.stderr

    def test_range_crossing_2_31_exit_5(self, cli_env: dict[str, str]) -> None:
        completed = run_cli(
            ["derive", *BATCH_ARGS, "--start", "2147483647", "--quantity", "2"], cli_env
        )
        assert completed.returncode == 5
        assert "2147483647" in completed.stderr

    def test_unknown_wallet_exit_6(self, cli_env: dict[str, str]) -> None:
        completed = run_cli(["derive", *BATCH_ARGS, "--wallet", "77"], cli_env)
        assert completed.returncode == 6
        assert "77" in completed.stderr


class TestSettingsText:
    """Environment values that are not UTF-8 are configuration errors, not crashes."""

    def test_non_utf8_label_exit_3(self, cli_env: dict[str, str]) -> None:
        env: dict[str, Any] = {**cli_env, "PLINGS_TOKEN_LABEL": b"cli-\xff"}
        completed = subprocess.run(
            [str(CLI), "token", "status"],
            env=env,
            capture_output=True,
            timeout=CLI_TIMEOUT_S,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        stderr = completed.stderr.decode("utf-8", "replace")
        assert completed.returncode == 3, stderr
        assert "PLINGS_TOKEN_LABEL" in stderr


class TestMalformedMaster:
    """A malformed PLINGS_MASTER_KEY exits 4, names the variable and never shows the value."""

    @pytest.mark.parametrize(
        "master",
        [
            TEST_MASTER_KEY[:-4] + "0OIl",
            TEST_MASTER_KEY[:12] + " " + TEST_MASTER_KEY[12:],
            TEST_MASTER_KEY[:12] + "\t" + TEST_MASTER_KEY[12:],
            base58.b58encode(bytes(range(7, 22))).decode("ascii"),
            base58.b58encode(bytes(range(1, 66))).decode("ascii"),
        ],
        ids=["bad-alphabet", "inner-space", "inner-tab", "15-bytes", "65-bytes"],
    )
    @pytest.mark.parametrize("command", ["derive", "import"])
    def test_exit_4(self, cli_env: dict[str, str], master: str, command: str) -> None:
        args = (
            ["derive", *BATCH_ARGS, "--backend", "env"]
            if command == "derive"
            else ["keys", "import", "--wallet", "5"]
        )
        completed = run_cli(args, {**cli_env, "PLINGS_MASTER_KEY": master})
        assert completed.returncode == 4, completed.stderr
        assert "PLINGS_MASTER_KEY" in completed.stderr
        assert "Traceback" not in completed.stderr
        output = completed.stdout + completed.stderr
        for part in master.split():
            assert part not in output
            assert part[:8] not in output

    def test_non_utf8_exit_4(self, cli_env: dict[str, str]) -> None:
        env: dict[str, Any] = {**cli_env, "PLINGS_MASTER_KEY": TEST_MASTER_KEY.encode() + b"\xff"}
        completed = subprocess.run(
            [str(CLI), "derive", *BATCH_ARGS, "--backend", "env"],
            env={key: value for key, value in env.items()},
            capture_output=True,
            timeout=CLI_TIMEOUT_S,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        stderr = completed.stderr.decode("utf-8", "replace")
        assert completed.returncode == 4, stderr
        assert "PLINGS_MASTER_KEY" in stderr
        assert TEST_MASTER_KEY.encode() not in completed.stdout + completed.stderr

    def test_non_utf8_pin_exit_3(self, cli_env: dict[str, str]) -> None:
        env: dict[str, Any] = {**cli_env, "SOFTHSM_USER_PIN": b"test-\xff-pin"}
        completed = subprocess.run(
            [str(CLI), "keys", "list"],
            env=env,
            capture_output=True,
            timeout=CLI_TIMEOUT_S,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        stderr = completed.stderr.decode("utf-8", "replace")
        assert completed.returncode == 3, stderr
        assert "SOFTHSM_USER_PIN" in stderr
        assert b"test-\xff-pin" not in completed.stdout + completed.stderr


def _doctor_setup(base_env: dict[str, str], root: Path) -> dict[str, str]:
    """Create a SoftHSM2 config with its own token folder, a token and wallet 1."""
    tokens = root / "tokens"
    tokens.mkdir(mode=0o700, parents=True)
    conf = root / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n",
        encoding="utf-8",
    )
    env = {**base_env, "SOFTHSM2_CONF": str(conf), "PLINGS_TOKEN_LABEL": "doctor-test"}
    assert run_cli(["token", "init"], env).returncode == 0
    imported = run_cli(["keys", "import"], {**env, "PLINGS_MASTER_KEY": TEST_MASTER_KEY})
    assert imported.returncode == 0, imported.stderr
    return env


@pytest.fixture(scope="module")
def doctor_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("doctor")


@pytest.fixture(scope="module")
def doctor_env(cli_token: TokenInfo, doctor_root: Path) -> dict[str, str]:
    """Environment on a token of its own, in a token folder that tests may chmod."""
    return _doctor_setup(token_env(cli_token, doctor_root / "home"), doctor_root / "softhsm")


class TestDoctor:
    """doctor passes on a good setup and names the fix when something is wrong."""

    def test_passes(self, doctor_env: dict[str, str]) -> None:
        completed = run_cli(["doctor"], doctor_env)
        assert completed.returncode == 0, completed.stdout + completed.stderr
        assert "FAIL" not in completed.stdout
        assert re.search(r"all \d+ checks passed", completed.stdout)
        assert reference_fingerprint(TEST_SEED, 1) in completed.stdout

    def test_token_folder_0755(self, doctor_env: dict[str, str], doctor_root: Path) -> None:
        tokens = doctor_root / "softhsm" / "tokens"
        tokens.chmod(0o755)
        try:
            completed = run_cli(["doctor"], doctor_env)
        finally:
            tokens.chmod(0o700)
        assert completed.returncode == 9
        row = next(line for line in completed.stdout.splitlines() if "token folder" in line)
        fix = row.strip("│ ").split("│")[-1].strip()
        assert "FAIL" in row
        assert fix.startswith("chmod ")
        assert fix.endswith(f" {tokens}")

    def test_token_missing(self, doctor_env: dict[str, str]) -> None:
        completed = run_cli(["doctor"], {**doctor_env, "PLINGS_TOKEN_LABEL": "doctor-absent"})
        assert completed.returncode == 9
        row = next(line for line in completed.stdout.splitlines() if "token by label" in line)
        assert "FAIL" in row
        assert "plings-hsm token init" in row

    def test_wrong_pin(self, doctor_env: dict[str, str]) -> None:
        completed = run_cli(["doctor"], {**doctor_env, "SOFTHSM_USER_PIN": "wrong-pin-0000"})
        assert completed.returncode == 9
        row = next(line for line in completed.stdout.splitlines() if "login" in line)
        assert "FAIL" in row
        assert "SOFTHSM_USER_PIN" in row


def _wait_for_health(url: str, verify: ssl.SSLContext, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, "serve exited early"
        try:
            if httpx.get(f"{url}/health", verify=verify, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError("serve did not answer /health within 30 s")


class TestServe:
    """One serve process answers many concurrent HTTPS requests with the env derivation."""

    @pytest.fixture
    def served(
        self, cli_env: dict[str, str], free_port: int
    ) -> Iterator[tuple[str, ssl.SSLContext]]:
        env = {
            **cli_env,
            "HSM_API_KEY": API_KEY,
            "PLINGS_HSM_PORT": str(free_port),
            # Room for the 80 requests below and the health polls within one minute.
            "PLINGS_REQUESTS_PER_MINUTE": "10000",
            "PLINGS_ADDRESS_REQUESTS_PER_MINUTE": "10000",
        }
        process = subprocess.Popen(
            [str(CLI), "serve"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        url = f"https://127.0.0.1:{free_port}"
        ca = Path(env["PLINGS_HSM_HOME"]) / "tls" / "ca.pem"
        try:
            deadline = time.monotonic() + 30
            while not ca.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            verify = ssl.create_default_context(cafile=str(ca))
            _wait_for_health(url, verify, process)
            yield url, verify
        finally:
            process.send_signal(signal.SIGTERM)
            stdout, stderr = process.communicate(timeout=30)
            assert_no_secrets(stdout + stderr)
            assert "Traceback" not in stderr
            assert process.returncode == 0, stderr

    def test_concurrent_requests(self, served: tuple[str, ssl.SSLContext]) -> None:
        url, verify = served
        thread_count = 8
        requests_per_thread = 10
        quantity = 50
        starts = list(range(1, requests_per_thread * quantity, quantity))
        env_backend = EnvBackend(Secret(TEST_MASTER_KEY))
        try:
            expected = {
                start: [key.to_wire() for key in env_backend.derive_keys(PREFIX, start, quantity)]
                for start in starts
            }
        finally:
            env_backend.close()
        statuses: list[int] = []
        mismatches: list[int] = []
        errors: list[BaseException] = []
        lock = threading.Lock()

        def work() -> None:
            body = {"manufacturer": 1, "category": 1, "classId": 1, "batch": 99999}
            try:
                with httpx.Client(base_url=url, verify=verify, timeout=60) as client:
                    for start in starts:
                        response = client.post(
                            "/api/derive-keys",
                            headers={"Authorization": f"Bearer {API_KEY}"},
                            json={**body, "quantity": quantity, "startInstance": start},
                        )
                        with lock:
                            statuses.append(response.status_code)
                            if response.json().get("keys") != expected[start]:
                                mismatches.append(start)
            except BaseException as exc:  # reported to the main thread, which asserts on it
                with lock:
                    errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(thread_count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)

        assert errors == []
        assert not any(thread.is_alive() for thread in threads)
        assert statuses == [200] * (thread_count * requests_per_thread)
        assert mismatches == []

    def test_health_fingerprints(self, served: tuple[str, ssl.SSLContext]) -> None:
        url, verify = served
        body = httpx.get(f"{url}/health", verify=verify, timeout=10).json()
        fingerprints = {
            wallet["walletVersion"]: wallet["fingerprint"] for wallet in body["wallets"]
        }
        assert fingerprints == {
            1: reference_fingerprint(TEST_SEED, 1),
            2: reference_fingerprint(TEST_SEED, 2),
        }
