#!/usr/bin/env bash
# Install what is missing, then run the whole test suite against a real SoftHSM2 token.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh --test
exec .venv/bin/python -m pytest "$@"
