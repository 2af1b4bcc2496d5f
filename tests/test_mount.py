"""mount.composefs and composefs.mount with the real kernel (EROFS + overlayfs).

Option parsing and the command line's errors run everywhere; every test that mounts needs
root and skips with the reason otherwise.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mounted import (
    assert_same_tree,
    attached_loop_devices,
    cached_growth,
    kernel_mount_skip_reason,
    object_of,
)
from test_scan import make_tree

from composefs import fsverity
from composefs.mount import (
    MountError,
    MountOptions,
    MountOptionsError,
    mount,
    parse_options,
    unmount,
)

BIN = Path(sys.executable).parent
MOUNT_COMPOSEFS = str(BIN / "mount.composefs")
SKIP_REASON = kernel_mount_skip_reason()
needs_kernel_mount = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")


# -- option strings ------------------------------------------------------------------------------


def test_options_parse_like_the_reference() -> None:
    o = parse_options(r"basedir=/a:/b,digest=ab,ro,verity,upperdir=/u\,x,workdir=/w,rw")
    assert o.basedirs == ("/a", "/b")
    assert o.digest == "ab" and o.verity and o.requires_verity
    assert not o.readonly  # rw after ro
    assert o.upperdir == "/u,x" and o.workdir == "/w"
    later = parse_options("basedir=/a,basedir=/c,tryverity,idmap=/proc/1/ns/user")
    assert later.basedirs == ("/c",) and later.try_verity and not later.requires_verity
    assert later.idmap == "/proc/1/ns/user"
    assert parse_options("basedir=/a,checkobjects").check_objects
    assert parse_options(None).basedirs == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("basedir=/a,foo", "Unsupported option foo"),
        ("basedir=/a,foo=bar", "Unsupported option foo"),
        ("basedir", "No value specified for basedir option"),
        ("basedir=/a,digest", "No value specified for digest option"),
        ("basedir=/a,upperdir", "No value specified for upperdir option"),
        ("basedir=/a,workdir", "No value specified for workdir option"),
        ("basedir=/a,idmap", "No value specified for idmap option"),
    ],
)
def test_bad_option_strings(text: str, message: str) -> None:
    with pytest.raises(MountOptionsError, match=f"^{message}$"):
        parse_options(text)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (MountOptions(basedirs=()), "No object dirs specified"),
        (MountOptions(basedirs=("/a", "")), "Value for basedir option has incorrect format"),
        (
            MountOptions(basedirs=("/a",), upperdir="/u"),
            "Both workdir and upperdir must be specified if used",
        ),
        (MountOptions(basedirs=("/a",), digest="abc"), "invalid digest 'abc'"),
        (MountOptions(basedirs=("/a",), digest="zz" * 32), "invalid digest"),
    ],
)
def test_invalid_options_are_refused_before_anything_is_opened(
    options: MountOptions, message: str
) -> None:
    with pytest.raises(MountOptionsError, match=message):
        mount("/nonexistent.img", "/nonexistent", options)


def _run(*args: str, user: int | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [MOUNT_COMPOSEFS, *args]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True)


@pytest.mark.parametrize(
    ("args", "first_line"),
    [
        ([], "No source path specified"),
        (["img"], "No mount path specified"),
        (["-t", "ext4", "img", "mnt"], "mount.composefs: Unsupported fs type 'ext4'"),
        (["-o", "ro", "img", "mnt"], "No object dirs specified"),
        (["-o", "basedir=/a,bogus", "img", "mnt"], "mount.composefs: Unsupported option bogus"),
        (["img", "mnt", "-o", "basedir=:/a"], "mount.composefs: Value for basedir option has"),
        (
            ["-o", "basedir=/tmp,idmap=/nonexistent", "img", "mnt"],
            "mount.composefs: Failed to open userns /nonexistent: No such file or directory",
        ),
        (
            ["-o", "basedir=/tmp", "/nonexistent.img", "mnt"],
            "mount.composefs: Failed to open /nonexistent.img: No such file or directory",
        ),
    ],
)
def test_command_line_errors(args: list[str], first_line: str) -> None:
    r = _run(*args)
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr.splitlines()[0].startswith(first_line), r.stderr


def test_help_exits_zero() -> None:
    r = _run("-h")
    assert r.returncode == 0 and "basedir=" in r.stderr


# -- mounting ------------------------------------------------------------------------------------


def _build(src: Path, store: Path, image: Path, *extra: str) -> str:
    r = subprocess.run(
        [str(BIN / "mkcomposefs"), "--print-digest", f"--digest-store={store}", *extra,
         str(src), str(image)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, str]:
    """(source tree, store, image, image digest), built once for the module."""
    if SKIP_REASON:
        pytest.skip(SKIP_REASON)
    base = tmp_path_factory.mktemp("built")
    src = make_tree(base / "src", big=True)
    store, image = base / "store", base / "image.cfs"
    digest = _build(src, store, image)
    return src, store, image, digest


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    """An empty mount point; anything mounted on it is unmounted afterwards."""
    target = tmp_path / "mnt"
    target.mkdir()
    yield target
    while os.path.ismount(target):
        subprocess.run(["umount", str(target)], check=False)


def _mounts_of_type(fstype: str) -> list[str]:
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return [line for line in lines if line.split(" - ", 1)[1].split()[0] == fstype]


def _wait_for_loops(expected: dict[str, str]) -> dict[str, str]:
    """Loop devices clear asynchronously after the last unmount; wait a little for that."""
    for _ in range(100):
        now = attached_loop_devices()
        if now == expected:
            break
        time.sleep(0.05)
    return now


@needs_kernel_mount
@pytest.mark.parametrize(
    ("api", "backing"),
    [("auto", "auto"), ("new", "file"), ("new", "loop"), ("legacy", "file"), ("legacy", "loop")],
)
def test_mount_shows_the_source_tree_and_umount_releases_everything(
    built: tuple[Path, Path, Path, str], mnt: Path, api: str, backing: str
) -> None:
    src, store, image, _digest = built
    loops_before = attached_loop_devices()
    erofs_before = _mounts_of_type("erofs")
    mount(image, mnt, MountOptions(basedirs=(str(store),)), api=api, erofs_backing=backing)  # type: ignore[arg-type]
    try:
        assert os.path.ismount(mnt)
        # Only the overlay is visible: the EROFS mount is detached, its directory gone.
        assert _mounts_of_type("erofs") == erofs_before
        assert not list(Path("/tmp").glob(".composefs.*"))
        loops = attached_loop_devices()
        if backing == "loop":
            assert len(loops) == len(loops_before) + 1
        else:
            assert loops == loops_before
        assert assert_same_tree(src, mnt) >= 3000
    finally:
        unmount(mnt)
    assert not os.path.ismount(mnt)
    assert _wait_for_loops(loops_before) == loops_before


@needs_kernel_mount
def test_cli_mounts_read_only_and_as_mount_helper(
    built: tuple[Path, Path, Path, str], mnt: Path
) -> None:
    src, store, image, _digest = built
    r = _run("-t", "composefs", "-o", f"ro,basedir={store}", str(image), str(mnt))
    assert r.returncode == 0, r.stderr
    assert (mnt / "a" / "big").read_bytes() == (src / "a" / "big").read_bytes()
    with pytest.raises(OSError) as e:
        (mnt / "new").write_bytes(b"x")
    assert e.value.errno == errno.EROFS
    unmount(mnt)
    # mount(8) finds helpers as /sbin/mount.TYPE; install ours there for the test only.
    helper = Path("/sbin/mount.composefs")
    if helper.exists() or helper.is_symlink():
        pytest.skip(f"{helper} exists; not replacing it")
    helper.symlink_to(MOUNT_COMPOSEFS)
    try:
        r2 = subprocess.run(
            ["mount", "-t", "composefs", "-o", f"basedir={store}", str(image), str(mnt)],
            capture_output=True, text=True,
        )  # fmt: skip
        assert r2.returncode == 0, r2.stderr
        assert (mnt / "a" / "small").read_bytes() == b"hello\n"
    finally:
        helper.unlink()


@needs_kernel_mount
def test_two_images_share_objects_and_the_page_cache(tmp_path: Path) -> None:
    """The 64 MiB file both images hold is one object, cached once for both mounts."""
    size = 64 << 20
    payload = os.urandom(size)
    store = tmp_path / "store"
    images = []
    for name in ("one", "two"):
        src = tmp_path / name
        src.mkdir()
        (src / "shared.bin").write_bytes(payload)
        (src / f"only-in-{name}").write_bytes(name.encode() * 100)
        images.append(tmp_path / f"{name}.cfs")
        _build(src, store, images[-1])
    objects = [p for p in store.rglob("*") if p.is_file()]
    assert len(objects) == 3  # shared.bin once, plus one file per image
    shared_object = object_of(images[0], b"/shared.bin", store)
    mounts = [tmp_path / "mnt1", tmp_path / "mnt2"]
    for image, target in zip(images, mounts, strict=True):
        target.mkdir()
        mount(image, target, MountOptions(basedirs=(str(store),), readonly=True))
    try:
        # Both mounts resolve to the same backing file.
        for target in mounts:
            assert os.stat(target / "shared.bin").st_size == size
        first, second = cached_growth(
            shared_object,
            (mounts[0] / "shared.bin", mounts[1] / "shared.bin"),
            payload,
            first_max=1.3,
            after_evict=lambda: _assert_evicted(shared_object),
        )
        if not (size * 0.8 < first < size * 1.3 and second < size * 0.2):
            pytest.fail(f"Cached grew by {first >> 20} MiB, then {second >> 20} MiB")
        assert _resident(shared_object) == size  # the object itself holds the pages
    finally:
        for target in mounts:
            unmount(target)


def _assert_evicted(path: Path) -> None:
    assert _resident(path) == 0


def _resident(path: Path) -> int:
    """Bytes of ``path`` in the page cache, by fincore(1) (util-linux)."""
    r = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", str(path)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return int(r.stdout.strip())


@needs_kernel_mount
def test_writable_mount_with_upperdir(built: tuple[Path, Path, Path, str], tmp_path: Path) -> None:
    src, store, image, _digest = built
    upper, work, target = tmp_path / "upper", tmp_path / "work", tmp_path / "mnt"
    for d in (upper, work, target):
        d.mkdir()
    before = {p: p.read_bytes() for p in store.rglob("*") if p.is_file()}
    mount(image, target, parse_options(f"basedir={store},upperdir={upper},workdir={work}"))
    try:
        (target / "new-file").write_bytes(b"new")
        with (target / "a" / "big").open("r+b") as f:  # copied up from the object store
            f.write(b"CHANGED")
        assert (target / "a" / "big").read_bytes()[:7] == b"CHANGED"
    finally:
        unmount(target)
    assert (upper / "new-file").read_bytes() == b"new"
    assert (upper / "a" / "big").read_bytes()[:7] == b"CHANGED"
    assert {p: p.read_bytes() for p in store.rglob("*") if p.is_file()} == before
    assert (src / "a" / "big").read_bytes()[:7] != b"CHANGED"


@needs_kernel_mount
def test_digest_pins_the_image(
    built: tuple[Path, Path, Path, str], mnt: Path, tmp_path: Path
) -> None:
    src, store, image, digest = built
    assert digest == fsverity.digest_file(image).hex()
    wrong = "0" * 64
    r = _run("-o", f"basedir={store},digest={wrong}", str(image), str(mnt))
    assert r.returncode == 1
    assert (
        r.stderr
        == f"mount.composefs: Failed to mount composefs {image}: Image has wrong fs-verity\n"
    )
    assert not os.path.ismount(mnt)

    # Verified over a private sealed copy: replacing the file afterwards changes nothing.
    copy = tmp_path / "copy.cfs"
    shutil.copyfile(image, copy)
    r = _run("-o", f"basedir={store},digest={digest}", str(copy), str(mnt))
    assert r.returncode == 0, r.stderr
    try:
        other = tmp_path / "other"
        (other / "x").mkdir(parents=True)
        _build(other, tmp_path / "other-store", tmp_path / "other.cfs")
        os.replace(tmp_path / "other.cfs", copy)
        assert assert_same_tree(src, mnt) >= 3000
    finally:
        unmount(mnt)


@needs_kernel_mount
def test_verity_options_without_fs_verity(built: tuple[Path, Path, Path, str], mnt: Path) -> None:
    _src, store, image, _digest = built
    if fsverity.verity_supported(store):
        pytest.skip("fs-verity works here; this test is about machines without it")
    r = _run("-o", f"basedir={store},verity", str(image), str(mnt))
    assert r.returncode == 1
    assert "verity requested, but fs-verity is not available" in r.stderr
    assert not os.path.ismount(mnt)
    r = _run("-o", f"basedir={store},tryverity", str(image), str(mnt))
    assert r.returncode == 0, r.stderr
    assert (mnt / "a" / "sixty-five").read_bytes() == b"x" * 65


@needs_kernel_mount
def test_missing_objects(built: tuple[Path, Path, Path, str], mnt: Path, tmp_path: Path) -> None:
    _src, store, image, _digest = built
    partial = tmp_path / "partial"
    shutil.copytree(store, partial)
    victim = object_of(image, b"/a/sixty-five", store)
    (partial / victim.relative_to(store)).unlink()
    r = _run("-o", f"basedir={partial},checkobjects", str(image), str(mnt))
    assert r.returncode == 1
    assert f"1 object(s) missing from {partial}, first {victim.relative_to(store)}" in r.stderr
    # Without the check the kernel mounts, and opening that one file fails.
    r = _run("-o", f"basedir={partial}", str(image), str(mnt))
    assert r.returncode == 0, r.stderr
    with pytest.raises(FileNotFoundError):
        (mnt / "a" / "sixty-five").read_bytes()
    assert (mnt / "a" / "big").stat().st_size == 100_000


@needs_kernel_mount
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("basedir=/nonexistent", "object directory /nonexistent: No such file or directory"),
        ("basedir=/etc/hostname", "object directory /etc/hostname: Not a directory"),
    ],
)
def test_bad_directories_are_named(
    built: tuple[Path, Path, Path, str], mnt: Path, options: str, message: str
) -> None:
    image = built[2]
    r = _run("-o", options, str(image), str(mnt))
    assert r.returncode == 1
    assert r.stderr == f"mount.composefs: Failed to mount composefs {image}: {message}\n"


@needs_kernel_mount
def test_not_an_image(tmp_path: Path, mnt: Path) -> None:
    bogus = tmp_path / "bogus.cfs"
    bogus.write_bytes(b"\0" * 8192)
    with pytest.raises(MountError, match="not a composefs image"):
        mount(bogus, mnt, MountOptions(basedirs=(str(tmp_path),)))


@needs_kernel_mount
def test_idmapped_mount(built: tuple[Path, Path, Path, str], mnt: Path) -> None:
    src, store, image, _digest = built
    # A user namespace mapping 0..65535 to 100000..; as root the maps can be written directly.
    holder = subprocess.Popen(["unshare", "--user", "sleep", "60"])
    try:
        ns = Path(f"/proc/{holder.pid}")
        for _ in range(100):
            if os.readlink(ns / "ns/user") != os.readlink("/proc/self/ns/user"):
                break  # unshare has made its namespace
            time.sleep(0.02)
        (ns / "uid_map").write_text("0 100000 65536")
        (ns / "gid_map").write_text("0 100000 65536")
        mount(image, mnt, parse_options(f"basedir={store},idmap={ns}/ns/user"))
        st = os.stat(mnt / "a" / "big")
        assert (st.st_uid, st.st_gid) == (100000 + os.stat(src / "a" / "big").st_uid, 100000)
        assert (mnt / "a" / "big").read_bytes() == (src / "a" / "big").read_bytes()
    finally:
        holder.kill()
        holder.wait()


@needs_kernel_mount
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv to become nobody")
def test_mounting_as_non_root_fails_clearly(
    built: tuple[Path, Path, Path, str], tmp_path: Path
) -> None:
    image = built[2]
    base = Path(os.environ.get("TMPDIR", "/tmp"))
    target = Path(tempfile.mkdtemp(prefix="cfs-nobody-", dir=base))
    try:
        os.chown(target, 65534, 65534)
        readable = Path(tempfile.mkdtemp(prefix="cfs-nobody-img-", dir=base))
        readable.chmod(0o755)
        shutil.copyfile(image, readable / "image.cfs")
        (readable / "image.cfs").chmod(0o644)
        r = _run("-o", f"basedir={readable}", str(readable / "image.cfs"), str(target), user=65534)
        assert r.returncode == 1
        assert "Operation not permitted (mounting needs root" in r.stderr, r.stderr
        assert not os.path.ismount(target)
        shutil.rmtree(readable)
    finally:
        target.rmdir()


@needs_kernel_mount
def test_digest_checked_by_the_kernel_measurement(
    built: tuple[Path, Path, Path, str], mnt: Path, tmp_path: Path
) -> None:
    """An image file with fs-verity: digest= compares the kernel's measurement and mounts
    the file itself.  Needs a filesystem with fs-verity."""
    _src, store, image, digest = built
    if not fsverity.verity_supported(tmp_path):
        pytest.skip(f"no fs-verity on the filesystem of {tmp_path} (or in this kernel)")
    sealed = tmp_path / "sealed.cfs"
    shutil.copyfile(image, sealed)
    fd = os.open(sealed, os.O_RDONLY)
    try:
        assert fsverity.enable_verity(fd)
    finally:
        os.close(fd)
    assert _run("-o", f"basedir={store},digest={'0' * 64}", str(sealed), str(mnt)).returncode == 1
    r = _run("-o", f"basedir={store},digest={digest}", str(sealed), str(mnt))
    assert r.returncode == 0, r.stderr
    assert attached_loop_devices() == {} or all(
        "memfd" not in backing for backing in attached_loop_devices().values()
    )  # the file itself, not a private copy
