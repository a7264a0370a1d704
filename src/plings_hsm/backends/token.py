"""One logged-in PKCS#11 session a process, owned by one thread.

python-pkcs11 0.10 initialises the module without locking callbacks, and with SoftHSM 2.6
two threads using their own sessions crash the process. So one worker thread owns the
process's session and every token call runs on it, queued behind a single-thread
executor. The session is opened on first use, found by token label (SoftHSM renumbers
slots after ``C_InitToken``), and the module is initialised again in a child after fork.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeoutError
from pathlib import Path
from typing import Any, TypeVar

import pkcs11
import pkcs11.exceptions as p11
import structlog

from plings_hsm.errors import (
    DuplicateTokenError,
    PinIncorrectError,
    Pkcs11ModuleError,
    TokenError,
    TokenNotFoundError,
    TokenUnavailableError,
)
from plings_hsm.secrets import Secret

__all__ = ["TokenSession", "load_module", "read_token_info"]

log = structlog.get_logger(__name__)

T = TypeVar("T")

CALL_TIMEOUT_S = 30.0
"""Time a queued token call may take before the caller gets TokenUnavailableError."""


def load_module(module: Path) -> Any:
    """Load and initialise the PKCS#11 module at ``module`` (cached by python-pkcs11).

    Raises:
        Pkcs11ModuleError: when the file is missing or is not a PKCS#11 module.
    """
    if not module.exists():
        raise Pkcs11ModuleError(
            f"PKCS#11 module {module} not found; install softhsm2 or set PLINGS_PKCS11_MODULE"
        )
    try:
        return pkcs11.lib(str(module))
    except p11.PKCS11Error as exc:
        raise Pkcs11ModuleError(f"cannot load PKCS#11 module {module}: {exc}") from exc


def _find_token(lib: Any, token_label: str) -> Any:
    """Return the one token labelled ``token_label``.

    Raises:
        TokenNotFoundError: when no token carries the label.
        DuplicateTokenError: when more than one token carries it.
    """
    try:
        return lib.get_token(token_label=token_label)
    except p11.NoSuchToken as exc:
        raise TokenNotFoundError(
            f"no token labelled {token_label!r}; run 'plings-hsm token init'"
        ) from exc
    except p11.MultipleTokensReturned as exc:
        raise DuplicateTokenError(
            f"more than one token is labelled {token_label!r}; relabel or remove one"
        ) from exc


class TokenSession:
    """Runs callables on the worker thread that owns the token session.

    Args:
        module: path of the PKCS#11 module.
        token_label: label of the token to open.
        user_pin: the user PIN. A rejected PIN is not tried again by this object: SoftHSM
            never locks a PIN, so retrying in a loop would let a wrong PIN be guessed.
    """

    def __init__(self, module: Path, token_label: str, user_pin: Secret) -> None:
        self.module = module
        self.token_label = token_label
        self._user_pin = user_pin
        self._session: Any = None
        self._pin_rejected = False
        self._users = 0

    def __repr__(self) -> str:
        return f"TokenSession(token_label={self.token_label!r})"

    @classmethod
    def acquire(cls, module: Path, token_label: str, user_pin: Secret) -> TokenSession:
        """Return the process's session object for this token, shared by every caller.

        PKCS#11 login state belongs to the process, and python-pkcs11 must be driven from
        one thread, so each token has one TokenSession a process, released by :meth:`close`.

        Raises:
            PinIncorrectError: when the shared session was opened with another PIN.
        """
        key = (str(module), token_label)
        with _registry_lock:
            _reset_after_fork()
            shared = _registry.get(key)
            if shared is None:
                shared = cls(module, token_label, user_pin)
                _registry[key] = shared
            elif not shared._user_pin.equals(user_pin.reveal()):
                raise PinIncorrectError(
                    f"token {token_label!r} is open in this process with another user PIN"
                )
            shared._users += 1
            return shared

    def call(self, function: Callable[[Any], T]) -> T:
        """Run ``function(session)`` on the token worker thread and return its result.

        Raises:
            TokenError: a subclass for each failure kind; other exceptions pass unchanged.
        """
        with _registry_lock:
            _reset_after_fork()
            executor = _worker()
        future = executor.submit(self._run, function)
        try:
            return future.result(timeout=CALL_TIMEOUT_S)
        except FutureTimeoutError as exc:
            raise TokenUnavailableError(
                f"token {self.token_label!r} call timed out after {CALL_TIMEOUT_S:.0f} s"
            ) from exc

    def _run(self, function: Callable[[Any], T]) -> T:
        session = self._open()
        try:
            return function(session)
        except (p11.SessionHandleInvalid, p11.SessionClosed, p11.DeviceRemoved) as exc:
            self._session = None
            raise TokenUnavailableError(
                f"token {self.token_label!r} session was lost: {type(exc).__name__}"
            ) from exc
        except p11.PKCS11Error as exc:
            if isinstance(exc, TokenError):
                raise
            raise TokenUnavailableError(
                f"token {self.token_label!r} call failed: {type(exc).__name__}"
            ) from exc

    def _open(self) -> Any:
        if self._session is not None:
            return self._session
        if self._pin_rejected:
            raise PinIncorrectError(
                f"token {self.token_label!r} rejected SOFTHSM_USER_PIN earlier; "
                "fix the PIN and restart instead of retrying"
            )
        token = _find_token(load_module(self.module), self.token_label)
        try:
            self._session = token.open(rw=True, user_pin=self._user_pin.reveal_text())
        except p11.PinIncorrect as exc:
            self._pin_rejected = True
            log.warning("token_login_failed", token_label=self.token_label, reason="pin_incorrect")
            raise PinIncorrectError(
                f"token {self.token_label!r} rejected SOFTHSM_USER_PIN"
            ) from exc
        except (p11.PinLenRange, p11.PinInvalid) as exc:
            self._pin_rejected = True
            raise PinIncorrectError(
                f"token {self.token_label!r} rejected SOFTHSM_USER_PIN: {type(exc).__name__}"
            ) from exc
        except p11.UserPinNotInitialized as exc:
            raise TokenError(
                f"token {self.token_label!r} has no user PIN; run 'plings-hsm token init'"
            ) from exc
        except p11.PKCS11Error as exc:
            raise TokenUnavailableError(
                f"cannot open token {self.token_label!r}: {type(exc).__name__}"
            ) from exc
        log.info("token_session_opened", token_label=self.token_label)
        return self._session

    def reinitialize(self) -> None:
        """Close every session and initialise the module again, to see tokens made elsewhere.

        SoftHSM reads its token list at ``C_Initialize``; a token initialised by another
        process appears only after this. Every TokenSession of the process logs in again
        on its next call.
        """
        with _registry_lock:
            executor = _worker()
            sessions = list(_registry.values())
        executor.submit(_reinitialize_module, self.module, sessions).result(timeout=CALL_TIMEOUT_S)

    def _close_session(self) -> None:
        if self._session is None:
            return
        try:
            self._session.close()
        except p11.PKCS11Error as exc:
            log.warning(
                "token_session_close_failed", token_label=self.token_label, error=type(exc).__name__
            )
        self._session = None
        log.info("token_session_closed", token_label=self.token_label)

    def close(self) -> None:
        """Release this caller's use; the last release closes the PKCS#11 session."""
        with _registry_lock:
            self._users -= 1
            if self._users > 0:
                return
            _registry.pop((str(self.module), self.token_label), None)
            executor = _worker()
        executor.submit(self._close_session).result(timeout=CALL_TIMEOUT_S)


