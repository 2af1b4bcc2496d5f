#!/usr/bin/env bash
# Install everything the tests need, then run the linters and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
echo "== ruff"
.venv/bin/ruff check src tests bench
.venv/bin/ruff format --check src tests bench
echo "== mypy (strict, src/)"
.venv/bin/mypy
echo "== pytest"
exec .venv/bin/python -m pytest "$@"
