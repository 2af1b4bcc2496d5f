#!/usr/bin/env bash
# Install everything the tests need, then run the linters and the whole test suite, against
# the pure build and (its compiled modules' tests) against the mypyc-compiled build.
# Arguments go to pytest; naming tests to run skips the compiled pass.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
echo "== ruff"
.venv/bin/ruff check src tests bench
.venv/bin/ruff format --check src tests bench
echo "== mypy (strict, src/)"
.venv/bin/mypy
echo "== pytest (pure Python build)"
.venv/bin/python -m pytest "$@"

for arg in "$@"; do
  [[ $arg == -* ]] || exit 0 # a chosen test: the compiled pass is not asked for
done
if [ -x build/compiled-venv/bin/python ]; then
  # The tests of the modules setup.py compiles, and of the tools built on them: mypyc
  # must not change what they do.
  echo "== pytest (mypyc-compiled build)"
  exec build/compiled-venv/bin/python -m pytest -p no:cacheprovider "$@" \
    tests/test_dumpfile.py tests/test_upstream_assets.py tests/test_reader.py \
    tests/test_hostile_images.py tests/test_mkcomposefs_cli.py tests/test_image_validity.py \
    tests/test_reference_compare.py tests/test_scan.py tests/test_fsverity.py \
    tests/test_fuse.py tests/test_repository.py
fi
