"""The reference's own conformance suite: every asset with a .sha256 must build
byte-identically; every should-fail asset must be rejected."""

from __future__ import annotations

import hashlib

import pytest
from conftest import SHOULD_FAIL, Asset, asset_params, needs_upstream

from composefs import dumpfile
from composefs.erofs.writer import build_image
from composefs.errors import ComposefsError


@pytest.mark.parametrize("asset", asset_params())
def test_asset_builds_identical_image(asset: Asset) -> None:
    tree = dumpfile.parse(asset.read(), strict=asset.strict, source=asset.name)
    image = build_image(tree, **asset.version_kwargs)
    assert hashlib.sha256(image).hexdigest() == asset.sha256


@needs_upstream
@pytest.mark.parametrize("path", SHOULD_FAIL, ids=lambda p: p.name)
def test_should_fail_asset_is_rejected(path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ComposefsError):
        tree = dumpfile.parse(path.read_bytes(), strict=True, source=path.name)
        build_image(tree)
