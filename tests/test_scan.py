"""mkcomposefs from a directory: the scan rules, the object store, the command line."""

from __future__ import annotations

import errno
import io
import os
import shutil
import stat
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import pure_python_only

from composefs import fsverity
from composefs import scan as scan_module
from composefs.erofs.reader import load_tree
from composefs.erofs.writer import build_image
from composefs.objects import DIRECT_MIN, ObjectStore, temporary_files, write_direct
from composefs.progress import Progress
from composefs.scan import ScanError, ScanOptions, ScanStats, scan_directory

BIN = Path(sys.executable).parent
IS_ROOT = os.geteuid() == 0


# A valid POSIX ACL xattr value: version 2, then (tag, perm, id) entries for user::rw-,
# user:1000:r--, group::r--, mask::rw-, other::r--.
ACL_ACCESS = struct.pack("<I", 2) + b"".join(
    struct.pack("<HHI", tag, perm, ident)
    for tag, perm, ident in (
        (1, 6, 0xFFFFFFFF),
        (2, 4, 1000),
        (4, 4, 0xFFFFFFFF),
        (0x10, 6, 0xFFFFFFFF),
        (0x20, 4, 0xFFFFFFFF),
    )
)
# A valid security.capability value (VFS_CAP_REVISION_2): cap_net_bind_service, permitted.
CAPABILITY = struct.pack("<IIIII", 0x02000000, 1 << 10, 0, 0, 0)


def make_tree(root: Path, *, big: bool = False) -> Path:
    """A tree with every file type the scan handles (devices only as root).

    ``big`` adds a directory of 3000 entries and a 40-level deep path.
    """
    (root / "a").mkdir(parents=True)
    (root / "b" / "c").mkdir(parents=True)
    (root / "a" / "small").write_bytes(b"hello\n")
    (root / "a" / "sixty-four").write_bytes(b"x" * 64)
    (root / "a" / "sixty-five").write_bytes(b"x" * 65)
    (root / "a" / "big").write_bytes(os.urandom(100_000))
    (root / "a" / "empty").write_bytes(b"")
    (root / "b" / "c" / "big-copy").write_bytes((root / "a" / "big").read_bytes())
    os.link(root / "a" / "big", root / "a" / "big-hardlink")
    (root / "b" / "link").symlink_to("../a/big")
    os.mkfifo(root / "b" / "fifo")
    with (root / "b" / "sparse").open("wb") as f:
        f.truncate(10 << 20)
        f.seek(10 << 20)
        f.write(b"end")
    (root / ("n" * 255)).write_bytes(b"long name")
    (root / os.fsdecode(b"\xff\xfe-not-utf8")).write_bytes(b"bytes name")
    os.setxattr(root / "a" / "small", "user.note", b"a=b c")
    os.setxattr(root / "a" / "sixty-five", "system.posix_acl_access", ACL_ACCESS)
    if big:
        many = root / "many"
        many.mkdir()
        for i in range(3000):
            (many / f"f{i:05d}").write_bytes(b"%d\n" % i)
        deep = root.joinpath(*(["d"] * 40))
        deep.mkdir(parents=True)
        (deep / "bottom").write_bytes(b"deep" * 100)
    if IS_ROOT:
        os.setxattr(root / "a" / "big", "trusted.overlay.redirect", b"/escaped")
        os.setxattr(root / "a" / "big", "security.capability", CAPABILITY)
        os.mknod(root / "b" / "chr", 0o600 | 0o020000, os.makedev(1, 3))
        os.mknod(root / "b" / "whiteout", 0o600 | 0o020000, os.makedev(0, 0))
    return root


