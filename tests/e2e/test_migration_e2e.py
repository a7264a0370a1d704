"""The whole migration under a bounded load on 127.0.0.1: no failed request, no changed key."""

# Fixtures are imported from migration_support, so every test parameter redefines one.
# ruff: noqa: F811

from __future__ import annotations

import random
import ssl
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from migration_support import (  # noqa: F401 - fixtures
    HSM_API_KEY,
    TEST_MASTER_KEY,
    TEST_SEED,
    RunningService,
    hsm_service,
    hsm_service_config,
    mig_backend,
    other_backend,
    reference_key,
    serve,
    tls_files,
    wait_until,
)

from plings_hsm.backends.pkcs11 import Pkcs11Backend
from plings_hsm.identifier.build import IdentifierStack, build_identifier
from plings_hsm.manager.checks import run_validate
from plings_hsm.manager.config import ManagerSettings
from plings_hsm.manager.migration import REMOVE_CONFIRMATION, Runbook
from plings_hsm.manager.notify import Notifier
from plings_hsm.secrets import Secret
from plings_hsm.service.app import create_app
from plings_hsm.service.tls import TlsFiles
from plings_hsm.store.db import Store
from plings_hsm.store.migration import change_state, load_state, step_stats

CLIENT_KEY = "e2e-client-key-0123456789abcdef"
ADMIN_KEY = "e2e-admin-key-0123456789abcdef"
USER_IDS = [f"user-{number}" for number in range(300)]
LOAD_THREADS = 4
LOAD_MAX_REQUESTS = 4000
"""Upper bound of requests one load run sends, whatever happens."""

SOAK_S = 1.2
POLL_S = 0.1


def make_settings(hsm: RunningService, *, master: bool = True, port: int = 0) -> ManagerSettings:
    return ManagerSettings(
        master_key=Secret(TEST_MASTER_KEY) if master else None,
        hsm_endpoint=hsm.url,
        hsm_api_key=HSM_API_KEY,
        hsm_ca_file=hsm.ca_file,
        hsm_timeout_s=2.0,
        hsm_retries=1,
        hsm_backoff_s=0.02,
        state_poll_s=POLL_S,
        soak_s=SOAK_S,
        gate_min_requests=5,
        gate_max_error_rate=0.05,
        gate_max_p99_ms=2000.0,
        identifier_api_keys=(Secret(CLIENT_KEY),),
        admin_api_key=Secret(ADMIN_KEY),
        identifier_url=f"https://127.0.0.1:{port}",
        identifier_ca_file=hsm.ca_file,
    )


@dataclass
class LoadResult:
    """What a load run saw: counts, failures, sources and every key served."""

    sent: int = 0
    failures: list[str] = field(default_factory=list)
    sources: Counter[str] = field(default_factory=Counter)
    served: dict[str, str] = field(default_factory=dict)
    wrong: list[str] = field(default_factory=list)

    def check_keys(self) -> None:
        """Compare every served key with bip_utils' derivation from the env master."""
        for hd_path, public_key in self.served.items():
            if public_key != reference_key(TEST_SEED, hd_path):
                self.wrong.append(hd_path)


class Load:
    """Threads sending derive requests from many user ids until stopped or bounded.

    Every key served is kept and later compared with bip_utils' derivation from the env
    master, and every failed request is kept with its status or error.
    """

    def __init__(self, urls: list[str], ca_file: Path) -> None:
        self.urls = urls
        self.ca_file = ca_file
        self.result = LoadResult()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._loop, args=(index,), daemon=True)
            for index in range(LOAD_THREADS)
        ]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> LoadResult:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        return self.result

    def _loop(self, index: int) -> None:
        chooser = random.Random(index)
        verify = ssl.create_default_context(cafile=str(self.ca_file))
        clients = [httpx.Client(base_url=url, verify=verify, timeout=10.0) for url in self.urls]
        try:
            while not self._stop.is_set():
                with self._lock:
                    if self.result.sent >= LOAD_MAX_REQUESTS:
                        return
                    self.result.sent += 1
                self._one(chooser, chooser.choice(clients))
        finally:
            for client in clients:
                client.close()

    def _one(self, chooser: random.Random, client: httpx.Client) -> None:
        body = {
            "manufacturer": 1,
            "category": chooser.randint(1, 3),
            "classId": 1,
            "batch": chooser.randint(1, 5),
            "startInstance": chooser.randint(1, 50),
            "quantity": chooser.randint(1, 3),
            "userId": chooser.choice(USER_IDS),
        }
        try:
            response = client.post(
                "/api/derive-keys", json=body, headers={"Authorization": f"Bearer {CLIENT_KEY}"}
            )
        except httpx.HTTPError as exc:
            with self._lock:
                self.result.failures.append(type(exc).__name__)
            return
        with self._lock:
            if response.status_code != 200:
                self.result.failures.append(f"status {response.status_code}: {response.text[:200]}")
                return
            self.result.sources[response.headers.get("X-Key-Source", "")] += 1
            for key in response.json()["keys"]:
                previous = self.result.served.setdefault(key["hdPath"], key["publicKey"])
                if previous != key["publicKey"]:
                    self.result.wrong.append(key["hdPath"])


