"""composefs-fuse with the real kernel FUSE: the same tree as the kernel mount, verified
content, clean failures.

Needs /dev/fuse; the comparisons with the kernel mount and the runs as root need root,
the unprivileged run needs root to become nobody.  Each skips with the reason.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from mounted import (
    assert_same_tree,
    cached_growth,
    kernel_mount_skip_reason,
    object_of,
    snapshot,
)
from test_scan import make_tree

from composefs.mount import MountOptions, mount, unmount

BIN = Path(sys.executable).parent
FUSE = str(BIN / "composefs-fuse")
IS_ROOT = os.geteuid() == 0


def _fuse_skip_reason() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if not IS_ROOT and shutil.which("fusermount3") is None:
        return "no fusermount3 (Debian package fuse3) for an unprivileged mount"
    return None


FUSE_SKIP = _fuse_skip_reason()
needs_fuse = pytest.mark.skipif(FUSE_SKIP is not None, reason=FUSE_SKIP or "")
KERNEL_SKIP = kernel_mount_skip_reason()
needs_kernel = pytest.mark.skipif(KERNEL_SKIP is not None, reason=KERNEL_SKIP or "")
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root")


def _build(src: Path, store: Path, image: Path, *extra: str) -> None:
    r = subprocess.run(
        [str(BIN / "mkcomposefs"), f"--digest-store={store}", *extra, str(src), str(image)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr


def _is_mounted(path: Path) -> bool:
    """From the mount table: a FUSE mount of another user cannot even be stat-ed."""
    target = os.path.realpath(path)
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return any(line.split()[4] == target for line in lines)


def _wait_mounted(path: Path, proc: subprocess.Popen[bytes] | None = None) -> None:
    for _ in range(200):
        if _is_mounted(path):
            return
        if proc is not None and proc.poll() is not None:
            err = _server_log(proc)
            pytest.fail(f"composefs-fuse exited with {proc.returncode}: {err}")
        time.sleep(0.05)
    pytest.fail(f"{path} was not mounted")


def _server_log(proc: subprocess.Popen[bytes]) -> str:
    """What a foreground server wrote on stderr (all of it, once it has ended)."""
    return proc.stderr.read().decode() if proc.stderr else ""


def _unmount(path: Path) -> None:
    if IS_ROOT:
        subprocess.run(["umount", str(path)], check=False, capture_output=True)
    else:
        subprocess.run(["fusermount3", "-u", str(path)], check=False, capture_output=True)


@contextmanager
def fuse_mount(
    image: Path, store: Path, mnt: Path, *options: str, prefix: list[str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """composefs-fuse in the foreground for the duration; yields the server process."""
    opts = ",".join([f"source={image}", f"basedir={store}", *options])
    proc = subprocess.Popen(
        [*(prefix or []), FUSE, "-f", "-o", opts, str(mnt)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        _wait_mounted(mnt, proc)
        yield proc
    finally:
        if _is_mounted(mnt):
            _unmount(mnt)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(source tree, store, image), hardlinks kept, built once for the module."""
    if FUSE_SKIP:
        pytest.skip(FUSE_SKIP)
    base = tmp_path_factory.mktemp("fuse")
    src = make_tree(base / "src", big=True)
    # names sorting before "." and "..", which then are not a directory's first entries
    (src / "b" / "-dash").mkdir()
    (src / "b" / "-dash" / "+plus").write_bytes(b"early names\n" * 10)
    store, image = base / "store", base / "image.cfs"
    _build(src, store, image, "--hardlinks")
    return src, store, image


@needs_fuse
@needs_kernel
def test_same_tree_as_the_kernel_mount(built: tuple[Path, Path, Path], tmp_path: Path) -> None:
    src, store, image = built
    kmnt, fmnt = tmp_path / "kernel", tmp_path / "fuse"
    kmnt.mkdir()
    fmnt.mkdir()
    mount(image, kmnt, MountOptions(basedirs=(str(store),), readonly=True))
    try:
        with fuse_mount(image, store, fmnt):
            kernel, fuse = snapshot(kmnt), snapshot(fmnt)
            assert len(kernel) >= 3000
            assert fuse.keys() == kernel.keys()
            for path, seen in fuse.items():
                assert seen == kernel[path], path
            assert assert_same_tree(src, fmnt) >= 3000
            # Hardlinks share an inode; inode numbers are the image's, stable.
            a, b = os.stat(fmnt / "a" / "big"), os.stat(fmnt / "a" / "big-hardlink")
            assert a.st_ino == b.st_ino and a.st_nlink == 2
            st = os.statvfs(fmnt)
            assert st.f_bsize == 4096 and st.f_blocks == image.stat().st_size // 4096
        with fuse_mount(image, store, fmnt):
            assert os.stat(fmnt / "a" / "big").st_ino == a.st_ino
    finally:
        unmount(kmnt)


