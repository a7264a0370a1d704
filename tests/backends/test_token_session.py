"""Token failures: each has its own error class and CLI exit code, and a wrong PIN is tried once.

PKCS#11 login state belongs to the process, so the wrong-PIN and missing-module cases run
in child processes: the ``plings-hsm`` command, or a short Python script.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TEST_MASTER_KEY, TEST_SEED, TEST_SO_PIN, TEST_USER_PIN, TokenInfo, make_token
from pkcs11 import Attribute, KeyType, ObjectClass

from plings_hsm.backends import Pkcs11Backend, TokenSession
from plings_hsm.backends.token import load_module, read_token_info
from plings_hsm.cli.exit_codes import exit_code_of
from plings_hsm.core import BatchPrefix
from plings_hsm.errors import (
    PinIncorrectError,
    Pkcs11ModuleError,
    TokenNotFoundError,
    WalletNotFoundError,
)
from plings_hsm.secrets import Secret

CLI = Path(sys.executable).with_name("plings-hsm")
CLI_TIMEOUT_S = 60
WRONG_PIN = "wrong-pin-0000"
SPY_MODULE = Path("/usr/lib/x86_64-linux-gnu/pkcs11/pkcs11-spy.so")
"""OpenSC's PKCS#11 spy: forwards to PKCS11SPY and logs every call to PKCS11SPY_OUTPUT."""

PREFIX = BatchPrefix(1, 1, 1, 1, 99999)
DERIVE_ARGS = ["derive", "--manufacturer", "1", "--category", "1", "--class", "1", "--batch", "1"]

# Two derivations after a wrong PIN in one process. Prints [class name, message] of each.
TWICE_AFTER_WRONG_PIN = """
import json, os, sys
from pathlib import Path
from plings_hsm.backends import Pkcs11Backend
from plings_hsm.core import BatchPrefix
from plings_hsm.errors import PlingsHsmError
from plings_hsm.secrets import Secret

backend = Pkcs11Backend(Path(sys.argv[1]), sys.argv[2], Secret(os.environ["SOFTHSM_USER_PIN"]))
outcomes = []
for _ in range(2):
    try:
        backend.derive_keys(BatchPrefix(1, 1, 1, 1, 1), 1, 1)
        outcomes.append(["ok", ""])
    except PlingsHsmError as exc:
        outcomes.append([type(exc).__name__, str(exc)])
print(json.dumps(outcomes))
"""


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run ``plings-hsm`` with ``args`` in a child process and capture its output."""
    return subprocess.run(
        [str(CLI), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def last_json_line(stdout: str) -> Any:
    """Parse the last line of the script's output, because unconfigured structlog logs above it."""
    return json.loads(stdout.strip().splitlines()[-1])


def assert_no_secrets(output: str) -> None:
    """Fail when the output contains a PIN, the test seed or the test master text."""
    assert TEST_USER_PIN not in output
    assert TEST_SO_PIN not in output
    assert WRONG_PIN not in output
    assert TEST_SEED.hex() not in output
    assert TEST_MASTER_KEY not in output


