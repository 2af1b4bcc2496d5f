#!/usr/bin/env bash
# Prepare a fresh machine for composefs-py: the system tools the tests use, and a venv
# with the package installed in editable mode.  Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

# tool -> Debian package; installed when missing and we are root (CI and dev machines are)
declare -A PACKAGES=(
  [fsck.erofs]=erofs-utils
  [fsverity]=fsverity
  [getfattr]=attr
  [fusermount3]=fuse3
  [docker-registry]=docker-registry # OCI tests: a real local registry
  [skopeo]=skopeo
  [umoci]=umoci
  [htpasswd]=apache2-utils
)
missing=()
for tool in "${!PACKAGES[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("${PACKAGES[$tool]}")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "bootstrap: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "bootstrap: missing ${missing[*]} (not root: tests needing them will skip)" >&2
  fi
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]' 2>&1 \
  | grep -v "^WARNING: Location" >&2 || true
# An editable install leaves the sources uncompiled; with PYTHONDONTWRITEBYTECODE set (as
# on these machines) every command would compile them again at start-up.
.venv/bin/python -m compileall -q src >/dev/null
.venv/bin/python -c "import composefs" # fail loudly if the install did not work

# The fast build of the same package, with its hot modules compiled by mypyc, goes into
# build/compiled-venv: the demo runs it and the tests run against it too.  COMPOSEFS_PURE=1
# skips it; without a compiler (and not root to install one) only the pure build exists.
if [ "${COMPOSEFS_PURE:-0}" != 1 ]; then
  status=0
  bash scripts/build-compiled.sh >/dev/null || status=$?
  if [ "$status" = 3 ]; then
    echo "bootstrap: no compiled build; the pure build in .venv does everything, slower" >&2
  elif [ "$status" != 0 ]; then
    exit "$status"
  fi
fi
