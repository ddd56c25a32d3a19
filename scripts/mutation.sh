#!/usr/bin/env bash
# Mutation testing of the core modules (not part of CI: README, Development). Arguments go to scripts/mutation.py.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/sdrpn ] || bash scripts/setup.sh
[ -x .venv/bin/mutmut ] || .venv/bin/pip install -q -e '.[mutation]'
exec .venv/bin/python scripts/mutation.py "$@"
