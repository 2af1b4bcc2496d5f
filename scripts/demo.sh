#!/usr/bin/env bash
# Install composefs-py and run it on the built-in example: build an image from
# examples/demo.dump and show what it is.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
python=.venv/bin/python
[ -x build/compiled-venv/bin/python ] && python=build/compiled-venv/bin/python # the fast build
exec "$python" examples/demo.py "$@"
