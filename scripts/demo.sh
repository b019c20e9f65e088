#!/usr/bin/env bash
# Set up a virtualenv with the CPU build of TensorFlow, then run the embedded default sweep (offline).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -e ".[cpu]"
.venv/bin/python -m harness.sweep "$@"
