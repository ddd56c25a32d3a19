#!/usr/bin/env bash
# Set up (idempotent) and run the linter and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/sdrpn ] || bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest
