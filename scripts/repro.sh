#!/usr/bin/env bash
# Set up (idempotent), then run the DVC pipeline with the project's venv on PATH (stages call `sdrpn`).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/sdrpn ] || bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
dvc repro "$@"
sdrpn report --html artifacts/report.html   # the same tables, and one self-contained page with the plots
