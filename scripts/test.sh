#!/usr/bin/env bash
# Set up a virtualenv with the CPU build of TensorFlow and the test extras, then run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -e ".[cpu,test]"
.venv/bin/python -m pytest "$@"
