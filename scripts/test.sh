#!/usr/bin/env bash
# Set up a virtualenv with the CPU build of TensorFlow, PyTorch and the test extras, check lint, formatting and
# types, then run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
# pip compiles every installed module to bytecode one file after another (about 45 s of a 70 s
# install on 2 cores); compileall does the same files on every core. Skipping the compilation
# altogether is slower: where PYTHONDONTWRITEBYTECODE is set, every process would then compile
# TensorFlow again at import.
# The torch extra too, at the pinned pair of scripts/torch-constraints.txt (CPU-only builds where
# PIP_EXTRA_INDEX_URL names PyTorch's CPU index; see there).
.venv/bin/pip install --quiet --no-compile -c scripts/torch-constraints.txt -e ".[cpu,test,torch]"
# Like pip's own, this compilation only saves time: a file that does not compile is left to import.
.venv/bin/python -m compileall -q -j 0 .venv/lib > /dev/null || true
# Lint, formatting and types first: a lint or type error fails CI before the tests start.
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy harness
.venv/bin/python -m pytest "$@"