@dataclass
class World:
    """An HSM service, identifier API instances, their store and the runbook."""

    hsm: RunningService
    identifiers: list[tuple[IdentifierStack, RunningService]]
    store: Store
    runbook: Runbook
    tls: TlsFiles

    @property
    def urls(self) -> list[str]:
        return [service.url for _stack, service in self.identifiers]

    def add_identifier(self, *, master: bool = True) -> tuple[IdentifierStack, RunningService]:
        stack = build_identifier(
            make_settings(self.hsm, master=master),
            self.store,
            instance=f"e2e-{len(self.identifiers)}",
        )
        service = serve(stack.app, self.tls, name="identifier")
        self.identifiers.append((stack, service))
        return stack, service

    def close(self) -> None:
        for stack, service in self.identifiers:
            service.stop()
            stack.close()
        self.identifiers.clear()


def make_world(hsm: RunningService, tls: TlsFiles, tmp_path: Path, instances: int = 1) -> World:
    store = Store(f"sqlite:///{tmp_path / 'state.db'}")
    settings = make_settings(hsm)
    world = World(hsm, [], store, Runbook(store, settings, Notifier(()), "e2e-operator"), tls)
    for _ in range(instances):
        world.add_identifier()
    return world


@pytest.fixture
def other_hsm(other_backend: Pkcs11Backend, tls_files: TlsFiles) -> Iterator[RunningService]:
    """The real HSM service over a token that contains a different master."""
    running = serve(
        create_app(other_backend, hsm_service_config(HSM_API_KEY)), tls_files, name="other-hsm"
    )
    yield running
    running.stop()


def expected_fingerprint(mig_backend: Pkcs11Backend) -> str:
    return mig_backend.wallet_fingerprint(1)


class TestFullMigration:
    """start, every step, finalize and removal under load: no failure, no changed key."""

    def test_whole_migration(
        self,
        hsm_service: RunningService,
        mig_backend: Pkcs11Backend,
        tls_files: TlsFiles,
        tmp_path: Path,
    ) -> None:
        world = make_world(hsm_service, tls_files, tmp_path)
        try:
            with Load(world.urls, tls_files.ca_cert) as load:
                world.runbook.start(expected_fingerprint(mig_backend))
                result = world.runbook.run(progress=print)
                finalized = world.runbook.finalize()
                assert wait_until(lambda: world.identifiers[0][0].manager.state.mode == "hsm", 5)
                time.sleep(0.5)
                removed = world.runbook.remove_env_master(REMOVE_CONFIRMATION)
                assert wait_until(lambda: not world.identifiers[0][0].manager.env_available, 5)
                time.sleep(0.3)
            seen = load.stop()
            seen.check_keys()
        finally:
            world.close()

        print(f"load: {seen.sent} requests, sources {dict(seen.sources)}, {len(seen.served)} keys")
        assert result.passed_steps == (5, 25, 50, 100), result.message
        assert finalized.mode == "hsm"
        assert removed.env_master_removed
        assert seen.failures == []
        assert seen.wrong == []
        assert seen.sources["hsm"] > 0
        assert seen.sources["env"] > 0

    def test_validate_after_migration(
        self,
        hsm_service: RunningService,
        mig_backend: Pkcs11Backend,
        tls_files: TlsFiles,
        tmp_path: Path,
    ) -> None:
        world = make_world(hsm_service, tls_files, tmp_path)
        try:
            with Load(world.urls, tls_files.ca_cert):
                world.runbook.start(expected_fingerprint(mig_backend))
                assert world.runbook.run().ok
            world.runbook.finalize()
            world.runbook.remove_env_master(REMOVE_CONFIRMATION)
            world.close()

            # The operator deletes PLINGS_MASTER_KEY and restarts the identifier API.
            _stack, service = world.add_identifier(master=False)
            env_file = tmp_path / "identifier.env"
            env_file.write_text("HSM_ENDPOINT=https://127.0.0.1\n# PLINGS_MASTER_KEY was here\n")
            settings = make_settings(hsm_service, port=service.port)
            settings = ManagerSettings(**{**settings.__dict__, "env_files": (env_file,)})
            checks = run_validate(settings=settings, store=world.store, environ={})
        finally:
            world.close()

        for check in checks:
            print(f"validate: {check.name}: {'pass' if check.ok else 'FAIL'}: {check.detail}")
        assert all(check.ok for check in checks), [check for check in checks if not check.ok]


