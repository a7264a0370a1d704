#!/usr/bin/env bash
# Install what plings-hsm needs on a Debian machine: softhsm2 and a .venv with the
# package. Safe to run again: it installs only what is missing.
#   scripts/install.sh          runtime dependencies
#   scripts/install.sh --test   runtime and test dependencies
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
if [ "${1:-}" = "--test" ]; then
    extras="[test]"
fi

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

debian_packages=(softhsm2 python3-venv ca-certificates)
if [ -n "$extras" ]; then
    # OpenSC's pkcs11-spy logs every PKCS#11 call; a test counts C_Login calls with it.
    debian_packages+=(opensc-pkcs11)
fi
missing=()
for package in "${debian_packages[@]}"; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing Debian packages: ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "plings-hsm needs Python 3.11 or newer; $python is $("$python" --version 2>&1)" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet --editable ".${extras}"
