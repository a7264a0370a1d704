"""Edge cases of the CLI and the token found by hostile use: odd seeds, races, signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import base58
import pytest
from bip_utils import Bip32Slip10Ed25519
from conftest import TEST_SO_PIN, TEST_USER_PIN, TokenInfo, make_token

CLI = Path(sys.executable).with_name("plings-hsm")
CLI_TIMEOUT_S = 60
EDGE_TOKEN_LABEL = "edge-test"
BATCH_ARGS = ["--manufacturer", "1", "--category", "1", "--class", "1", "--batch", "99999"]


def _env(info: TokenInfo, home: Path, **extra: str) -> dict[str, str]:
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
            "SOFTHSM_USER_PIN": TEST_USER_PIN,
            "SOFTHSM_SO_PIN": TEST_SO_PIN,
            "PLINGS_HSM_HOME": str(home),
        }
    )
    env.update(extra)
    return env


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CLI), *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )


def _reference_key(seed: bytes, path: str) -> str:
    node = Bip32Slip10Ed25519.FromSeed(seed).DerivePath(path)
    return base58.b58encode(node.PublicKey().RawCompressed().ToBytes()[1:]).decode("ascii")


@pytest.fixture(scope="module")
def edge_token() -> TokenInfo:
    return make_token(EDGE_TOKEN_LABEL)


class TestOddSeedLengths:
    """Seeds whose length is not a multiple of 8 import and derive like any other."""

    @pytest.mark.parametrize("length", [17, 31, 33, 63])
    def test_import_and_derive(self, edge_token: TokenInfo, tmp_path: Path, length: int) -> None:
        seed = bytes((index * 37 + length) % 256 for index in range(length))
        wallet = 100 + length
        env = _env(edge_token, tmp_path, PLINGS_MASTER_KEY=base58.b58encode(seed).decode())
        path = f"m/44'/501'/{wallet}'/1'/1'/1'/99999'/1'"

        imported = _run(["keys", "import", "--wallet", str(wallet)], env)
        from_token = _run(["derive", "--path", path, "--format", "csv"], env)

        assert imported.returncode == 0, imported.stderr
        assert from_token.returncode == 0, from_token.stderr
        assert _reference_key(seed, path) in from_token.stdout


class TestConcurrentImports:
    """Parallel imports of different masters leave exactly one object under the label."""

    def test_one_master_survives(self, edge_token: TokenInfo, tmp_path: Path) -> None:
        wallet = "77"
        seeds = [bytes([count]) * 32 for count in range(1, 5)]
        children = [
            subprocess.Popen(
                [str(CLI), "keys", "import", "--wallet", wallet],
                env=_env(edge_token, tmp_path, PLINGS_MASTER_KEY=base58.b58encode(seed).decode()),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for seed in seeds
        ]
        codes = [child.wait(timeout=CLI_TIMEOUT_S) for child in children]
        listing = _run(["keys", "list"], _env(edge_token, tmp_path))

        assert codes.count(0) == 1
        assert listing.returncode == 0, listing.stderr
        assert listing.stdout.count("plings_master_v77") == 1


class TestDeriveOutput:
    """derive prints nothing to stdout when it fails before the first key."""

    @pytest.mark.parametrize("output_format", ["json", "table", "csv", "ndjson"])
    def test_unknown_wallet_prints_nothing(
        self, edge_token: TokenInfo, tmp_path: Path, output_format: str
    ) -> None:
        env = _env(edge_token, tmp_path)
        result = _run(["derive", *BATCH_ARGS, "--wallet", "999", "--format", output_format], env)
        assert result.returncode == 6
        assert result.stdout == ""

    def test_path_rejects_quantity(self, edge_token: TokenInfo, tmp_path: Path) -> None:
        env = _env(edge_token, tmp_path)
        path = "m/44'/501'/1'/1'/1'/1'/99999'/1'"
        result = _run(["derive", "--path", path, "--quantity", "5"], env)
        assert result.returncode == 5
        assert "--quantity" in result.stderr

    @pytest.mark.parametrize("value", ["1_0", "+3", "010", " 3", "3.0"])
    def test_rejects_loose_integers(
        self, edge_token: TokenInfo, tmp_path: Path, value: str
    ) -> None:
        args = [
            "derive",
            "--manufacturer",
            "1",
            "--category",
            "1",
            "--class",
            value,
            "--batch",
            "1",
        ]
        result = _run(args, _env(edge_token, tmp_path))
        assert result.returncode == 5
        assert "--class" in result.stderr


class TestServeSignals:
    """serve stops cleanly on SIGTERM and refuses a token without wallets."""

    def test_sigterm_stops_cleanly(
        self, edge_token: TokenInfo, tmp_path: Path, free_port: int
    ) -> None:
        env = _env(
            edge_token,
            tmp_path,
            PLINGS_MASTER_KEY=base58.b58encode(bytes(range(32))).decode(),
            HSM_API_KEY="edge-test-api-key-0123456789abcdef",
            PLINGS_HSM_PORT=str(free_port),
        )
        assert _run(["keys", "import", "--wallet", "1"], env).returncode in (0, 16)
        server = subprocess.Popen(
            [str(CLI), "serve"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 20
        started = False
        assert server.stderr is not None
        while time.monotonic() < deadline and not started:
            line = server.stderr.readline()
            started = "service_started" in line
        server.send_signal(signal.SIGTERM)
        _, rest = server.communicate(timeout=30)

        assert started
        assert server.returncode == 0
        assert "service_stopped" in rest
        assert "token_session_closed" in rest

    def test_empty_token_rejected(self, tmp_path: Path, free_port: int) -> None:
        empty = make_token("edge-empty")
        env = _env(
            empty,
            tmp_path,
            HSM_API_KEY="edge-test-api-key-0123456789abcdef",
            PLINGS_HSM_PORT=str(free_port),
        )
        result = _run(["serve"], env)
        assert result.returncode == 3
        assert "contains no wallet" in result.stderr
