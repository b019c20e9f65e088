#!/usr/bin/env bash
# Set up a virtualenv with the CPU build of TensorFlow and the test extras, check lint, formatting and
# types, then run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -e ".[cpu,test]"
# Lint, formatting and types first: a lint or type error fails CI before the tests start.
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy harness
.venv/bin/python -m pytest "$@"
