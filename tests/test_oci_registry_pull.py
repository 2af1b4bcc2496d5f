"""cfsctl oci pull from a real registry (docker-registry on 127.0.0.1): images built with
umoci, pushed with skopeo, pulled with our client, mounted, compared with the source."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from mounted import assert_same_tree, kernel_mount_skip_reason
from registry import Layer, LocalRegistry, build_image, run

from composefs.cli import cfsctl
from composefs.oci.pull import pull
from composefs.repository import Repository

BASE = Layer(files={
    "usr/": "", "usr/bin/": "", "usr/bin/tool": os.urandom(20000),
    "usr/share/doc/readme": "hello\n" * 100, "etc/": "", "etc/os-release": "ID=test\n",
    "etc/gone": "to be deleted", "usr/lib/big.so": os.urandom(300000),
})  # fmt: skip
UPPER = Layer(delete=["etc/gone"], files={"app/run": os.urandom(9000), "etc/app.conf": "x=1\n"})


@pytest.fixture(scope="module")
def pushed(registry: LocalRegistry, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Two images sharing their base layer, pushed as test/app:one and test/app:two."""
    root = tmp_path_factory.mktemp("images")
    layout = root / "layout"
    digests = {
        "one": build_image(layout, "one", [BASE, UPPER]),
        "two": build_image(layout, "two", [BASE, Layer(files={"other": os.urandom(4000)})]),
    }
    for tag in digests:
        registry.push(layout, tag, "test/app")
    digests["layout"] = str(layout)
    return digests


def _unpacked(layout: str, tag: str, dest: Path) -> Path:
    """The image unpacked by umoci: the tree a container runtime would see."""
    run("umoci", "unpack", "--image", f"{layout}:{tag}", dest)
    return dest / "rootfs"


def test_pull_mount_and_compare_with_umoci_unpack(
    registry: LocalRegistry, pushed: dict[str, str], tmp_path: Path
) -> None:
    repo, _ = Repository.init(tmp_path / "repo")
    ref = f"docker://{registry.host}/test/app:one"
    result = pull(repo, ref, tls_verify=False)
    assert result.manifest_digest == pushed["one"]
    assert result.layers_fetched == 2
    assert repo.oci_refs().keys() == {ref}
    reason = kernel_mount_skip_reason()
    if reason:
        pytest.skip(reason)
    expected = _unpacked(pushed["layout"], "one", tmp_path / "bundle")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    repo.mount(result.image_id, mnt)
    try:
        assert not (mnt / "etc/gone").exists()
        assert_same_tree(expected, mnt)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_two_images_share_their_base_layer(
    registry: LocalRegistry, pushed: dict[str, str], tmp_path: Path
) -> None:
    repo, _ = Repository.init(tmp_path / "repo")
    one = pull(repo, f"docker://{registry.host}/test/app:one", tls_verify=False)
    two = pull(repo, f"docker://{registry.host}/test/app:two", tls_verify=False)
    assert (two.layers_fetched, two.layers_reused) == (1, 1)
    assert two.objects_added == 1
    stats = {i.id: i for i in repo.stats().images}
    assert stats[one.image_id].shared_bytes >= 300000  # big.so and tool, stored once


def test_pull_by_digest_and_the_cli(
    registry: LocalRegistry, pushed: dict[str, str], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    repo, _ = Repository.init(tmp_path / "repo")
    source = f"docker://{registry.host}/test/app@{pushed['two']}"
    args = ["--repo", str(repo.path), "oci", "pull", "--tls-verify=false", "--json", source, "t"]
    assert cfsctl.main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["manifest_digest"] == pushed["two"] and out["name"] == "t"


def test_basic_auth(auth_registry: LocalRegistry, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    build_image(layout, "t", [Layer(files={"f": os.urandom(3000)})])
    auth_registry.push(layout, "t", "private/app")
    repo, _ = Repository.init(tmp_path / "repo")
    source = f"docker://{auth_registry.host}/private/app:t"
    with pytest.raises(Exception, match="UNAUTHORIZED"):
        pull(repo, source, tls_verify=False)
    assert repo.oci_refs() == {}
    assert auth_registry.creds is not None
    result = pull(repo, source, tls_verify=False, creds=auth_registry.creds)
    assert result.layers_fetched == 1


def test_credentials_saved_by_skopeo_login(
    auth_registry: LocalRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """The auth file a real `skopeo login` writes gives pull its credentials: named by
    --authfile, or found through REGISTRY_AUTH_FILE as the containers tools look."""
    layout = tmp_path / "layout"
    build_image(layout, "t", [Layer(files={"g": os.urandom(3000)})])
    auth_registry.push(layout, "t", "private/saved")
    assert auth_registry.creds is not None
    user, password = auth_registry.creds
    authfile = tmp_path / "auth.json"
    run("skopeo", "login", "--authfile", authfile, "--tls-verify=false", "-u", user,
        "--password-stdin", auth_registry.host, input=password)  # fmt: skip
    repo, _ = Repository.init(tmp_path / "repo")
    source = f"docker://{auth_registry.host}/private/saved:t"
    base = ["--repo", str(repo.path), "oci", "pull", "--tls-verify=false", source]
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "nothing-here.json"))
    assert cfsctl.main(base) == 1
    assert "UNAUTHORIZED" in capsys.readouterr().err
    assert cfsctl.main([*base, "a", "--authfile", str(authfile)]) == 0
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(authfile))
    assert cfsctl.main([*base, "b"]) == 0
    assert sorted(repo.oci_refs()) == ["a", "b"]
    capsys.readouterr()
    assert cfsctl.main([*base, "--authfile", str(tmp_path / "missing.json")]) == 1
    assert capsys.readouterr().err == f"cfsctl: auth file {tmp_path}/missing.json: no such file\n"
