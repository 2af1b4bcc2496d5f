"""OCI layers applied into a tree: whiteouts, hard links, xattrs, and hostile entries."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from composefs import fsverity
from composefs.dumpfile import dumps
from composefs.erofs.writer import build_image
from composefs.objects import ObjectStore, ObjectWriter
from composefs.oci.compression import DecompressionError, open_layer
from composefs.oci.layer import (
    LayerError,
    apply_layer,
    apply_record,
    new_tree,
    record_objects,
)
from composefs.scan import ScanOptions, scan_directory
from composefs.tree import Tree

MTIME = 1700000000


def _tar(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    buf.seek(0)
    return buf


def _info(name: str, kind: bytes = tarfile.REGTYPE, **kw: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mtime = MTIME
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    for k, v in kw.items():
        setattr(info, k, v)
    return info


def _entry(name: str, kind: bytes, **kw: object) -> tuple[tarfile.TarInfo, bytes | None]:
    return _info(name, kind, **kw), None


def _file(name: str, data: bytes, **kw: object) -> tuple[tarfile.TarInfo, bytes | None]:
    return _info(name, **kw), data


def _dir(name: str, **kw: object) -> tuple[tarfile.TarInfo, bytes | None]:
    return _entry(name, tarfile.DIRTYPE, **kw)


def _apply(
    store: Path, *layers: list[tuple[tarfile.TarInfo, bytes | None]]
) -> tuple[Tree, ObjectWriter]:
    tree = new_tree()
    writer = ObjectWriter(ObjectStore(store))
    for i, layer in enumerate(layers):
        apply_layer(tree, _tar(layer), writer, name=f"layer{i}")
    writer.commit()
    return tree, writer


def _names(tree: Tree) -> list[str]:
    return [os.fsdecode(p) for p, _n in tree.walk()]


def test_files_land_in_the_store_and_small_ones_inline(tmp_path: Path) -> None:
    big = os.urandom(10000)
    tree, writer = _apply(tmp_path / "s", [_dir("etc"), _file("etc/small", b"hi\n"),
                                           _file("./etc/big", big)])  # fmt: skip
    small = tree.lookup(b"/etc/small")
    assert small is not None and small.content == b"hi\n"
    node = tree.lookup(b"/etc/big")
    assert node is not None and node.content is None and node.digest == fsverity.digest(big)
    assert (tmp_path / "s" / os.fsdecode(node.payload or b"")).read_bytes() == big
    assert writer.added == 1


def test_whiteouts_hide_lower_layers_only(tmp_path: Path) -> None:
    lower = [_dir("a"), _file("a/x", b"x"), _file("a/y", b"y"), _dir("b"), _file("b/z", b"z"),
             _file("gone", b"g")]  # fmt: skip
    upper = [
        _file(".wh.gone", b""),
        _file("a/.wh..wh..opq", b""),
        _file("a/new", b"n"),
        _file("b/.wh.z", b""),
        _file("b/z2", b"z2"),
        _file("b/.wh.z2", b""),  # its own layer's file survives
    ]
    tree, _ = _apply(tmp_path / "s", lower, upper)
    assert _names(tree) == ["/", "/a", "/a/new", "/b", "/b/z2"]


def test_hard_links_share_an_inode_and_survive_removal_of_the_first_name(tmp_path: Path) -> None:
    data = os.urandom(5000)
    lower = [_file("one", data), _entry("two", tarfile.LNKTYPE, linkname="one")]
    tree, _ = _apply(tmp_path / "s", lower, [_file(".wh.one", b"")])
    two = tree.lookup(b"/two")
    assert two is not None and two.nlink == 1 and two.digest == fsverity.digest(data)
    assert two.name == b"two"
    tree2, _ = _apply(tmp_path / "s2", lower)
    assert tree2.lookup(b"/one") is tree2.lookup(b"/two")
    one = tree2.lookup(b"/one")
    assert one is not None and one.nlink == 2


def test_pax_xattrs_devices_and_fractional_mtimes(tmp_path: Path) -> None:
    f = _info("f")
    f.pax_headers = {"SCHILY.xattr.user.k": "v", "SCHILY.xattr.security.capability": "\x01\x02",
                     "mtime": "1700000000.25"}  # fmt: skip
    dev = _entry("dev", tarfile.CHRTYPE, devmajor=1, devminor=3)
    tree, _ = _apply(tmp_path / "s", [(f, b"abc"), dev])
    node = tree.lookup(b"/f")
    assert node is not None
    assert node.xattrs == {b"user.k": b"v", b"security.capability": b"\x01\x02"}
    assert (node.mtime_sec, node.mtime_nsec) == (1700000000, 250000000)
    d = tree.lookup(b"/dev")
    assert d is not None and stat.S_ISCHR(d.mode) and d.rdev == os.makedev(1, 3)


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        ([_file("../evil", b"x")], "'..' in the path"),
        ([_file("a/../../evil", b"x")], "'..' in the path"),
        ([_entry("link", tarfile.SYMTYPE, linkname="/etc"), _file("link/passwd", b"x")],
         "link is a symlink (never followed)"),
        ([_entry("h", tarfile.LNKTYPE, linkname="../../etc/passwd")], "'..' in the path"),
        ([_entry("h", tarfile.LNKTYPE, linkname="missing")], "hard link to missing"),
        ([_dir("d"), _entry("h", tarfile.LNKTYPE, linkname="d")], "hard link to a directory"),
        ([_file(".wh..wh.x", b"")], "reserved whiteout name"),
    ],
)  # fmt: skip
def test_hostile_entries_are_refused_with_the_entry_named(
    tmp_path: Path, layer: list[tuple[tarfile.TarInfo, bytes | None]], message: str
) -> None:
    with pytest.raises(LayerError, match="layer0: entry") as e:
        _apply(tmp_path / "s", layer)
    assert message in str(e.value)


def test_absolute_names_are_taken_relative_to_the_root(tmp_path: Path) -> None:
    tree, _ = _apply(tmp_path / "s", [_file("/abs", b"x"), _dir("./d/"), _file("d//f", b"y")])
    assert _names(tree) == ["/", "/abs", "/d", "/d/f"]


def test_truncated_tar_is_an_error(tmp_path: Path) -> None:
    data = _tar([_file("f", os.urandom(9000))]).getvalue()[:5000]
    tree = new_tree()
    writer = ObjectWriter(ObjectStore(tmp_path / "s"))
    with pytest.raises(LayerError, match="layer: "):
        apply_layer(tree, io.BytesIO(data), writer, name="layer")
    writer.abort()
    assert not [p for p in (tmp_path / "s").rglob("*") if p.is_file()]


def test_layer_image_equals_directory_image(tmp_path: Path) -> None:
    """A tar of a directory, applied, gives the image mkcomposefs gives for the directory."""
    src = tmp_path / "src"
    (src / "usr/bin").mkdir(parents=True)
    (src / "usr/bin/tool").write_bytes(os.urandom(3000))
    (src / "usr/bin/tool").chmod(0o755)
    (src / "etc").mkdir()
    (src / "etc/conf").write_text("a=1\n")
    (src / "etc/empty").write_bytes(b"")
    (src / "lib").symlink_to("usr/lib")
    for p in [src, *src.rglob("*")]:
        os.utime(p, (MTIME, MTIME), follow_symlinks=False)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for p in sorted(src.rglob("*")):
            tar.add(p, arcname=str(p.relative_to(src)), recursive=False)
    buf.seek(0)
    tree = new_tree()
    root = tree.root
    st = src.stat()
    root.mode, root.uid, root.gid = st.st_mode, st.st_uid, st.st_gid
    root.mtime_sec = MTIME
    apply_layer(tree, buf, ObjectWriter(ObjectStore(tmp_path / "s")), name="layer")
    scanned = scan_directory(src, ScanOptions(skip_xattrs=True))
    for _p, node in scanned.walk():
        if node.entries is not None:
            node.size = 0  # a directory's st_size is the source filesystem's, not content
    assert dumps(tree).decode().splitlines() == dumps(scanned).decode().splitlines()
    assert build_image(tree) == build_image(scanned)


# -- compressed layers ---------------------------------------------------------------------


def _layer_bytes() -> bytes:
    return _tar(
        [_dir("d"), _file("d/f", os.urandom(20000)), _file("d/g", b"x" * 100000)]
    ).getvalue()


@pytest.mark.parametrize("kind", ["tar", "gzip", "gzip-multi", "zstd"])
def test_layers_decompress_by_their_magic(tmp_path: Path, kind: str) -> None:
    import gzip

    import zstandard

    raw = _layer_bytes()
    blob = {
        "tar": lambda: raw,
        "gzip": lambda: gzip.compress(raw),
        "gzip-multi": lambda: gzip.compress(raw[:7000]) + gzip.compress(raw[7000:]),
        "zstd": lambda: zstandard.ZstdCompressor().compress(raw),
    }[kind]()
    stream = open_layer(io.BytesIO(blob), name="layer")
    assert stream.read() == raw


def test_gzip_bomb_is_stopped_before_it_is_stored(tmp_path: Path) -> None:
    import gzip

    bomb = gzip.compress(_tar([_file("zeros", bytes(300 << 20))]).getvalue(), 9)
    tree = new_tree()
    writer = ObjectWriter(ObjectStore(tmp_path / "s"))
    with pytest.raises(DecompressionError, match="bomb"):
        apply_layer(tree, open_layer(io.BytesIO(bomb), name="bomb.tar.gz"), writer, name="x")
    writer.abort()
    assert not [p for p in (tmp_path / "s").rglob("*") if p.is_file()]


def test_truncated_and_corrupt_gzip(tmp_path: Path) -> None:
    import gzip

    blob = gzip.compress(_layer_bytes())
    with pytest.raises(DecompressionError, match="ends early"):
        open_layer(io.BytesIO(blob[: len(blob) // 2]), name="l").read()
    bad = blob[:20] + bytes(200) + blob[220:]
    with pytest.raises(DecompressionError, match="corrupt gzip"):
        open_layer(io.BytesIO(bad), name="l").read()


# -- layer records ---------------------------------------------------------------------------


def test_a_layer_record_replays_the_layer_without_its_content(tmp_path: Path) -> None:
    lower = [_dir("a"), _file("a/big", os.urandom(9000)), _file("a/small", b"s"),
             _entry("a/link", tarfile.SYMTYPE, linkname="/etc/x"),
             _entry("a/hard", tarfile.LNKTYPE, linkname="a/big")]  # fmt: skip
    x = _info("a/x")
    x.pax_headers = {"SCHILY.xattr.user.k": "v"}
    upper = [(x, os.urandom(7000)), _file("a/.wh.small", b"")]
    direct, _writer = _apply(tmp_path / "s", lower, upper)
    replayed = new_tree()
    records = []
    writer = ObjectWriter(ObjectStore(tmp_path / "s2"))
    for layer in (lower, upper):
        out = io.BytesIO()
        apply_layer(new_tree(), _tar(layer), writer, name="x", record=out)
        records.append(out.getvalue())
    big = lower[1][1]
    assert big is not None and big[:100] not in records[0]  # content stays out
    for i, rec in enumerate(records):
        apply_record(replayed, rec, name=f"record{i}")
    assert dumps(replayed) == dumps(direct)
    assert record_objects(records[0]) == {fsverity.digest(big)}


def test_a_layer_cannot_claim_content_by_digest(tmp_path: Path) -> None:
    """The record's digest header is honoured in records only, never in a layer."""
    f = _info("f")
    f.pax_headers = {"COMPOSEFS.digest": "00" * 32, "COMPOSEFS.size": "100"}
    tree, _ = _apply(tmp_path / "s", [(f, b"real content")])
    node = tree.lookup(b"/f")
    assert node is not None and node.content == b"real content"
    assert node.digest == fsverity.digest(b"real content")


def test_long_names_and_links_survive(tmp_path: Path) -> None:
    deep = "/".join(["d" * 60] * 5)  # 300 characters: a PAX path record
    target = "t" * 200
    tree, _ = _apply(tmp_path / "s", [_file(f"{deep}/{'f' * 200}", b"x" * 100),
                                      _entry("sym", tarfile.SYMTYPE, linkname=target)])  # fmt: skip
    node = tree.lookup(f"/{deep}/{'f' * 200}".encode())
    assert node is not None and node.size == 100
    sym = tree.lookup(b"/sym")
    assert sym is not None and sym.payload == target.encode()
