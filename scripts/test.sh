#!/usr/bin/env bash
# Set up a virtualenv with the CPU build of TensorFlow and the test extras, check lint, formatting and
# types, then run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
# --no-compile: Python compiles each module the first time it is imported, instead of pip compiling
# every file of TensorFlow and the rest up front, most of which no test imports (about 30 s less on 2 cores).
.venv/bin/pip install --quiet --no-compile -e ".[cpu,test]"
# Lint, formatting and types first: a lint or type error fails CI before the tests start.
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy harness
.venv/bin/python -m pytest "$@"
