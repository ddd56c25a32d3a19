#!/usr/bin/env bash
# Create .venv and install the project (torch pinned to the local CPU wheel) with its dev tools.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[dev]'
