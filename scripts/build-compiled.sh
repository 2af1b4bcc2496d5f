#!/usr/bin/env bash
# Build and install composefs-py with its hot modules compiled by mypyc, into its own venv
# (build/compiled-venv), leaving the development venv (.venv, editable) pure Python.
# Prints the venv path.  Safe to run again: the compiled modules are rebuilt only when
# they (or the build setup) changed; other changed modules are copied in as they are,
# which is all a rebuild would do with them.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=build/compiled-venv
STAMP=$VENV/.compiled-sources.sha256
PYTHON=${PYTHON:-python3}

# mypyc's output is C: it needs a compiler and the Python headers
include=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
if ! command -v cc >/dev/null 2>&1 || [ ! -f "$include/Python.h" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "build-compiled: installing gcc and python3-dev" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends gcc libc6-dev python3-dev >/dev/null
  else
    echo "build-compiled: no C compiler or Python headers ($include/Python.h)" >&2
    exit 3 # bootstrap tells this apart from a failing build
  fi
fi

# the modules setup.py compiles, and what decides how they are built
compiled=$("$PYTHON" - <<'PY'
import ast, pathlib
tree = ast.parse(pathlib.Path("setup.py").read_text())
for node in ast.walk(tree):
    if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "COMPILED_MODULES":
        print("\n".join(ast.literal_eval(node.value)))
PY
)
stamp=$(sha256sum setup.py pyproject.toml $compiled | sha256sum | cut -d' ' -f1)

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$stamp" ] && [ -d "$site/composefs" ]; then
  # Only pure modules changed (if anything): bring them in without recompiling.
  (cd src && find composefs -name '*.py' -o -name py.typed) | while read -r f; do
    case " $(echo $compiled) " in *" src/$f "*) continue ;; esac
    cmp -s "src/$f" "$site/$f" || install -D -m 644 "src/$f" "$site/$f"
  done
  "$VENV/bin/python" -m compileall -q "$site/composefs" >/dev/null
  echo "$VENV"
  exit 0
fi

echo "build-compiled: compiling $(echo "$compiled" | wc -l) modules with mypyc (about a minute and a half)" >&2
"$VENV/bin/python" -m pip install -q --disable-pip-version-check \
  "mypy>=1.10" "setuptools>=68" wheel pytest hypothesis 2>&1 | grep -v "^WARNING: Location" >&2 || true
# build from a clean copy so no compiled module lands in the source tree
rm -rf build/compiled-src
mkdir -p build/compiled-src
cp -r pyproject.toml setup.py README.md src build/compiled-src/
find build/compiled-src -name '__pycache__' -prune -exec rm -rf {} +
"$VENV/bin/python" -m pip uninstall -q -y composefs >/dev/null 2>&1 || true
COMPOSEFS_MYPYC=1 "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
  --no-build-isolation ./build/compiled-src 2>&1 \
  | grep -v "^WARNING: Location" >&2 || true
"$VENV/bin/python" - <<'PY'
import composefs.erofs.writer as w
assert w.__file__.endswith(".so"), f"not compiled: {w.__file__}"
PY
"$VENV/bin/python" -m compileall -q "$site/composefs" >/dev/null
echo "$stamp" >"$STAMP"
echo "$VENV"
