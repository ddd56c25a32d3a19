#!/usr/bin/env bash
# Create .venv and install the project with its dev tools, on this machine's local CPU torch wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
# torch first, exactly the local CPU build: the project admits a range of torch versions, and resolving that range
# alone would fetch the newest (a CUDA build of gigabytes); with 2.13.0 installed, the range is already met.
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e '.[dev]'
