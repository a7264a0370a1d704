#!/usr/bin/env bash
# Install what is missing, then run the main job on the embedded default: a token and
# a SQLite file under PLINGS_HSM_HOME (default ./var).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
exec .venv/bin/plings-hsm demo "$@"