def test_scan_rules(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    tree = scan_directory(src)
    small = tree.lookup(b"/a/small")
    assert small is not None and small.content == b"hello\n" and small.nlink == 1
    assert small.xattrs[b"user.note"] == b"a=b c"
    assert tree.lookup(b"/a/sixty-four").content == b"x" * 64  # type: ignore[union-attr]
    ext = tree.lookup(b"/a/sixty-five")
    assert ext is not None and ext.content is None
    assert ext.digest == fsverity.digest(b"x" * 65)
    assert ext.payload == (ext.digest.hex()[:2] + "/" + ext.digest.hex()[2:]).encode()
    assert tree.lookup(b"/a/empty").payload is None  # type: ignore[union-attr]
    # without --hardlinks every name is its own inode, as in the reference
    assert tree.lookup(b"/a/big") is not tree.lookup(b"/a/big-hardlink")
    assert tree.lookup(b"/b/link").payload == b"../a/big"  # type: ignore[union-attr]
    image = build_image(tree)
    assert load_tree(image).lookup(b"/a/sixty-five").digest == ext.digest  # type: ignore[union-attr]


def test_options(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    epoch = scan_directory(src, ScanOptions(use_epoch=True))
    assert all(n.mtime_sec == 0 and n.mtime_nsec == 0 for _p, n in epoch.walk())
    assert not any(n.xattrs for _p, n in scan_directory(src, ScanOptions(skip_xattrs=True)).walk())
    linked = scan_directory(src, ScanOptions(hardlinks=True))
    big = linked.lookup(b"/a/big")
    assert big is linked.lookup(b"/a/big-hardlink") and big is not None and big.nlink == 2
    if IS_ROOT:
        no_dev = scan_directory(src, ScanOptions(skip_devices=True))
        assert no_dev.lookup(b"/b/chr") is None and no_dev.lookup(b"/b/whiteout") is None
        user = scan_directory(src, ScanOptions(user_xattrs=True))
        assert b"trusted.overlay.redirect" not in user.lookup(b"/a/big").xattrs  # type: ignore[union-attr]


def test_object_store(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    store = ObjectStore(tmp_path / "store")
    tree = scan_directory(src, ScanOptions(threads=2), store)
    expected = {n.payload for _p, n in tree.walk() if n.payload and n.content is None and n.digest}
    found = {
        f"{d.name}/{f.name}".encode()
        for d in (tmp_path / "store").iterdir()
        if d.is_dir()
        for f in d.iterdir()
    }
    assert found == expected  # exactly the objects the image references
    assert temporary_files(tmp_path / "store") == []
    for obj in found:
        path = tmp_path / "store" / os.fsdecode(obj)
        assert fsverity.digest_file(path).hex() == obj.decode().replace("/", "")
        assert path.stat().st_mode & 0o777 == 0o644
    # a second run reuses every object
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "store").rglob("*") if p.is_file()}
    scan_directory(src, ScanOptions(), store)
    after = {p: p.stat().st_mtime_ns for p in (tmp_path / "store").rglob("*") if p.is_file()}
    assert before == after


def test_missing_source_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ScanError, match=r"error accessing .*nope: No such file"):
        scan_directory(tmp_path / "nope")


