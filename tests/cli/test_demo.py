"""``plings-hsm demo`` end to end in a child process, on a fresh home in a temporary folder."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import base58
import pytest
from bip_utils import Bip32Slip10Ed25519
from conftest import TEST_MASTER_KEY, TEST_SEED

CLI = Path(sys.executable).with_name("plings-hsm")
DEMO_TIMEOUT_S = 120
DEMO_PREFIX = (44, 501, 1, 1, 1, 1, 99999)
"""Path levels of the demo batch: wallet 1, manufacturer 1, category 1, class 1, batch 99999."""

ROW_RE = re.compile(
    r"│\s*(\d+)\s*│\s*(1\.1\.C1\.99999\.\d{5})\s*│\s*([1-9A-HJ-NP-Za-km-z]{32,44})\s*│"
)
FINGERPRINT_RE = re.compile(r"fingerprint ([1-9A-HJ-NP-Za-km-z]{32,44})")


def reference_public_key(seed: bytes, indexes: tuple[int, ...]) -> str:
    """Return the base58 public key bip_utils derives at m/i1'/i2'/... for a seed."""
    path = "m" + "".join(f"/{index}'" for index in indexes)
    node = Bip32Slip10Ed25519.FromSeed(seed).DerivePath(path)
    return base58.b58encode(node.PublicKey().RawCompressed().ToBytes()[1:]).decode("ascii")


def reference_fingerprint(seed: bytes, wallet: int) -> str:
    """Return base58(sha256(domain + bip_utils public key at m/44'/501'/wallet'))."""
    wallet_key = base58.b58decode(reference_public_key(seed, (44, 501, wallet)))
    digest = hashlib.sha256(b"plings-hsm fingerprint v1" + wallet_key).digest()
    return base58.b58encode(digest).decode("ascii")


def demo_env(home: Path, port: int, **extra: str) -> dict[str, str]:
    """Return the test process's environment without PINs, masters, keys or SoftHSM config."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PLINGS_", "SOFTHSM", "HSM_"))
    }
    env.update({"PLINGS_HSM_HOME": str(home), "PLINGS_HSM_PORT": str(port), **extra})
    return env


def run_demo(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run ``plings-hsm demo`` with a permissive umask, as on a default Debian login."""
    return subprocess.run(
        [str(CLI), "demo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT_S,
        check=False,
        stdin=subprocess.DEVNULL,
        umask=0o022,
    )


def dev_secrets(home: Path) -> list[str]:
    """Return every development secret under ``home/dev`` and the seed hex of its master."""
    found = []
    for path in sorted((home / "dev").iterdir()):
        found.append(path.read_text(encoding="ascii").strip())
    master = home / "dev" / "master.key"
    if master.exists():
        found.append(base58.b58decode(master.read_text(encoding="ascii").strip()).hex())
    return found


def assert_no_secrets(output: str, secrets: list[str]) -> None:
    """Fail when the output contains one of ``secrets``."""
    assert secrets
    for secret in secrets:
        assert secret
        assert secret not in output


def printed_rows(stdout: str) -> list[tuple[int, str, str]]:
    """Return the (instance, humanReadablePath, publicKey) rows of the demo's key table."""
    return [(int(match[0]), match[1], match[2]) for match in ROW_RE.findall(stdout)]


@pytest.fixture(scope="module")
def demo_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("demo") / "home"


@pytest.fixture(scope="module")
def demo_runs(demo_home: Path) -> list[subprocess.CompletedProcess[str]]:
    """Run the demo twice on one fresh home, each time on a port that was free a moment ago."""
    runs = []
    for _ in range(2):
        runs.append(run_demo(demo_env(demo_home, _free_port())))
    return runs


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class TestFirstRun:
    """The first run initialises the token, imports the dev master and checks 100 keys."""

    def test_exit_0(self, demo_runs: list[subprocess.CompletedProcess[str]]) -> None:
        first = demo_runs[0]
        assert first.returncode == 0, first.stdout + first.stderr

    def test_prints_ok(self, demo_runs: list[subprocess.CompletedProcess[str]]) -> None:
        assert "OK: all 100 keys" in demo_runs[0].stdout
        assert "100 equal, 0 differ" in demo_runs[0].stdout

    def test_prints_home(
        self, demo_runs: list[subprocess.CompletedProcess[str]], demo_home: Path
    ) -> None:
        assert f"home: {demo_home}\n" in demo_runs[0].stdout

    def test_token_initialised(self, demo_runs: list[subprocess.CompletedProcess[str]]) -> None:
        assert "token 'plings-demo': initialised" in demo_runs[0].stdout
        assert "wallet 1: imported" in demo_runs[0].stdout

    def test_fingerprint_of_dev_master(
        self, demo_runs: list[subprocess.CompletedProcess[str]], demo_home: Path
    ) -> None:
        master = (demo_home / "dev" / "master.key").read_text(encoding="ascii").strip()
        expected = reference_fingerprint(base58.b58decode(master), 1)
        printed = set(FINGERPRINT_RE.findall(demo_runs[0].stdout))
        assert printed == {expected}

    def test_printed_keys_match(
        self, demo_runs: list[subprocess.CompletedProcess[str]], demo_home: Path
    ) -> None:
        master = (demo_home / "dev" / "master.key").read_text(encoding="ascii").strip()
        seed = base58.b58decode(master)
        rows = printed_rows(demo_runs[0].stdout)
        assert [row[0] for row in rows] == [1, 2, 3, 4, 5, 96, 97, 98, 99, 100]
        for instance, human_readable, public_key in rows:
            assert human_readable == f"1.1.C1.99999.{instance:05d}"
            assert public_key == reference_public_key(seed, (*DEMO_PREFIX, instance))

    def test_modes(
        self, demo_runs: list[subprocess.CompletedProcess[str]], demo_home: Path
    ) -> None:
        wrong = []
        for path in [demo_home, *demo_home.rglob("*")]:
            mode = stat.S_IMODE(path.lstat().st_mode)
            expected = 0o700 if path.is_dir() else 0o600
            if mode != expected:
                wrong.append(f"{path} {mode:o}")
        assert (demo_home / "tokens").is_dir()
        assert (demo_home / "dev" / "master.key").is_file()
        assert wrong == []

    def test_no_secrets(
        self, demo_runs: list[subprocess.CompletedProcess[str]], demo_home: Path
    ) -> None:
        secrets = dev_secrets(demo_home)
        for run in demo_runs:
            assert_no_secrets(run.stdout + run.stderr, secrets)

    def test_no_traceback(self, demo_runs: list[subprocess.CompletedProcess[str]]) -> None:
        for run in demo_runs:
            assert "Traceback" not in run.stderr


class TestSecondRun:
    """Running the demo again keeps the token and the wallet and still passes."""

    def test_exit_0(self, demo_runs: list[subprocess.CompletedProcess[str]]) -> None:
        second = demo_runs[1]
        assert second.returncode == 0, second.stdout + second.stderr

    def test_token_present(self, demo_runs: list[subprocess.CompletedProcess[str]]) -> None:
        assert "token 'plings-demo': present" in demo_runs[1].stdout

    def test_wallet_already_imported(
        self, demo_runs: list[subprocess.CompletedProcess[str]]
    ) -> None:
        assert "wallet 1: already imported" in demo_runs[1].stdout

    def test_same_fingerprint_and_keys(
        self, demo_runs: list[subprocess.CompletedProcess[str]]
    ) -> None:
        first, second = demo_runs
        assert set(FINGERPRINT_RE.findall(second.stdout)) == set(
            FINGERPRINT_RE.findall(first.stdout)
        )
        assert printed_rows(second.stdout) == printed_rows(first.stdout)
        assert "OK: all 100 keys" in second.stdout

    def test_other_master_rejected(
        self, demo_runs: list[subprocess.CompletedProcess[str]], demo_home: Path, free_port: int
    ) -> None:
        # The token of this home contains the dev master, so a different env master must
        # not replace it.
        completed = run_demo(demo_env(demo_home, free_port, PLINGS_MASTER_KEY=TEST_MASTER_KEY))
        assert completed.returncode == 16, completed.stdout + completed.stderr
        assert "OK:" not in completed.stdout
        assert "plings_master_v1" in completed.stderr
        assert_no_secrets(
            completed.stdout + completed.stderr,
            [*dev_secrets(demo_home), TEST_MASTER_KEY, TEST_SEED.hex()],
        )


class TestEnvMaster:
    """With PLINGS_MASTER_KEY set, the demo imports it and prints its independent fingerprint."""

    def test_fingerprint(self, tmp_path: Path, free_port: int) -> None:
        home = tmp_path / "home"
        completed = run_demo(demo_env(home, free_port, PLINGS_MASTER_KEY=TEST_MASTER_KEY))
        assert completed.returncode == 0, completed.stdout + completed.stderr
        assert "OK: all 100 keys" in completed.stdout
        printed = set(FINGERPRINT_RE.findall(completed.stdout))
        assert printed == {reference_fingerprint(TEST_SEED, 1)}
        assert not (home / "dev" / "master.key").exists()
        rows = printed_rows(completed.stdout)
        assert len(rows) == 10
        for instance, _, public_key in rows:
            assert public_key == reference_public_key(TEST_SEED, (*DEMO_PREFIX, instance))
        assert_no_secrets(
            completed.stdout + completed.stderr,
            [TEST_MASTER_KEY, TEST_SEED.hex(), *dev_secrets(home)],
        )


class TestBusyPort:
    """A demo whose port is taken exits 3 and names PLINGS_HSM_PORT."""

    def test_exit_3(self, tmp_path: Path) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = int(taken.getsockname()[1])
            completed = run_demo(demo_env(tmp_path / "home", port))
        assert completed.returncode == 3, completed.stdout + completed.stderr
        assert "PLINGS_HSM_PORT" in completed.stderr
        assert "internal error" not in completed.stderr
        assert "OK:" not in completed.stdout
