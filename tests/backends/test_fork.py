"""The token session survives fork: a child initialises PKCS#11 again and derives."""

from __future__ import annotations

import multiprocessing
from multiprocessing.queues import Queue

import pytest
from conftest import TEST_SEED, TEST_USER_PIN, TokenInfo, make_token

from plings_hsm.backends import Pkcs11Backend
from plings_hsm.core import BatchPrefix
from plings_hsm.secrets import Secret

PREFIX = BatchPrefix(1, 1, 1, 1, 99999)


@pytest.fixture(scope="module")
def fork_token() -> TokenInfo:
    return make_token("fork-test")


def _derive_in_child(backend: Pkcs11Backend, results: Queue[object]) -> None:
    try:
        keys = backend.derive_keys(PREFIX, 1, 3)
        results.put([key.public_key for key in keys])
    except Exception as exc:  # reported to the parent, which asserts on it
        results.put(f"{type(exc).__name__}: {exc}")


class TestForkedChild:
    """A forked child derives through the parent's backend object with its own session."""

    def test_child_derives_same_keys(self, fork_token: TokenInfo) -> None:
        backend = Pkcs11Backend(fork_token.module, fork_token.label, Secret(TEST_USER_PIN))
        try:
            backend.import_master(1, TEST_SEED)
            in_parent = [key.public_key for key in backend.derive_keys(PREFIX, 1, 3)]

            context = multiprocessing.get_context("fork")
            results: Queue[object] = context.Queue()
            child = context.Process(target=_derive_in_child, args=(backend, results))
            child.start()
            in_child = results.get(timeout=60)
            child.join(timeout=60)

            assert in_child == in_parent
            assert child.exitcode == 0
            assert [key.public_key for key in backend.derive_keys(PREFIX, 1, 3)] == in_parent
        finally:
            backend.close()