def assert_one_error_line(completed: subprocess.CompletedProcess[str]) -> str:
    """Return the single ``error:`` line on stderr, and fail on a traceback."""
    assert "Traceback" not in completed.stderr
    errors = [line for line in completed.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, completed.stderr
    return errors[0]


@pytest.fixture(scope="module")
def session_token() -> TokenInfo:
    """A token with wallet 1 imported from TEST_SEED."""
    info = make_token("ts-test")
    backend = Pkcs11Backend(info.module, info.label, Secret(TEST_USER_PIN))
    try:
        backend.import_master(1, TEST_SEED)
    finally:
        backend.close()
    return info


@pytest.fixture
def session_env(pkcs11_token_env: dict[str, str], session_token: TokenInfo) -> dict[str, str]:
    """CLI environment on the ts-test token."""
    return {**pkcs11_token_env, "PLINGS_TOKEN_LABEL": session_token.label}


@pytest.fixture(scope="module")
def duplicate_token() -> TokenInfo:
    """A token whose wallet 1 label is on two objects."""
    info = make_token("ts-dup")
    backend = Pkcs11Backend(info.module, info.label, Secret(TEST_USER_PIN))

    def count(session: Any) -> int:
        return len(list(session.get_objects({Attribute.LABEL: "plings_master_v1"})))

    def create_second(session: Any) -> None:
        session.create_object(
            {
                Attribute.CLASS: ObjectClass.SECRET_KEY,
                Attribute.KEY_TYPE: KeyType.GENERIC_SECRET,
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.SENSITIVE: True,
                Attribute.LABEL: "plings_master_v1",
                Attribute.VALUE: bytes(32),
            }
        )

    try:
        backend.import_master(1, TEST_SEED)
        if backend.token.call(count) == 1:
            backend.token.call(create_second)
    finally:
        backend.close()
    return info


class TestTokenNotFound:
    """A missing token label is TokenNotFoundError and exit 12."""

    def test_backend_raises(self, token: TokenInfo) -> None:
        backend = Pkcs11Backend(token.module, "ts-absent", Secret(TEST_USER_PIN))
        try:
            with pytest.raises(TokenNotFoundError) as caught:
                backend.derive_keys(PREFIX, 1, 1)
        finally:
            backend.close()
        assert "ts-absent" in str(caught.value)
        assert exit_code_of(caught.value) == 12

    def test_token_info_raises(self, token: TokenInfo) -> None:
        with pytest.raises(TokenNotFoundError):
            read_token_info(token.module, "ts-absent")

    @pytest.mark.parametrize(
        "args",
        [DERIVE_ARGS, ["keys", "list"], ["token", "status"]],
        ids=["derive", "keys-list", "token-status"],
    )
    def test_cli_exit_12(self, pkcs11_token_env: dict[str, str], args: list[str]) -> None:
        env = {**pkcs11_token_env, "PLINGS_TOKEN_LABEL": "ts-absent"}
        completed = run_cli(args, env)
        assert completed.returncode == 12, completed.stderr
        assert "ts-absent" in assert_one_error_line(completed)
        assert_no_secrets(completed.stdout + completed.stderr)


class TestWrongPin:
    """A rejected PIN is PinIncorrectError and exit 13, and one process logs in once."""

    def test_cli_exit_13(self, session_env: dict[str, str]) -> None:
        completed = run_cli(DERIVE_ARGS, {**session_env, "SOFTHSM_USER_PIN": WRONG_PIN})
        assert completed.returncode == 13, completed.stderr
        assert "SOFTHSM_USER_PIN" in assert_one_error_line(completed)
        assert_no_secrets(completed.stdout + completed.stderr)

    def test_keys_list_exit_13(self, session_env: dict[str, str]) -> None:
        completed = run_cli(["keys", "list"], {**session_env, "SOFTHSM_USER_PIN": WRONG_PIN})
        assert completed.returncode == 13, completed.stderr
        assert_no_secrets(completed.stdout + completed.stderr)

    def test_second_call_not_retried(
        self, session_env: dict[str, str], session_token: TokenInfo
    ) -> None:
        env = {**session_env, "SOFTHSM_USER_PIN": WRONG_PIN}
        completed = subprocess.run(
            [sys.executable, "-c", TWICE_AFTER_WRONG_PIN, str(session_token.module), "ts-test"],
            env=env,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT_S,
            check=True,
        )
        first, second = last_json_line(completed.stdout)
        assert first[0] == "PinIncorrectError"
        assert second[0] == "PinIncorrectError"
        assert "earlier" not in first[1]
        # The second message comes from the rejected-PIN flag, raised before any token call.
        assert "rejected SOFTHSM_USER_PIN earlier" in second[1]
        assert_no_secrets(completed.stdout + completed.stderr)

    @pytest.mark.skipif(not SPY_MODULE.exists(), reason="OpenSC pkcs11-spy is not installed")
    def test_token_sees_one_login(
        self, session_env: dict[str, str], session_token: TokenInfo, tmp_path: Path
    ) -> None:
        spy_log = tmp_path / "spy.log"
        env = {
            **session_env,
            "SOFTHSM_USER_PIN": WRONG_PIN,
            "PKCS11SPY": str(session_token.module),
            "PKCS11SPY_OUTPUT": str(spy_log),
        }
        completed = subprocess.run(
            [sys.executable, "-c", TWICE_AFTER_WRONG_PIN, str(SPY_MODULE), "ts-test"],
            env=env,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT_S,
            check=True,
        )
        outcomes = last_json_line(completed.stdout)
        calls = [
            line.split(": ", 1)[1] for line in spy_log.read_text().splitlines() if ": C_" in line
        ]
        assert [outcome[0] for outcome in outcomes] == ["PinIncorrectError", "PinIncorrectError"]
        assert calls.count("C_Login") == 1
        assert calls.count("C_OpenSession") == 1

    @pytest.mark.skipif(not SPY_MODULE.exists(), reason="OpenSC pkcs11-spy is not installed")
    def test_serve_logs_in_once(
        self, session_env: dict[str, str], session_token: TokenInfo, tmp_path: Path, free_port: int
    ) -> None:
        spy_log = tmp_path / "spy.log"
        env = {
            **session_env,
            "SOFTHSM_USER_PIN": WRONG_PIN,
            "PLINGS_PKCS11_MODULE": str(SPY_MODULE),
            "PKCS11SPY": str(session_token.module),
            "PKCS11SPY_OUTPUT": str(spy_log),
            "HSM_API_KEY": "token-session-test-api-key-0123456789",
            "PLINGS_HSM_PORT": str(free_port),
        }
        completed = run_cli(["serve"], env)
        calls = [
            line.split(": ", 1)[1] for line in spy_log.read_text().splitlines() if ": C_" in line
        ]
        assert completed.returncode == 13, completed.stderr
        assert calls.count("C_Login") == 1
        assert_no_secrets(completed.stdout + completed.stderr)

    def test_other_pin_in_process_rejected(self, session_token: TokenInfo) -> None:
        shared = TokenSession.acquire(session_token.module, "ts-test", Secret(TEST_USER_PIN))
        try:
            with pytest.raises(PinIncorrectError) as caught:
                TokenSession.acquire(session_token.module, "ts-test", Secret(WRONG_PIN))
            # The session opened with the right PIN keeps working.
            backend = Pkcs11Backend(session_token.module, "ts-test", Secret(TEST_USER_PIN))
            try:
                assert backend.wallet_versions() == [1]
            finally:
                backend.close()
        finally:
            shared.close()
        assert "another user PIN" in str(caught.value)
        assert WRONG_PIN not in str(caught.value)
        assert exit_code_of(caught.value) == 13


class TestModuleMissing:
    """A missing or broken PKCS#11 module is Pkcs11ModuleError and exit 11."""

    def test_load_raises(self) -> None:
        with pytest.raises(Pkcs11ModuleError) as caught:
            load_module(Path("/nonexistent.so"))
        assert "/nonexistent.so" in str(caught.value)
        assert exit_code_of(caught.value) == 11

    @pytest.mark.parametrize(
        "args",
        [DERIVE_ARGS, ["keys", "list"], ["token", "status"], ["token", "init"]],
        ids=["derive", "keys-list", "token-status", "token-init"],
    )
    def test_cli_exit_11(self, session_env: dict[str, str], args: list[str]) -> None:
        completed = run_cli(args, {**session_env, "PLINGS_PKCS11_MODULE": "/nonexistent.so"})
        assert completed.returncode == 11, completed.stderr
        assert "/nonexistent.so" in assert_one_error_line(completed)
        assert_no_secrets(completed.stdout + completed.stderr)

    @pytest.mark.parametrize("args", [DERIVE_ARGS, ["token", "init"]], ids=["derive", "token-init"])
    def test_not_a_module_exit_11(
        self, session_env: dict[str, str], tmp_path: Path, args: list[str]
    ) -> None:
        fake = tmp_path / "libfake.so"
        fake.write_bytes(b"not a shared object\n")
        completed = run_cli(args, {**session_env, "PLINGS_PKCS11_MODULE": str(fake)})
        assert completed.returncode == 11, completed.stderr
        assert str(fake) in assert_one_error_line(completed)


# Initialises two tokens with one label, which C_InitToken allows; the PyKCS11 module
# is loaded again for the second, so that it sees the slot the first one used up.
TWIN_TOKENS = """
import sys
import PyKCS11

module, label, so_pin = sys.argv[1:]
for _ in range(2):
    lib = PyKCS11.PyKCS11Lib()
    lib.load(module)
    for slot in lib.getSlotList(tokenPresent=True):
        if not lib.getTokenInfo(slot).flags & PyKCS11.CKF_TOKEN_INITIALIZED:
            lib.initToken(slot, so_pin, label.ljust(32))
            break
    lib.unload()
"""


@pytest.fixture
def twin_env(
    session_env: dict[str, str], session_token: TokenInfo, tmp_path: Path
) -> dict[str, str]:
    """CLI environment on a token folder of its own with two tokens labelled ts-twin."""
    tokens = tmp_path / "tokens"
    tokens.mkdir(mode=0o700)
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n")
    env = {**session_env, "SOFTHSM2_CONF": str(conf), "PLINGS_TOKEN_LABEL": "ts-twin"}
    subprocess.run(
        [sys.executable, "-c", TWIN_TOKENS, str(session_token.module), "ts-twin", TEST_SO_PIN],
        env=env,
        check=True,
        timeout=CLI_TIMEOUT_S,
        capture_output=True,
    )
    return env


class TestDuplicateTokenLabel:
    """Two tokens under one label are a token error on every command, never an internal one."""

    @pytest.mark.parametrize(
        "args",
        [DERIVE_ARGS, ["keys", "list"], ["token", "status"]],
        ids=["derive", "keys-list", "token-status"],
    )
    def test_exit_10(self, twin_env: dict[str, str], args: list[str]) -> None:
        completed = run_cli(args, twin_env)
        assert completed.returncode == 10, completed.stderr
        assert "more than one token" in assert_one_error_line(completed)

    def test_doctor_fails(self, twin_env: dict[str, str]) -> None:
        completed = run_cli(["doctor"], twin_env)
        assert completed.returncode == 9, completed.stderr
        assert "more than one token" in completed.stdout
        assert "Traceback" not in completed.stderr


class TestObjectErrors:
    """Missing wallets and duplicate labels map to their own exit codes."""

    def test_wallet_not_found_exit_6(self, session_env: dict[str, str]) -> None:
        completed = run_cli([*DERIVE_ARGS, "--wallet", "999"], session_env)
        assert completed.returncode == 6, completed.stderr
        assert "999" in assert_one_error_line(completed)

    def test_wallet_not_found_in_process(self, session_token: TokenInfo) -> None:
        backend = Pkcs11Backend(session_token.module, "ts-test", Secret(TEST_USER_PIN))
        try:
            with pytest.raises(WalletNotFoundError):
                backend.derive_keys(BatchPrefix(999, 1, 1, 1, 1), 1, 1)
        finally:
            backend.close()

    def test_duplicate_label_exit_15(
        self, pkcs11_token_env: dict[str, str], duplicate_token: TokenInfo
    ) -> None:
        env = {**pkcs11_token_env, "PLINGS_TOKEN_LABEL": duplicate_token.label}
        completed = run_cli(DERIVE_ARGS, env)
        assert completed.returncode == 15, completed.stderr
        assert "plings_master_v1" in assert_one_error_line(completed)

    def test_mismatch_exit_16(self, session_env: dict[str, str]) -> None:
        other = "5HueCGU8rMjxEXxiPuD5BDku4MkFqeZyd4dZ1jvhTVqvbTLvyTJ"  # 37 bytes, not TEST_SEED
        completed = run_cli(
            ["keys", "import", "--wallet", "1"], {**session_env, "PLINGS_MASTER_KEY": other}
        )
        assert completed.returncode == 16, completed.stderr
        assert "plings_master_v1" in assert_one_error_line(completed)
        assert other not in completed.stdout + completed.stderr


@pytest.fixture(autouse=True)
def _no_inherited_secrets() -> Iterator[None]:
    """Keep the test process's own environment free of PINs, so children get only ours."""
    assert "SOFTHSM_USER_PIN" not in os.environ
    yield
