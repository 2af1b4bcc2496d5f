"""Shared fixtures: where the upstream conformance assets live, and tool probes."""

from __future__ import annotations

import gzip
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

import composefs.erofs.writer as erofs_writer

# fixtures of a real local registry (docker-registry) for the OCI tests
pytest_plugins = ["registry"]

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("COMPOSEFS_SHARED", REPO.parent / "shared"))
UPSTREAM = SHARED / "testdata" / "upstream"

# The reference test suite parses these leniently (testdata/upstream/README.md).
LENIENT_ASSETS = frozenset(
    {"no-newline.dump", "longlink.dump", "honggfuzz-longlink-unterminated.dump"}
)


@dataclass(frozen=True)
class Asset:
    name: str
    path: Path
    sha256: str
    version: int | None

    @property
    def strict(self) -> bool:
        return self.name not in LENIENT_ASSETS

    def read(self) -> bytes:
        data = self.path.read_bytes()
        return gzip.decompress(data) if self.name.endswith(".gz") else data

    @property
    def version_kwargs(self) -> dict[str, int]:
        if self.version is None:
            return {}
        return {"min_version": self.version, "max_version": self.version}


def _assets() -> list[Asset]:
    if not UPSTREAM.is_dir():
        return []
    out = []
    for sha in sorted(UPSTREAM.glob("*.sha256")):
        name = sha.name[: -len(".sha256")]
        version_file = UPSTREAM / (name + ".version")
        version = int(version_file.read_text().strip()) if version_file.exists() else None
        out.append(Asset(name, UPSTREAM / name, sha.read_text().split()[0], version))
    return out


ASSETS = _assets()
SHOULD_FAIL = sorted(UPSTREAM.glob("should-fail-*.dump")) if UPSTREAM.is_dir() else []
needs_upstream = pytest.mark.skipif(
    not UPSTREAM.is_dir(), reason=f"upstream assets not found at {UPSTREAM} (../shared absent)"
)


def asset_params() -> list[object]:
    if not ASSETS:
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"no assets at {UPSTREAM}"))]
    return [pytest.param(a, id=a.name) for a in ASSETS]


# The same suite runs against the mypyc-compiled build (scripts/test.sh); compiled classes
# cannot be monkeypatched or introspected the way a few tests of internals do.
COMPILED = erofs_writer.__file__.endswith(".so")
pure_python_only = pytest.mark.skipif(
    COMPILED, reason="patches or introspects pure-Python internals (compiled build)"
)


def have_tool(name: str) -> bool:
    return shutil.which(name) is not None
