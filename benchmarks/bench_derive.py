"""Measure derivation speed: the core with PyNaCl against references measured in the same run.

Usage: .venv/bin/python benchmarks/bench_derive.py [--keys N] [--requests N]

Prints keys a second for
  - the core (batch node derived once, one child step an instance, public key by PyNaCl),
  - the same steps with the public key from cryptography (reference),
  - bip-utils deriving each full path (independent reference, when installed),
and requests a second for 100-key batches from the env backend and from the pkcs11
backend on a throwaway SoftHSM2 token (the difference is the per-request seed unwrap).
"""

from __future__ import annotations

import argparse
import hmac
import os
import platform
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import base58
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from plings_hsm.core import BatchPrefix, open_batch_node
from plings_hsm.core.slip10 import ExtendedKey, derive_indexes
from plings_hsm.logs import configure_logging

SEED = bytes(range(32))
PREFIX = BatchPrefix(1, 1, 1, 1, 99999)
BATCH_QUANTITY = 100


def _rate(label: str, count: int, run: Callable[[], None]) -> float:
    started = time.perf_counter()
    run()
    elapsed = time.perf_counter() - started
    rate = count / elapsed
    print(f"{label:<58} {rate:>12,.0f} /s  ({count} in {elapsed:.3f} s)")
    return rate


def _core(keys: int) -> None:
    with open_batch_node(SEED, PREFIX) as node:
        for _ in node.iter_keys(1, keys):
            pass


def _core_with_cryptography(keys: int) -> None:
    node = derive_indexes(SEED, PREFIX.indexes)
    chain, private = bytes(node.chain_code), bytes(node.private_key)
    for instance in range(1, keys + 1):
        data = b"\x00" + private + struct.pack(">I", instance + 0x8000_0000)
        child = ExtendedKey(hmac.digest(chain, data, "sha512"))
        Ed25519PrivateKey.from_private_bytes(bytes(child.private_key)).public_key().public_bytes(
            Encoding.Raw, PublicFormat.Raw
        )


def _bip_utils(keys: int) -> None:
    from bip_utils import Bip32Slip10Ed25519

    root = Bip32Slip10Ed25519.FromSeed(SEED)
    for instance in range(1, keys + 1):
        root.DerivePath(f"m/44'/501'/1'/1'/1'/1'/99999'/{instance}'").PublicKey().RawCompressed()


def _backend_rates(requests: int) -> None:
    from plings_hsm.backends import EnvBackend, Pkcs11Backend, init_token
    from plings_hsm.secrets import Secret
    from plings_hsm.settings import find_pkcs11_module

    env = EnvBackend(Secret(base58.b58encode(SEED)))
    env_rate = _rate(
        f"env backend, {BATCH_QUANTITY}-key requests",
        requests,
        lambda: [env.derive_keys(PREFIX, 1, BATCH_QUANTITY) for _ in range(requests)],
    )

    module = find_pkcs11_module(os.environ.get("PLINGS_PKCS11_MODULE"))
    pin = Secret(os.urandom(16).hex())
    init_token(module, "bench", Secret(os.urandom(16).hex()), pin, None)
    backend = Pkcs11Backend(module, "bench", pin)
    backend.token.reinitialize()
    backend.import_master(1, SEED)
    token_rate = _rate(
        f"pkcs11 backend, {BATCH_QUANTITY}-key requests",
        requests,
        lambda: [backend.derive_keys(PREFIX, 1, BATCH_QUANTITY) for _ in range(requests)],
    )
    print(f"{'ratio pkcs11 / env':<58} {token_rate / env_rate:>12.2f}")
    backend.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=20_000, help="keys per derivation run")
    parser.add_argument("--requests", type=int, default=300, help="requests per backend run")
    args = parser.parse_args()
    configure_logging("WARNING")

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    print(f"machine: {os.cpu_count()} cores, {cpu}; Python {platform.python_version()}")
    core = _rate("core, PyNaCl public key", args.keys, lambda: _core(args.keys))
    reference = _rate(
        "same steps, cryptography public key (reference)",
        args.keys,
        lambda: _core_with_cryptography(args.keys),
    )
    print(f"{'ratio core / cryptography reference':<58} {core / reference:>12.2f}")
    try:
        bip_keys = max(1, args.keys // 10)
        bip = _rate(
            "bip-utils, full path per key (reference)", bip_keys, lambda: _bip_utils(bip_keys)
        )
        print(f"{'ratio core / bip-utils':<58} {core / bip:>12.2f}")
    except ImportError:
        print("bip-utils not installed; skipped")

    with tempfile.TemporaryDirectory(prefix="plings-bench-") as folder:
        tokens = Path(folder) / "tokens"
        tokens.mkdir()
        conf = Path(folder) / "softhsm2.conf"
        conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n")
        os.environ["SOFTHSM2_CONF"] = str(conf)
        _backend_rates(args.requests)


if __name__ == "__main__":
    sys.exit(main())
