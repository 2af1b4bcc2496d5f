#!/usr/bin/env bash
# Build and install composefs-py with its hot modules compiled by mypyc, into its own venv
# (build/compiled-venv), leaving the development venv pure Python.  Prints the venv path.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=build/compiled-venv
PYTHON=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check \
  "mypy>=1.10" "setuptools>=68" wheel "xxhash>=3.0" 2>&1 | grep -v "^WARNING: Location" >&2 || true
# build from a clean copy so no compiled module lands in the source tree
rm -rf build/compiled-src
mkdir -p build/compiled-src
cp -r pyproject.toml setup.py README.md src build/compiled-src/
find build/compiled-src -name '__pycache__' -prune -exec rm -rf {} +
COMPOSEFS_MYPYC=1 "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
  --no-build-isolation --force-reinstall --no-deps ./build/compiled-src 2>&1 \
  | grep -v "^WARNING: Location" >&2 || true
"$VENV/bin/python" - <<'PY'
import composefs.erofs.writer as w
assert w.__file__.endswith(".so"), f"not compiled: {w.__file__}"
PY
echo "$VENV"
