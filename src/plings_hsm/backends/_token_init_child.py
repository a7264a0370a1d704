"""Child process that initialises a token with PyKCS11 (``C_InitToken`` and ``C_InitPIN``).

python-pkcs11 cannot initialise a token, and PyKCS11 and python-pkcs11 cannot both
initialise the PKCS#11 module in one process, so this runs in a process of its own.
It reads one JSON object from standard input (module, label, PINs), so the PINs never
appear in any process's arguments, and writes one JSON result to standard output.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

LABEL_BYTES = 32


def _run(request: dict[str, Any]) -> dict[str, Any]:
    import PyKCS11

    lib = PyKCS11.PyKCS11Lib()
    try:
        lib.load(request["module"])
    except PyKCS11.PyKCS11Error as exc:
        return {"ok": False, "kind": "module", "message": f"cannot load {request['module']}: {exc}"}

    label: str = request["label"]
    free_slot = None
    for slot in lib.getSlotList(tokenPresent=True):
        info = lib.getTokenInfo(slot)
        if not info.flags & PyKCS11.CKF_TOKEN_INITIALIZED:
            free_slot = slot if free_slot is None else free_slot
            continue
        if info.label.rstrip(" \x00") == label:
            return {"ok": False, "kind": "exists", "message": f"token {label!r} already exists"}
    if free_slot is None:
        return {"ok": False, "kind": "no_slot", "message": "no uninitialised slot is free"}

    try:
        lib.initToken(free_slot, request["so_pin"], label.ljust(LABEL_BYTES))
        session = lib.openSession(free_slot, PyKCS11.CKF_SERIAL_SESSION | PyKCS11.CKF_RW_SESSION)
        session.login(request["so_pin"], PyKCS11.CKU_SO)
        session.initPin(request["user_pin"])
        session.logout()
        session.closeSession()
    except PyKCS11.PyKCS11Error as exc:
        # The exception text is a return-code name such as CKR_PIN_LEN_RANGE, never a PIN.
        return {"ok": False, "kind": "pkcs11", "message": str(exc)}
    return {"ok": True, "kind": "initialised", "message": f"token {label!r} initialised"}


def main() -> None:
    request = json.loads(sys.stdin.read())
    # PyKCS11's C code prints load failures with printf on file descriptor 1. Keep the
    # original standard output for the JSON result and send everything else to stderr.
    result_fd = os.dup(1)
    os.dup2(2, 1)
    with os.fdopen(result_fd, "w", encoding="utf-8") as result_out:
        json.dump(_run(request), result_out)


if __name__ == "__main__":
    main()