class TestMismatch:
    """An HSM with another master: the first mismatch rolls back, clients keep correct keys."""

    def test_mismatch_rolls_back(
        self,
        other_hsm: RunningService,
        mig_backend: Pkcs11Backend,
        tls_files: TlsFiles,
        tmp_path: Path,
    ) -> None:
        world = make_world(other_hsm, tls_files, tmp_path)
        try:
            with Load(world.urls, tls_files.ca_cert) as load:
                world.runbook.start(expected_fingerprint(mig_backend))
                result = world.runbook.run()
                time.sleep(0.3)
            seen = load.stop()
            seen.check_keys()
            state = load_state(world.store)
            mismatches = sum(step_stats(world.store, number).mismatches for number in range(1, 4))
        finally:
            world.close()

        assert not result.ok
        assert result.passed_steps == ()
        assert state is not None
        assert state.mode == "env"
        assert mismatches >= 1
        assert seen.failures == []
        assert seen.wrong == []
        assert seen.sources["hsm"] == 0


class TestHsmStopped:
    """The HSM service stops mid-rollout: no client request fails."""

    def test_no_failed_request(
        self,
        mig_backend: Pkcs11Backend,
        tls_files: TlsFiles,
        tmp_path: Path,
    ) -> None:
        hsm = serve(
            create_app(mig_backend, hsm_service_config(HSM_API_KEY)), tls_files, name="hsm-to-stop"
        )
        world = make_world(hsm, tls_files, tmp_path)
        try:
            with Load(world.urls, tls_files.ca_cert) as load:
                world.runbook.start(expected_fingerprint(mig_backend))
                world.runbook.advance(50)
                time.sleep(0.8)
                hsm.stop()
                time.sleep(1.0)
                # Finalized but the HSM is gone: hsm mode falls back to the env master.
                change_state(
                    world.store, actor="e2e", action="set", changes={"mode": "hsm", "step": "hsm"}
                )
                time.sleep(1.0)
            seen = load.stop()
            seen.check_keys()
            state = load_state(world.store)
            assert state is not None
            stats = step_stats(world.store, state.step_number)
        finally:
            world.close()

        assert seen.failures == []
        assert seen.wrong == []
        assert stats.fallbacks > 0


class TestRollbackUnderLoad:
    """A rollback reaches every running identifier instance within the poll interval."""

    def test_rollback_propagation(
        self,
        hsm_service: RunningService,
        mig_backend: Pkcs11Backend,
        tls_files: TlsFiles,
        tmp_path: Path,
    ) -> None:
        world = make_world(hsm_service, tls_files, tmp_path, instances=2)
        verify = ssl.create_default_context(cafile=str(tls_files.ca_cert))
        probes = [httpx.Client(base_url=url, verify=verify, timeout=10.0) for url in world.urls]

        def sources() -> list[str]:
            found = []
            for probe in probes:
                response = probe.post(
                    "/api/derive-keys",
                    json={
                        "manufacturer": 1,
                        "category": 1,
                        "classId": 1,
                        "batch": 1,
                        "quantity": 1,
                        "userId": "probe",
                    },
                    headers={"Authorization": f"Bearer {CLIENT_KEY}"},
                )
                found.append(response.headers.get("X-Key-Source", ""))
            return found

        try:
            with Load(world.urls, tls_files.ca_cert) as load:
                world.runbook.start(expected_fingerprint(mig_backend))
                world.runbook.advance(100)
                assert wait_until(lambda: sources() == ["hsm", "hsm"], 5)
                started = time.perf_counter()
                world.runbook.rollback("rollback drill under load")
                assert wait_until(lambda: sources() == ["env", "env"], 10, step_s=0.01)
                propagation_s = time.perf_counter() - started
            seen = load.stop()
            seen.check_keys()
        finally:
            for probe in probes:
                probe.close()
            world.close()

        print(
            f"rollback propagation: {propagation_s * 1000:.0f} ms to 2 identifier instances "
            f"(poll interval {POLL_S * 1000:.0f} ms)"
        )
        assert propagation_s < 3 * POLL_S + 1.0
        assert seen.failures == []
        assert seen.wrong == []