_registry_lock = threading.Lock()
_registry: dict[tuple[str, str], TokenSession] = {}
_executor: ThreadPoolExecutor | None = None
_executor_pid = os.getpid()


def _worker() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pkcs11")
    return _executor


def _reset_after_fork() -> None:
    """Drop state inherited through fork: threads and module state belong to the parent."""
    global _executor, _executor_pid
    if os.getpid() == _executor_pid:
        return
    _executor_pid = os.getpid()
    _executor = None
    for shared in _registry.values():
        shared._session = None
    for lib in _loaded_modules():
        lib.reinitialize()
    log.info("token_process_forked", pid=_executor_pid)


def _loaded_modules() -> list[Any]:
    # python-pkcs11 keeps the modules it loaded in a private cache keyed by path.
    return list(getattr(pkcs11, "_loaded", {}).values())


def _reinitialize_module(module: Path, sessions: list[TokenSession]) -> None:
    for shared in sessions:
        shared._close_session()
    load_module(module).reinitialize()


def read_token_info(module: Path, token_label: str) -> dict[str, Any]:
    """Return public facts about a token (no login needed), read on the token worker thread.

    Raises:
        Pkcs11ModuleError: when the module cannot be loaded.
        TokenNotFoundError: when no token carries the label.
        DuplicateTokenError: when more than one token carries the label.
    """

    def read() -> dict[str, Any]:
        lib = load_module(module)
        token = _find_token(lib, token_label)
        flags = pkcs11.TokenFlag(token.flags)
        return {
            "label": token.label,
            "manufacturer": token.manufacturer_id,
            "model": token.model,
            "serial": token.serial.decode("ascii", "replace").strip()
            if isinstance(token.serial, bytes)
            else str(token.serial).strip(),
            "slot": token.slot.slot_id,
            "initialized": bool(flags & pkcs11.TokenFlag.TOKEN_INITIALIZED),
            "user_pin_initialized": bool(flags & pkcs11.TokenFlag.USER_PIN_INITIALIZED),
            "login_required": bool(flags & pkcs11.TokenFlag.LOGIN_REQUIRED),
            "user_pin_locked": bool(flags & pkcs11.TokenFlag.USER_PIN_LOCKED),
            "library": lib.library_description,
            "library_version": ".".join(str(part) for part in lib.library_version),
        }

    with _registry_lock:
        _reset_after_fork()
        executor = _worker()
    return executor.submit(read).result(timeout=CALL_TIMEOUT_S)