def test_cli_directory_source(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    out = tmp_path / "out.img"
    r = subprocess.run(
        [
            str(BIN / "mkcomposefs"),
            f"--digest-store={tmp_path / 'store'}",
            "--print-digest",
            str(src),
            str(out),
        ],
        capture_output=True,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().strip() == fsverity.digest(out.read_bytes()).hex()
    missing = subprocess.run(
        [
            str(BIN / "composefs-info"),
            f"--basedir={tmp_path / 'store'}",
            "missing-objects",
            str(out),
        ],
        capture_output=True,
    )
    assert missing.returncode == 0 and missing.stdout == b""


def test_cli_relative_paths(tmp_path: Path) -> None:
    """Store, source and image named relative to the working directory."""
    make_tree(tmp_path / "src")
    r = subprocess.run(
        [str(BIN / "mkcomposefs"), "--digest-store=store", "src", "out.img"],
        capture_output=True, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    objects = {p.relative_to(tmp_path / "store") for p in (tmp_path / "store").rglob("*/*")}
    assert objects
    assert temporary_files(tmp_path / "store") == []
    tree = load_tree((tmp_path / "out.img").read_bytes())
    assert {Path(n.payload.decode()) for _, n in tree.walk() if n.digest} == objects


REFERENCE = shutil.which("mkcomposefs")
if REFERENCE and Path(REFERENCE).resolve().parent == BIN.resolve():
    REFERENCE = None


@pytest.mark.skipif(REFERENCE is None, reason="reference mkcomposefs not on PATH")
@pytest.mark.parametrize(
    "options",
    [
        [],
        ["--use-epoch"],
        ["--skip-devices"],
        ["--skip-xattrs"],
        ["--user-xattrs"],
        ["--min-version=1"],
    ],
)
def test_same_image_and_store_as_reference(options: list[str], tmp_path: Path) -> None:
    assert REFERENCE is not None
    src = make_tree(tmp_path / "src")
    ours, theirs = tmp_path / "ours.img", tmp_path / "theirs.img"
    a = subprocess.run(
        [
            str(BIN / "mkcomposefs"),
            *options,
            f"--digest-store={tmp_path / 's1'}",
            str(src),
            str(ours),
        ],
        capture_output=True,
    )
    b = subprocess.run(
        [REFERENCE, *options, f"--digest-store={tmp_path / 's2'}", str(src), str(theirs)],
        capture_output=True,
    )
    assert a.returncode == b.returncode == 0, (a.stderr, b.stderr)
    assert ours.read_bytes() == theirs.read_bytes()
    ls = sorted(p.relative_to(tmp_path / "s1") for p in (tmp_path / "s1").rglob("*") if p.is_file())
    assert ls == sorted(
        p.relative_to(tmp_path / "s2") for p in (tmp_path / "s2").rglob("*") if p.is_file()
    )


def test_two_writers_fill_one_store_at_once(tmp_path: Path) -> None:
    """Two mkcomposefs processes filling the same store at the same time both succeed."""
    one = make_tree(tmp_path / "one")
    two = make_tree(tmp_path / "two")
    (two / "a" / "only-in-two").write_bytes(os.urandom(5000))
    store = tmp_path / "store"
    procs = [
        subprocess.Popen(
            [
                str(BIN / "mkcomposefs"),
                f"--digest-store={store}",
                str(src),
                str(tmp_path / f"{src.name}.img"),
            ],
            stderr=subprocess.PIPE,
        )
        for src in (one, two, one, two)
    ]
    for p in procs:
        _out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    objects = [p for p in store.rglob("*") if p.is_file()]
    assert temporary_files(store) == []
    for obj in objects:
        assert fsverity.digest_file(obj).hex() == obj.parent.name + obj.name
    for name in ("one", "two"):
        listed = subprocess.run(
            [
                str(BIN / "composefs-info"),
                f"--basedir={store}",
                "missing-objects",
                str(tmp_path / f"{name}.img"),
            ],
            capture_output=True,
        )
        assert listed.returncode == 0 and listed.stdout == b""


@pytest.mark.skipif(
    not IS_ROOT or shutil.which("setpriv") is None,
    reason="needs root to switch to nobody (setpriv)",
)
def test_unprivileged_build() -> None:
    """An ordinary user builds an image and store from a tree it can read."""
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="cfs-nobody-", dir="/tmp"))
    try:
        base.chmod(0o755)
        src = make_tree(base / "src")
        for dirpath, dirnames, filenames in os.walk(src):
            for name in [*dirnames, *filenames]:
                path = Path(dirpath) / name
                if not path.is_symlink() and not stat.S_ISCHR(path.lstat().st_mode):
                    path.chmod(0o755 if path.is_dir() else 0o644)
        out = base / "out"
        out.mkdir()
        os.chown(out, 65534, 65534)
        r = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             str(BIN / "mkcomposefs"), f"--digest-store={out / 'store'}", str(src), str(out / "img")],
            capture_output=True,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert (out / "img").stat().st_uid == 65534
        tree = load_tree(out / "img")
        big = tree.lookup(b"/a/big")
        assert big is not None and (out / "store" / os.fsdecode(big.payload or b"")).exists()
        assert b"trusted.overlay.redirect" not in big.xattrs  # trusted.* is invisible to users
    finally:
        shutil.rmtree(base)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_only(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    shown = _Terminal()
    bar = Progress("hashing", shown, delay=0, rate=1e9)
    quiet = io.StringIO()
    silent = Progress("hashing", quiet, delay=0, rate=1e9)

    def progress(stats: ScanStats) -> None:
        bar.update(stats.hashed_files, stats.to_hash, stats.hashed_bytes, stats.bytes)
        silent.update(stats.hashed_files, stats.to_hash, stats.hashed_bytes, stats.bytes)

    stats = ScanStats()
    scan_directory(src, progress=progress, stats=stats)
    bar.done()
    assert f"{stats.to_hash}/{stats.to_hash} files" in shown.getvalue()
    assert shown.getvalue().endswith("\r\x1b[K")  # the line is cleared at the end
    assert quiet.getvalue() == ""


@pure_python_only  # patches scan._hash_file: a compiled module calls its own functions directly
@pytest.mark.parametrize("threads", [1, 2])
def test_failed_run_leaves_no_temporary_files(
    threads: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scan that fails half-way removes everything it staged; no object appears."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(400):
        (src / f"f{i:03d}").write_bytes(os.urandom(100) + b"%d" % i)
    real = scan_module._hash_file

    def failing(fd: int, *rest: Any) -> Any:
        if os.readlink(f"/proc/self/fd/{fd}").endswith("f399"):
            raise OSError(errno.EIO, "simulated read error")
        return real(fd, *rest)

    monkeypatch.setattr(scan_module, "_hash_file", failing)  # workers are forked: they see it
    store = ObjectStore(tmp_path / "store")
    with pytest.raises(ScanError, match="f399: simulated read error"):
        scan_directory(src, ScanOptions(threads=threads), store)
    assert list((tmp_path / "store").iterdir()) == []


@pytest.mark.parametrize("threads", [1, 2])
def test_each_object_is_staged_once(
    threads: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Content met many times in one run is written to the store once: a copy staged and
    deleted again would slow inode allocation on ext4 without a journal."""
    src = tmp_path / "src"
    src.mkdir()
    blobs = [os.urandom(5000) for _ in range(3)]
    for i in range(600):
        (src / f"f{i:03d}").write_bytes(blobs[i % 3])
    log = tmp_path / "staged.log"
    real = scan_module.stage_bytes

    def logged(store_dir: str, data: bytes, token: str, digest: bytes) -> str | None:
        staged = real(store_dir, data, token, digest)
        if staged is not None:  # workers are forked: they report through a file
            with open(log, "a") as f:
                f.write(digest.hex() + "\n")
        return staged

    monkeypatch.setattr(scan_module, "stage_bytes", logged)
    stats = ScanStats()
    scan_directory(src, ScanOptions(threads=threads), ObjectStore(tmp_path / "store"), stats=stats)
    staged = log.read_text().split()
    assert sorted(staged) == sorted(set(staged)) and len(staged) == 3
    assert (stats.objects_added, stats.objects_reused) == (3, 597)
    assert temporary_files(tmp_path / "store") == []


@pure_python_only  # patches scan._hash_file, as above
@pytest.mark.parametrize(
    ("name", "change", "error"),
    [
        # Opened ahead (and being read in) before the first file is hashed.
        ("f002", "grown", "changed size"),
        ("f002", "shrunk", "changed size"),
        # Not opened yet when the first file is hashed.
        ("f040", "grown", "changed size"),
        ("f040", "shrunk", "changed size"),
        ("f040", "removed", "No such file"),
        ("f040", "symlink", "Too many levels of symbolic links"),
    ],
)
def test_file_changed_after_the_walk(
    name: str, change: str, error: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file changed between the walk and its hashing stops the scan with its own error,
    whether it was already opened ahead of the file being hashed or not; no descriptor is
    left open."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(50):
        (src / f"f{i:03d}").write_bytes(os.urandom(1000))
    target = src / name
    real = scan_module._hash_file
    changed = False

    def changing(fd: int, *rest: Any) -> Any:
        nonlocal changed
        if not changed:
            changed = True
            if change == "grown":
                with target.open("ab") as f:
                    f.write(b"more")
            elif change == "shrunk":
                os.truncate(target, 10)
            else:
                target.unlink()
                if change == "symlink":
                    target.symlink_to("f000")
        return real(fd, *rest)

    monkeypatch.setattr(scan_module, "_hash_file", changing)
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(ScanError, match=f"{name}: .*{error}"):
        scan_directory(src, ScanOptions(threads=1), ObjectStore(tmp_path / "store"))
    assert changed
    assert len(os.listdir("/proc/self/fd")) == fds


# Around the sizes where the scan changes how it copies: direct I/O from DIRECT_MIN on
# (from memory below 8 MiB, from the file above, in 8 MiB chunks), partial last blocks.
DIRECT_SIZES = [
    DIRECT_MIN - 1,
    DIRECT_MIN,
    DIRECT_MIN + 1,
    (1 << 20) + 123,
    8 << 20,
    (8 << 20) + 4097,
    (17 << 20) + 5,
]


def make_sized_files(src: Path) -> Path:
    """A file of each of DIRECT_SIZES, of random content, in ``src``."""
    src.mkdir()
    for size in DIRECT_SIZES:
        (src / f"s{size}").write_bytes(os.urandom(size))
    return src


def check_sized_objects(src: Path, store: Path, threads: int) -> None:
    """Scan ``src`` (from make_sized_files) into ``store``: each object holds exactly its
    source, under its digest, with the objects' mode, and nothing is left staged."""
    tree = scan_directory(src, ScanOptions(threads=threads), ObjectStore(store))
    for size in DIRECT_SIZES:
        node = tree.lookup(b"/s%d" % size)
        assert node is not None and node.payload is not None
        obj = store / os.fsdecode(node.payload)
        assert obj.read_bytes() == (src / f"s{size}").read_bytes()
        assert fsverity.digest_file(obj) == node.digest
        assert obj.stat().st_mode & 0o777 == 0o644
    assert temporary_files(store) == []


@pytest.mark.parametrize("threads", [1, 2])
def test_objects_written_with_direct_io(threads: int, tmp_path: Path) -> None:
    """Objects copied with direct I/O hold exactly their source, partial blocks included."""
    check_sized_objects(make_sized_files(tmp_path / "src"), tmp_path / "store", threads)


@pytest.mark.skipif(not IS_ROOT, reason="mounting ramfs needs root")
def test_store_without_direct_io(tmp_path: Path) -> None:
    """Where the file system refuses O_DIRECT (ramfs), objects are written through the page
    cache instead."""
    src = make_sized_files(tmp_path / "src")
    ramfs = tmp_path / "ramfs"
    ramfs.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "ramfs", str(ramfs)], check=True)
    try:
        fd = os.open(ramfs / "probe", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            assert not write_direct(fd, DIRECT_MIN, lambda view, offset: len(view))
            assert os.fstat(fd).st_size == 0  # nothing written on the way
        finally:
            os.close(fd)
        check_sized_objects(src, ramfs / "store", threads=2)
    finally:
        subprocess.run(["umount", str(ramfs)], check=True)


@pytest.mark.parametrize("threads", [1, 2])
def test_large_file_changed_while_copied(
    threads: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file hashed from its descriptor and written to while it is copied to the store (in
    the write thread) stops the scan with its own error, and leaves nothing staged."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom((8 << 20) + 1))
    real = scan_module.copy_file

    def copy_then_append(src_fd: int, dst_fd: int, *, direct: bool = False) -> None:
        real(src_fd, dst_fd, direct=direct)
        with (src / "big").open("ab") as f:  # another writer, just after the copy
            f.write(b"late")

    monkeypatch.setattr(scan_module, "copy_file", copy_then_append)  # forked workers too
    store = tmp_path / "store"
    with pytest.raises(ScanError, match="big: file changed while it was read"):
        scan_directory(src, ScanOptions(threads=threads), ObjectStore(store))
    assert temporary_files(store) == []
    assert not any(p.is_file() for p in store.rglob("*"))


def test_store_syncs_once_per_batch_and_at_the_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each batch's objects are durable before the first of them is renamed into place, and
    the last renames are made durable before the scan returns, with one syncfs per batch
    and one at the end (each flushes the disk's cache)."""
    from composefs import objects

    monkeypatch.setattr(objects, "BATCH_OBJECTS", 3)
    events: list[str] = []
    real_syncfs, real_rename = objects._syncfs, os.rename

    def syncfs(fd: int) -> None:
        events.append("sync")
        real_syncfs(fd)

    def rename(src: str, dst: str, **kwargs: Any) -> None:
        events.append("rename")
        real_rename(src, dst, **kwargs)

    monkeypatch.setattr(objects, "_syncfs", syncfs)
    monkeypatch.setattr(objects.os, "rename", rename)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(7):
        (src / f"f{i}").write_bytes(os.urandom(100))
    scan_directory(src, ScanOptions(threads=1), ObjectStore(tmp_path / "store"))
    assert "".join(e[0] for e in events) == "srrrsrrrsrs"