@pytest.fixture
def private(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """(source, store, image, mount point) of a tree with one 1 MiB file, built for one test
    (the tests below damage the store)."""
    if FUSE_SKIP:
        pytest.skip(FUSE_SKIP)
    src = tmp_path / "src"
    src.mkdir()
    (src / "large").write_bytes(os.urandom(1 << 20))
    (src / "other").write_bytes(os.urandom(10_000))
    store, image, mnt = tmp_path / "store", tmp_path / "image.cfs", tmp_path / "mnt"
    mnt.mkdir()
    _build(src, store, image)
    return src, store, image, mnt


@needs_fuse
def test_tampered_object_is_refused_and_named(private: tuple[Path, Path, Path, Path]) -> None:
    src, store, image, mnt = private
    obj = object_of(image, b"/large", store)
    obj.chmod(0o644)
    with open(obj, "r+b") as f:
        f.seek(300_000)
        f.write(b"\xff" * 10)
    with fuse_mount(image, store, mnt) as proc:
        with pytest.raises(OSError) as e:
            (mnt / "large").read_bytes()
        assert e.value.errno == 5  # EIO
        assert (mnt / "other").read_bytes() == (src / "other").read_bytes()
    err = _server_log(proc)
    assert f"object {obj} has fs-verity digest" in err, err


@needs_fuse
def test_truncated_object_is_refused(private: tuple[Path, Path, Path, Path]) -> None:
    _src, store, image, mnt = private
    obj = object_of(image, b"/large", store)
    os.truncate(obj, 4096)
    with fuse_mount(image, store, mnt) as proc:
        with pytest.raises(OSError) as e:
            (mnt / "large").read_bytes()
        assert e.value.errno == 5
    err = _server_log(proc)
    assert f"object {obj} has 4096 bytes, the image says {1 << 20}" in err


@needs_fuse
def test_each_read_is_checked_block_by_block(private: tuple[Path, Path, Path, Path]) -> None:
    """An object changed after it was first checked: the reads of the changed block fail,
    the others still work (nopassthrough: every read goes through the server)."""
    src, store, image, mnt = private
    obj = object_of(image, b"/large", store)
    good = (src / "large").read_bytes()
    with fuse_mount(image, store, mnt, "nopassthrough") as proc:
        with open(mnt / "large", "rb") as f:
            assert f.read(4096) == good[:4096]  # the first read checks the object in full
        with open(obj, "r+b") as f:
            f.seek(5 * 4096 + 10)
            f.write(b"\x00\x01\x02")
        fd = os.open(mnt / "large", os.O_RDONLY)
        try:
            assert os.pread(fd, 4096, 0) == good[:4096]
            assert os.pread(fd, 4096, 40 * 4096) == good[40 * 4096 : 41 * 4096]
            with pytest.raises(OSError) as e:
                os.pread(fd, 100, 5 * 4096 + 5)
            assert e.value.errno == 5
        finally:
            os.close(fd)
    err = _server_log(proc)
    assert f"object {obj} blocks 5..5 do not match its fs-verity digest" in err, err


@needs_fuse
def test_noverify_serves_unchecked(private: tuple[Path, Path, Path, Path]) -> None:
    _src, store, image, mnt = private
    obj = object_of(image, b"/large", store)
    with open(obj, "r+b") as f:
        f.write(b"changed")
    with fuse_mount(image, store, mnt, "noverify"):
        assert (mnt / "large").read_bytes()[:7] == b"changed"


@needs_fuse
def test_missing_object(private: tuple[Path, Path, Path, Path]) -> None:
    _src, store, image, mnt = private
    object_of(image, b"/large", store).unlink()
    with fuse_mount(image, store, mnt) as proc:
        with pytest.raises(FileNotFoundError):
            (mnt / "large").read_bytes()
        assert (mnt / "large").stat().st_size == 1 << 20
    err = _server_log(proc)
    assert "not found in" in err


@needs_fuse
def test_hostile_image_is_refused_before_mounting(
    private: tuple[Path, Path, Path, Path], tmp_path: Path
) -> None:
    _src, store, image, mnt = private
    bad = tmp_path / "bad.cfs"
    data = bytearray(image.read_bytes())
    data[1024 + 14 : 1024 + 16] = b"\xff\xff"  # superblock: root nid far out of the image
    bad.write_bytes(bytes(data))
    r = subprocess.run(
        [FUSE, "-f", "-o", f"source={bad},basedir={store}", str(mnt)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.returncode == 1
    assert r.stderr.startswith(f"composefs-fuse: Failed to load {bad}: "), r.stderr
    assert len(r.stderr.splitlines()) == 1
    assert not os.path.ismount(mnt)


@needs_fuse
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_unmount_cleanly(private: tuple[Path, Path, Path, Path], sig: int) -> None:
    src, store, image, mnt = private
    with fuse_mount(image, store, mnt) as proc:
        assert (mnt / "other").read_bytes() == (src / "other").read_bytes()
        proc.send_signal(sig)
        assert proc.wait(timeout=10) == 0
        assert not os.path.ismount(mnt)


@needs_fuse
def test_background_mode_returns_once_mounted(private: tuple[Path, Path, Path, Path]) -> None:
    src, store, image, mnt = private
    r = subprocess.run(
        [FUSE, "-o", f"source={image},basedir={store}", str(mnt)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    try:
        assert os.path.ismount(mnt)
        assert (mnt / "large").read_bytes() == (src / "large").read_bytes()
    finally:
        _unmount(mnt)
    assert not os.path.ismount(mnt)


@needs_fuse
def test_command_line_errors(tmp_path: Path) -> None:
    cases = [
        ([str(tmp_path)], "No source path specified"),
        (["-o", "source=/x", str(tmp_path)], "No basedir specified"),
        (["-o", f"source=/x,basedir={tmp_path},bogus", str(tmp_path)], "unknown option 'bogus'"),
        (["-o", f"source=/nonexistent,basedir={tmp_path}", str(tmp_path)],
         "Failed to open /nonexistent: No such file or directory"),
        (["-o", "source=/x,basedir=/nonexistent", str(tmp_path)],
         "Failed to open basedir /nonexistent: No such file or directory"),
    ]  # fmt: skip
    for args, message in cases:
        r = subprocess.run([FUSE, *args], capture_output=True, text=True, timeout=30)
        assert r.returncode == 1, args
        assert message in r.stderr, (args, r.stderr)


@needs_fuse
@needs_root
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv to become nobody")
@pytest.mark.skipif(shutil.which("fusermount3") is None, reason="needs fusermount3 (fuse3)")
def test_runs_as_nobody() -> None:
    """An ordinary user mounts through fusermount3 (with /dev/fuse 0666, as distributions
    ship it) and reads verified content."""
    mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    base = Path(tempfile.mkdtemp(prefix="cfs-fuse-nobody-", dir="/tmp"))
    try:
        os.chmod("/dev/fuse", 0o666)
        base.chmod(0o755)
        src = base / "src"
        src.mkdir()
        (src / "file").write_bytes(os.urandom(50_000))
        (src / "small").write_bytes(b"inline\n")
        store, image, mnt = base / "store", base / "image.cfs", base / "mnt"
        _build(src, store, image)
        for path in [store, *store.rglob("*"), image, src, *src.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        mnt.mkdir()
        os.chown(mnt, 65534, 65534)
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        with fuse_mount(image, store, mnt, prefix=nobody):
            check = subprocess.run(
                [*nobody, "cat", str(mnt / "file"), str(mnt / "small")], capture_output=True
            )
            assert check.returncode == 0, check.stderr
            assert check.stdout == (src / "file").read_bytes() + b"inline\n"
            subprocess.run([*nobody, "fusermount3", "-u", str(mnt)], check=True)
    finally:
        os.chmod("/dev/fuse", mode)
        subprocess.run(["umount", "-l", str(base / "mnt")], capture_output=True)
        shutil.rmtree(base)


@needs_fuse
@needs_root
def test_passthrough_shares_the_page_cache(tmp_path: Path) -> None:
    """Two FUSE mounts of images sharing a 32 MiB object cache it once, as the kernel
    mount does: the object is trusted (checked in full, only root can change it), so
    reads pass through to it."""
    size = 32 << 20
    payload = os.urandom(size)
    store = tmp_path / "store"
    images, mounts = [], []
    for name in ("one", "two"):
        src = tmp_path / name
        src.mkdir()
        (src / "shared.bin").write_bytes(payload)
        (src / name).write_bytes(name.encode() * 50)
        images.append(tmp_path / f"{name}.cfs")
        _build(src, store, images[-1])
        mounts.append(tmp_path / f"mnt-{name}")
        mounts[-1].mkdir()
    obj = object_of(images[0], b"/shared.bin", store)
    with fuse_mount(images[0], store, mounts[0]), fuse_mount(images[1], store, mounts[1]):
        first, second = cached_growth(
            obj, (mounts[0] / "shared.bin", mounts[1] / "shared.bin"), payload, first_max=1.5
        )
        if not (size * 0.8 < first < size * 1.5 and second < size * 0.2):
            pytest.fail(f"Cached grew by {first >> 20} MiB, then {second >> 20} MiB")


def test_index_of_hostile_images_fails_only_with_format_errors() -> None:
    """The server's image check (its index walk) on 600 mutants of valid images: every
    failure is a FormatError, the reader's, which the command prints before mounting.
    (No mount needed: this is what runs before one.)"""
    from mutate_images import apply, base_images, mutate

    from composefs.erofs.reader import Image
    from composefs.errors import FormatError
    from composefs.fuse import Filesystem, FuseOptions

    outcomes = {"ok": 0, "refused": 0}
    for base in base_images():
        if base.name == "config-hard-link":
            continue  # large: the reader's own fuzz covers it
        for index in range(150):
            _kind, ops = mutate(base, 11, index)
            try:
                image = Image(apply(base.data, ops))
                Filesystem(image, [], FuseOptions()).close()
                outcomes["ok"] += 1
            except FormatError:
                outcomes["refused"] += 1
    assert outcomes["refused"] > 100 and outcomes["ok"] > 50, outcomes


def _fs_verity_here(path: Path) -> bool:
    from composefs.fsverity import verity_supported

    return verity_supported(path)


@needs_fuse
def test_objects_with_kernel_fs_verity_are_trusted(
    private: tuple[Path, Path, Path, Path],
) -> None:
    """An object with kernel fs-verity and the recorded digest is served without hashing
    it here: the kernel checks every page.  Needs a filesystem with fs-verity."""
    from composefs.fsverity import enable_verity, measure_verity

    src, store, image, mnt = private
    if not _fs_verity_here(store):
        pytest.skip(f"no fs-verity on the filesystem of {store} (or in this kernel)")
    obj = object_of(image, b"/large", store)
    fd = os.open(obj, os.O_RDONLY)
    try:
        assert enable_verity(fd)
        assert measure_verity(fd) is not None
    finally:
        os.close(fd)
    with fuse_mount(image, store, mnt, "nopassthrough"):
        assert (mnt / "large").read_bytes() == (src / "large").read_bytes()


@pytest.mark.skipif(os.geteuid() != 0, reason="objects are passed through only as root")
def test_open_of_a_kept_passed_through_object_answered_inline(tmp_path: Path) -> None:
    """The request loop answers opens and releases of kept passed-through objects itself
    (most of a warm walk); its reply is the one :meth:`Filesystem.open` gives, and the
    opens are counted so that an object in use is never dropped."""
    from composefs.fuse import Filesystem, load_image
    from composefs.fuse import protocol as p

    src, store, image = tmp_path / "src", tmp_path / "store", tmp_path / "t.cfs"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(100_000))
    (src / "small").write_bytes(b"inline")
    _build(src, store, image)
    fs = Filesystem(load_image(image), [str(store)])
    fs.backing_open = lambda fd: 7
    fs.backing_close = lambda backing_id: None
    by_name = fs._children(fs.root_nid)
    big, small = by_name[b"big"] + 2, by_name[b"small"] + 2
    body = memoryview(p.OPEN_IN.pack(os.O_RDONLY, 0))
    assert fs.open_passed_through(big) is None  # not open yet: the full path checks it
    reply = fs.open(big, body)
    assert p.OPEN_OUT.unpack(reply) == (0, p.FOPEN_PASSTHROUGH, 7)
    assert fs.open_passed_through(big) == reply
    assert fs._objects[by_name[b"big"]].handles == 2
    fs.release_passed_through(big)
    fs.release_passed_through(big)
    assert fs._objects[by_name[b"big"]].handles == 0
    fs.open(small, body)  # content in the image: a handle of its own, never inline here
    assert fs.open_passed_through(small) is None
    assert fs.open_passed_through(p.ROOT_ID) is None
    fs.close()
