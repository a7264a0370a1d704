"""Measure the HSM service's request rate for 100-key batches over HTTPS on loopback.

Sets up a throwaway SoftHSM2 token, wallet and local CA in a temporary folder, then
measures in the same run:

- the in-process rate: Pkcs11Backend.derive_keys for one 100-key batch, in a loop;
- the HTTPS rate: POST /api/derive-keys with quantity 100 from 1 and 4 client threads,
  each on its own keep-alive connection, with budgets raised out of the way. It uses
  HSM_API_KEY, and once a key from the state store.

Prints each rate and its ratio to the in-process rate. Every loop is bounded by a
request count and a time limit; traffic goes to 127.0.0.1 only.

    .venv/bin/python scripts/bench_service.py [--seconds 10] [--quantity 100]
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import ssl
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from plings_hsm.backends.pkcs11 import Pkcs11Backend
from plings_hsm.backends.token_init import init_token
from plings_hsm.core.path import BatchPrefix
from plings_hsm.logs import configure_logging
from plings_hsm.secrets import Secret
from plings_hsm.service.app import create_app
from plings_hsm.service.config import ServiceConfig
from plings_hsm.service.server import ServiceServer, tls_config
from plings_hsm.service.tls import ensure_local_tls
from plings_hsm.settings import find_pkcs11_module
from plings_hsm.store.api_keys import ApiKeyStore
from plings_hsm.store.db import Store

BATCH = BatchPrefix(wallet=1, manufacturer=1, category=1, class_id=1, batch=99999)
REQUESTS_MAX = 200_000
"""Upper bound on requests of one measurement, besides its time limit."""

LARGE_BUDGET = 100_000_000


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _in_process_rate(backend: Pkcs11Backend, quantity: int, seconds: float) -> float:
    done = 0
    started = time.perf_counter()
    deadline = started + seconds
    while time.perf_counter() < deadline and done < REQUESTS_MAX:
        backend.derive_keys(BATCH, 1 + done % 1000, quantity)
        done += 1
    return done / (time.perf_counter() - started)


def _https_rate(
    url: str, ca: Path, key: str, quantity: int, seconds: float, threads: int
) -> tuple[float, int]:
    verify = ssl.create_default_context(cafile=str(ca))
    counts = [0] * threads
    failures = [0] * threads
    barrier = threading.Barrier(threads + 1)
    deadline_box: list[float] = []

    def work(slot: int) -> None:
        body = {
            "manufacturer": BATCH.manufacturer,
            "category": BATCH.category,
            "classId": BATCH.class_id,
            "batch": BATCH.batch,
            "walletVersion": BATCH.wallet,
            "quantity": quantity,
        }
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=url, verify=verify, timeout=30) as client:
            client.get("/health")
            barrier.wait()
            while time.perf_counter() < deadline_box[0] and counts[slot] < REQUESTS_MAX:
                body["startInstance"] = 1 + counts[slot] % 1000
                response = client.post("/api/derive-keys", headers=headers, json=body)
                if response.status_code != 200:
                    failures[slot] += 1
                counts[slot] += 1

    workers = [threading.Thread(target=work, args=(slot,)) for slot in range(threads)]
    for worker in workers:
        worker.start()
    started = time.perf_counter()
    deadline_box.append(started + seconds)
    barrier.wait()
    for worker in workers:
        worker.join(timeout=seconds + 60)
    elapsed = time.perf_counter() - started
    return sum(counts) / elapsed, sum(failures)


def main() -> None:
    """Run the measurements and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="Length of each run.")
    parser.add_argument("--quantity", type=int, default=100, help="Keys per request.")
    args = parser.parse_args()
    configure_logging("WARNING")

    with tempfile.TemporaryDirectory(prefix="plings-bench-") as folder:
        root = Path(folder)
        (root / "tokens").mkdir(mode=0o700)
        conf = root / "softhsm2.conf"
        conf.write_text(
            f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\n"
            "log.level = ERROR\n",
            encoding="utf-8",
        )
        os.environ["SOFTHSM2_CONF"] = str(conf)
        module = find_pkcs11_module(os.environ.get("PLINGS_PKCS11_MODULE"))
        pin = Secret(secrets.token_hex(8))
        init_token(module, "bench", Secret(secrets.token_hex(8)), pin, conf)
        backend = Pkcs11Backend(module, "bench", pin)
        seed = bytearray(secrets.token_bytes(32))
        backend.import_master(1, seed)
        seed[:] = bytes(32)

        (root / "tls").mkdir(mode=0o700)
        tls = ensure_local_tls(root / "tls")
        api_key = secrets.token_urlsafe(32)
        store = Store(f"sqlite:///{root / 'bench.db'}")
        key_store = ApiKeyStore(store)
        _, store_key = key_store.create("bench")
        config = ServiceConfig(
            api_keys=(Secret(api_key),),
            key_store=key_store,
            budget_requests_per_minute=LARGE_BUDGET,
            budget_keys_per_minute=LARGE_BUDGET,
        )
        app = create_app(backend, config)
        server = ServiceServer(
            tls_config(app, "127.0.0.1", _free_port(), tls.server_cert, tls.server_key),
            name="bench",
        )
        server.start()
        try:
            reference = _in_process_rate(backend, args.quantity, args.seconds)
            print(
                f"in-process pkcs11 derive_keys, {args.quantity} keys: "
                f"{reference:8.1f} batches/s ({reference * args.quantity:,.0f} keys/s)"
            )
            runs = [("HSM_API_KEY", api_key, 1), ("HSM_API_KEY", api_key, 4)]
            runs.append(("store key", store_key.reveal_text(), 1))
            for key_kind, key, threads in runs:
                rate, failed = _https_rate(
                    server.url, tls.ca_cert, key, args.quantity, args.seconds, threads
                )
                print(
                    f"HTTPS POST /api/derive-keys, {args.quantity} keys, {key_kind}, "
                    f"{threads} client(s): {rate:8.1f} requests/s "
                    f"({rate * args.quantity:,.0f} keys/s), "
                    f"{rate / reference:.2f} x in-process, {failed} non-200"
                )
        finally:
            server.stop()
            backend.close()
            store.close()
    print(f"python {sys.version.split()[0]}, nproc {os.cpu_count()}")


if __name__ == "__main__":
    main()
