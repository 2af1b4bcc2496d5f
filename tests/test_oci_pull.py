"""Pulling OCI images from layouts and archives into a repository (no network needed)."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from ocihelpers import (
    LAYER_TAR,
    LAYER_ZSTD,
    entry,
    layer_tar,
    write_docker_archive,
    write_layout,
)

from composefs import fsverity
from composefs.cli import cfsctl
from composefs.erofs.reader import load_tree
from composefs.errors import ComposefsError
from composefs.oci.image import OciError
from composefs.oci.pull import pull
from composefs.repository import Repository

BASE = [
    entry("usr/", kind=tarfile.DIRTYPE),
    entry("usr/bin/", kind=tarfile.DIRTYPE),
    entry("usr/bin/sh", os.urandom(30000), mode=0o755),
    entry("usr/lib/", kind=tarfile.DIRTYPE),
    entry("usr/lib/libc.so", os.urandom(50000)),
    entry("etc/", kind=tarfile.DIRTYPE),
    entry("etc/os-release", b"ID=test\n"),
    entry("etc/passwd", b"root:x:0:0::/root:/bin/sh\n" * 5),
    entry("bin", kind=tarfile.SYMTYPE, linkname="usr/bin"),
]


def _repo(tmp_path: Path) -> Repository:
    repo, _ = Repository.init(tmp_path / "repo")
    return repo


def _files(repo: Repository, image_id: str) -> dict[bytes, bytes | None]:
    """path -> content digest (None for non-files) of an image in the repository."""
    tree = load_tree(repo.object_path(image_id))
    return {p: n.digest for p, n in tree.walk()}


def test_pull_layout_applies_layers_and_stores_every_file(tmp_path: Path) -> None:
    upper = layer_tar([
        entry("etc/.wh.passwd"),
        entry("usr/lib/.wh..wh..opq"),
        entry("usr/lib/libnew.so", os.urandom(20000)),
        entry("app/", kind=tarfile.DIRTYPE),
        entry("app/run", os.urandom(4000), mode=0o755),
    ])  # fmt: skip
    layout = tmp_path / "layout"
    write_layout(layout, [layer_tar(BASE), upper], tag="v1")
    repo = _repo(tmp_path)
    result = pull(repo, f"oci:{layout}:v1", "test/app:v1")
    assert (result.layers_fetched, result.layers_reused) == (2, 0)
    files = _files(repo, result.image_id)
    assert b"/etc/passwd" not in files and b"/usr/lib/libc.so" not in files
    assert b"/usr/lib/libnew.so" in files and b"/app/run" in files
    for path, digest in files.items():
        if digest is not None and repo.object_path(digest).exists():
            assert fsverity.digest(repo.object_path(digest).read_bytes()) == digest, path
    assert repo.oci_refs().keys() == {"test/app:v1"}
    assert repo.fsck().ok


def test_second_pull_reuses_layer_records_and_shares_the_base(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    base = layer_tar(BASE)
    write_layout(layout, [base, layer_tar([entry("a", os.urandom(5000))])], tag="one")
    write_layout(layout, [base, layer_tar([entry("b", os.urandom(7000))])], tag="two")
    repo = _repo(tmp_path)
    one = pull(repo, f"oci:{layout}:one")
    two = pull(repo, f"oci:{layout}:two")
    assert (two.layers_fetched, two.layers_reused) == (1, 1)
    assert two.objects_added == 1  # only b: the base layer's files are there already
    assert one.image_id != two.image_id
    again = pull(repo, f"oci:{layout}:one")
    assert (again.layers_fetched, again.image_id) == (0, one.image_id)


def test_gc_keeps_what_oci_refs_reach_and_frees_it_after_rm(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    write_layout(layout, [layer_tar(BASE)], tag="t")
    repo = _repo(tmp_path)
    result = pull(repo, f"oci:{layout}:t", "keep")
    before = sorted(p.name for p in (repo.path / "objects").rglob("*") if p.is_file())
    assert repo.gc().objects_removed == 0
    assert sorted(p.name for p in (repo.path / "objects").rglob("*") if p.is_file()) == before
    repo.remove_oci_ref("keep")
    gone = repo.gc()
    assert result.image_id in gone.images_removed
    assert not [p for p in (repo.path / "objects").rglob("*") if p.is_file()]
    assert not os.listdir(repo.path / "oci/layers")  # the cache entry went with its record


@pytest.mark.parametrize("media", [LAYER_TAR, LAYER_ZSTD])
def test_uncompressed_and_zstd_layers(tmp_path: Path, media: str) -> None:
    layout = tmp_path / "layout"
    write_layout(layout, [layer_tar(BASE)], tag="t", media=media)
    repo = _repo(tmp_path)
    result = pull(repo, f"oci:{layout}:t")
    assert b"/usr/bin/sh" in _files(repo, result.image_id)


def test_docker_and_oci_archives(tmp_path: Path) -> None:
    layers = [layer_tar(BASE), layer_tar([entry("x", os.urandom(1000))])]
    write_docker_archive(tmp_path / "d.tar", layers, "example/app:1.0")
    layout = tmp_path / "layout"
    write_layout(layout, layers, tag="1.0", media=LAYER_TAR)
    with tarfile.open(tmp_path / "o.tar", "w") as tar:
        tar.add(layout, arcname=".")
    repo = _repo(tmp_path)
    a = pull(repo, f"docker-archive:{tmp_path / 'd.tar'}:example/app:1.0")
    b = pull(repo, f"oci-archive:{tmp_path / 'o.tar'}:1.0")
    assert a.image_id == b.image_id  # same layers: the same image, whatever the transport


def test_platform_selection_from_an_index(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    write_layout(layout, [layer_tar([entry("amd", b"amd64")])], tag="amd", arch="amd64")
    write_layout(layout, [layer_tar([entry("arm", b"arm64")])], tag="arm", arch="arm64")
    index = json.loads((layout / "index.json").read_text())
    inner = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": index["manifests"]}).encode()  # fmt: skip
    import hashlib

    d = hashlib.sha256(inner).hexdigest()
    (layout / "blobs/sha256" / d).write_bytes(inner)
    index["manifests"].append({"mediaType": "application/vnd.oci.image.index.v1+json",
                               "digest": "sha256:" + d, "size": len(inner),
                               "annotations": {"org.opencontainers.image.ref.name": "multi"}})  # fmt: skip
    (layout / "index.json").write_text(json.dumps(index))
    repo = _repo(tmp_path)
    arm = pull(repo, f"oci:{layout}:multi", "arm", platform="linux/arm64")
    assert b"/arm" in _files(repo, arm.image_id)
    amd = pull(repo, f"oci:{layout}:multi", "amd", platform="linux/amd64")
    assert b"/amd" in _files(repo, amd.image_id)
    with pytest.raises(ComposefsError, match="no image for platform linux/s390x"):
        pull(repo, f"oci:{layout}:multi", "x", platform="linux/s390x")


def test_a_tampered_blob_is_refused_and_nothing_is_kept(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    manifest = write_layout(layout, [layer_tar(BASE)], tag="t", media=LAYER_TAR)
    doc = json.loads((layout / "blobs/sha256" / manifest[7:]).read_bytes())
    blob = layout / "blobs/sha256" / doc["layers"][0]["digest"][7:]
    data = bytearray(blob.read_bytes())
    data[3000] ^= 1
    blob.write_bytes(bytes(data))
    repo = _repo(tmp_path)
    with pytest.raises(OciError, match="expected sha256:"):
        pull(repo, f"oci:{layout}:t")
    assert repo.oci_refs() == {}
    assert not [p for p in (repo.path / "objects").rglob("*") if p.is_file()]


def test_cfsctl_oci_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    layout = tmp_path / "layout"
    mdigest = write_layout(layout, [layer_tar(BASE)], tag="t")
    repo = _repo(tmp_path)
    r = ["--repo", str(repo.path), "oci"]
    assert cfsctl.main([*r, "pull", "--json", f"oci:{layout}:t", "myimage"]) == 0
    pulled = json.loads(capsys.readouterr().out)
    assert cfsctl.main([*r, "images", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed[0]["name"] == "myimage" and listed[0]["image"] == pulled["image_id"]
    assert listed[0]["manifest_digest"] == mdigest
    assert cfsctl.main([*r, "inspect", "myimage", "--manifest"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["digest"] == pulled["config_digest"]
    assert cfsctl.main([*r, "inspect", "nothere"]) == 1
    assert "no OCI image named 'nothere'" in capsys.readouterr().err
    assert cfsctl.main([*r, "rm", "myimage"]) == 0
    assert cfsctl.main([*r, "images", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_hostile_layer_is_refused_naming_the_entry(tmp_path: Path) -> None:
    evil = layer_tar([entry("etc", kind=tarfile.SYMTYPE, linkname="/etc"),
                      entry("etc/shadow", b"x")])  # fmt: skip
    layout = tmp_path / "layout"
    write_layout(layout, [evil], tag="t")
    repo = _repo(tmp_path)
    with pytest.raises(Exception, match="entry 'etc/shadow': etc is a symlink"):
        pull(repo, f"oci:{layout}:t")
    assert not os.path.exists("/etc/shadow.composefs-test")  # nothing written outside
    assert repo.oci_refs() == {}


def test_unknown_transport_and_missing_path(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    with pytest.raises(OciError, match="unknown transport 'ftp'"):
        pull(repo, "ftp:x")
    with pytest.raises(OciError, match="no such file"):
        pull(repo, f"oci:{tmp_path / 'none'}")


def test_image_equals_directory_import_of_the_flattened_tree(tmp_path: Path) -> None:
    """The image from layers = the one cfsctl import (mkcomposefs rules) gives for the
    same tree on disk, when the on-disk tree has the same metadata."""
    src = tmp_path / "src"
    (src / "usr/bin").mkdir(parents=True)
    (src / "usr/bin/tool").write_bytes(os.urandom(5000))
    (src / "etc").mkdir()
    (src / "etc/conf").write_text("x=1\n")
    for p in [*src.rglob("*"), src]:
        os.utime(p, (1700000000, 1700000000), follow_symlinks=False)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(src, arcname=".", recursive=False)
        for p in sorted(src.rglob("*")):
            tar.add(p, arcname=str(p.relative_to(src)), recursive=False)
    layout = tmp_path / "layout"
    write_layout(layout, [buf.getvalue()], tag="t")
    repo = _repo(tmp_path)
    pulled = pull(repo, f"oci:{layout}:t")
    imported = repo.import_directory(src, options=None)
    assert pulled.image_id == imported.image_id


def test_gc_keeps_files_hidden_by_upper_layers_for_later_pulls(tmp_path: Path) -> None:
    hidden = os.urandom(8000)
    lower = layer_tar([entry("h", hidden), entry("k", os.urandom(3000))])
    layout = tmp_path / "layout"
    write_layout(layout, [lower, layer_tar([entry(".wh.h")])], tag="top")
    write_layout(layout, [lower], tag="bottom")
    repo = _repo(tmp_path)
    pull(repo, f"oci:{layout}:top", "top")
    assert repo.gc().objects_removed == 0
    assert repo.object_path(fsverity.digest(hidden)).exists()  # kept: the layer is live
    again = pull(repo, f"oci:{layout}:bottom", "bottom")
    assert (again.layers_fetched, again.layers_reused) == (0, 1)
    assert b"/h" in _files(repo, again.image_id)
    assert repo.fsck().ok


def test_devices_are_image_metadata_never_created(tmp_path: Path) -> None:
    dev = tarfile.TarInfo("dev/evil")
    dev.type, dev.devmajor, dev.devminor, dev.mode = tarfile.BLKTYPE, 8, 0, 0o666
    layout = tmp_path / "layout"
    write_layout(layout, [layer_tar([entry("dev/", kind=tarfile.DIRTYPE), (dev, None)])], tag="t")
    repo = _repo(tmp_path)
    result = pull(repo, f"oci:{layout}:t")
    node = load_tree(repo.object_path(result.image_id)).lookup(b"/dev/evil")
    assert node is not None and node.rdev == os.makedev(8, 0)
    # nothing but regular files and directories anywhere on disk
    for p in [*repo.path.rglob("*"), *tmp_path.rglob("*")]:
        assert not (p.is_block_device() or p.is_char_device()), p


def test_gzip_bomb_layer_is_refused_and_nothing_is_kept(tmp_path: Path) -> None:
    bomb = layer_tar([entry("zeros", bytes(300 << 20))])
    layout = tmp_path / "layout"
    write_layout(layout, [bomb], tag="t")
    repo = _repo(tmp_path)
    with pytest.raises(ComposefsError, match="decompression bomb"):
        pull(repo, f"oci:{layout}:t")
    assert repo.oci_refs() == {}
    assert not [p for p in (repo.path / "objects").rglob("*") if p.is_file()]


def test_inspect_by_manifest_digest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    layout = tmp_path / "layout"
    mdigest = write_layout(layout, [layer_tar(BASE)], tag="t")
    repo = _repo(tmp_path)
    pull(repo, f"oci:{layout}:t", "named")
    assert cfsctl.main(["--repo", str(repo.path), "oci", "inspect", f"@{mdigest}"]) == 0
    assert json.loads(capsys.readouterr().out)["manifest_digest"] == mdigest
