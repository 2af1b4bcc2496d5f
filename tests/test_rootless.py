"""Rootless mounts (composefs-fuse --rootless, composefs.mount.mount_rootless): FUSE serves
the metadata, overlayfs in a user namespace reads the objects.  The tree is compared with
the kernel mount of the same image, as root and as an ordinary user (nobody); content is
checked, commands run inside, and the failures say why.

Needs root (kernel mounts to compare with, becoming nobody, opening /dev/fuse to nobody
for the time of a test), /dev/fuse, fusermount3 and setpriv; each test skips with the
reason.
"""

from __future__ import annotations

import os
import select
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

from composefs import rootless
from composefs.mount import MountOptions, mount, mount_rootless, unmount

BIN = Path(sys.executable).parent
FUSE = str(BIN / "composefs-fuse")
IS_ROOT = os.geteuid() == 0
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def _skip_reason() -> str | None:
    if not IS_ROOT:
        return "needs root (kernel mounts to compare with, becoming nobody)"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    for tool in ("fusermount3", "setpriv", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    kernel = kernel_mount_skip_reason()
    if kernel is not None:
        return kernel
    reason = rootless.userns_unavailable_reason()
    if reason is not None:
        return reason
    return None


SKIP = _skip_reason()  # the fixtures of the tests that mount skip with it


def _build(src: Path, store: Path, image: Path) -> None:
    r = subprocess.run(
        [str(BIN / "mkcomposefs"), f"--digest-store={store}", "--hardlinks", str(src), str(image)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr


def _open_to_all(*roots: Path) -> None:
    """Directories 0755, files 0644 (symlinks left alone): readable by nobody."""
    for root in roots:
        for path in [root, *root.rglob("*")]:
            if path.is_symlink():
                continue
            path.chmod(0o755 if path.is_dir() else 0o644)


@pytest.fixture(scope="module")
def world() -> Iterator[Path]:
    """A base directory everyone can reach (pytest's are root's own), /dev/fuse opened to
    all users meanwhile (as distributions ship it)."""
    if SKIP:
        pytest.skip(SKIP)
    mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    base = Path(tempfile.mkdtemp(prefix="cfs-rootless-", dir="/tmp"))
    base.chmod(0o755)
    os.chmod("/dev/fuse", 0o666)
    try:
        yield base
    finally:
        os.chmod("/dev/fuse", mode)
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            target = line.split()[4]
            if target.startswith(str(base)):
                subprocess.run(["umount", "-l", target], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def built(world: Path) -> tuple[Path, Path, Path]:
    """(source, store, image): every file type, 3000 entries, hardlinks, xattrs; a whiteout
    (b/whiteout, stored escaped), an opaque directory, and the image's own
    ``user.overlay.*`` xattrs (which overlayfs with userxattr must show, not act on)."""
    src = make_tree(world / "src", big=True)
    opaque = src / "opaque"
    opaque.mkdir()
    (opaque / "inside").write_bytes(b"under an opaque directory\n" * 100)
    os.setxattr(opaque, "trusted.overlay.opaque", b"y")
    looks = src / "looks-overlay"
    looks.mkdir()
    (looks / "kept").write_bytes(b"a user.overlay.whiteout xattr, no whiteout\n" * 10)
    (looks / "small").write_bytes(b"inline")
    os.setxattr(looks, "user.overlay.opaque", b"y")
    os.setxattr(looks, "user.overlay.whiteouts", b"")
    os.setxattr(looks / "kept", "user.overlay.whiteout", b"")
    os.setxattr(looks / "kept", "user.overlay.redirect", b"/elsewhere")
    store, image = world / "store", world / "image.cfs"
    _open_to_all(src)
    _build(src, store, image)
    _open_to_all(store)
    image.chmod(0o644)
    return src, store, image


@contextmanager
def kernel_mount(image: Path, store: Path, mnt: Path) -> Iterator[Path]:
    mnt.mkdir(exist_ok=True)
    mount(image, mnt, MountOptions(basedirs=(str(store),), readonly=True))
    try:
        yield mnt
    finally:
        unmount(mnt)


@contextmanager
def as_nobody(
    image: Path, store: Path, mnt: Path, *options: str
) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    """composefs-fuse --rootless -f run by nobody; yields (the tree as seen from here,
    the server)."""
    mnt.mkdir(exist_ok=True)
    opts = ",".join([f"source={image}", f"basedir={store}", *options])
    proc = subprocess.Popen(
        [*NOBODY, FUSE, "--rootless", "-f", "-o", opts, str(mnt)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        ready, _w, _x = select.select([proc.stdout], [], [], 30)
        line = proc.stdout.readline() if ready else b""
        if not line.strip():
            proc.kill()
            err = proc.stderr.read().decode() if proc.stderr else ""
            pytest.fail(f"composefs-fuse --rootless did not mount: {err}")
        yield Path(f"/proc/{int(line)}/root{mnt}"), proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _server_log(proc: subprocess.Popen[bytes]) -> str:
    return proc.stderr.read().decode() if proc.stderr else ""


def _not_in_userns(name: str) -> bool:
    """What an ordinary user cannot see (trusted.*), or what a mount in a user namespace
    cannot show (as documented): POSIX ACLs (the FUSE mount would have to check
    permissions as the user), file capabilities (they belong to the namespace's root,
    whom the identity mapping leaves out: EOVERFLOW, as for any mount there)."""
    return name.startswith(("trusted.", "system.posix_acl_")) or name == "security.capability"


def _assert_same(
    kernel: dict[str, tuple[object, ...]], seen: dict[str, tuple[object, ...]]
) -> None:
    assert seen.keys() == kernel.keys(), sorted(set(seen) ^ set(kernel))[:10]
    for path, attrs in seen.items():
        assert attrs == kernel[path], path


def test_as_root_same_tree_as_the_kernel_mount(built: tuple[Path, Path, Path], world: Path) -> None:
    """As root, without a user namespace: mounted in this namespace like a kernel mount,
    and everything root sees is the kernel mount's, trusted.* and ACLs included."""
    src, store, image = built
    mnt = world / "mnt-root"
    mnt.mkdir()
    with kernel_mount(image, store, world / "kernel") as kmnt:
        kernel = snapshot(kmnt)
        with mount_rootless(image, mnt, MountOptions(basedirs=(str(store),))) as stack:
            assert not stack.userns and stack.path == str(mnt)
            assert stack.checks.startswith("each object once")
            _assert_same(kernel, snapshot(mnt))
            assert len(kernel) > 3000
            assert assert_same_tree(src, mnt) > 3000
            # whiteouts and opaque directories as in the kernel mount
            assert (mnt / "b" / "whiteout").stat().st_size == 0
            assert os.getxattr(mnt / "b" / "whiteout", "trusted.overlay.whiteout") == b""
            assert os.getxattr(mnt / "opaque", "trusted.overlay.opaque") == b"y"
            assert sorted(os.listdir(mnt / "looks-overlay")) == ["kept", "small"]
            assert "00" not in os.listdir(mnt)
            # the placeholders the server serves have no content: overlayfs read it all
            # from the objects
            assert (mnt / "a" / "big").read_bytes() == (src / "a" / "big").read_bytes()
        assert stack.returncode == 0
    assert not os.path.ismount(mnt)
    assert "composefs-meta" not in Path("/proc/self/mountinfo").read_text()


def test_as_nobody_same_tree_as_the_kernel_mount(
    built: tuple[Path, Path, Path], world: Path
) -> None:
    """As nobody, in a user namespace: what an ordinary user sees of the kernel mount, seen
    from outside through /proc/PID/root; nothing of the stack shows in this namespace."""
    src, store, image = built
    with (
        kernel_mount(image, store, world / "kernel") as kmnt,
        as_nobody(image, store, world / "mnt-nobody") as (tree, proc),
    ):
        kernel = snapshot(kmnt, hide_xattr=_not_in_userns)
        _assert_same(kernel, snapshot(tree, hide_xattr=_not_in_userns))
        assert os.getxattr(tree / "looks-overlay" / "kept", "user.overlay.whiteout") == b""
        assert os.getxattr(tree / "looks-overlay", "user.overlay.opaque") == b"y"
        assert (tree / "looks-overlay" / "kept").read_bytes() == (
            src / "looks-overlay" / "kept"
        ).read_bytes()
        mounts = Path("/proc/self/mountinfo").read_text()
        assert "composefs-meta" not in mounts and str(world / "mnt-nobody") not in mounts
    assert proc.returncode == 0, _server_log(proc)


def test_command_runs_inside_as_nobody(built: tuple[Path, Path, Path], world: Path) -> None:
    """composefs-fuse --rootless ... -- COMMAND: the command sees the tree as the user it
    is, its status is the exit status, and nothing is left once it ends."""
    src, store, image = built
    mnt = world / "mnt-cmd"
    mnt.mkdir()
    script = f"id -u; sha256sum < {mnt}/a/big; cat {mnt}/a/small; ls {mnt}/many | wc -l; exit 7"
    r = subprocess.run(
        [*NOBODY, FUSE, "--rootless", "-o", f"source={image},basedir={store}", str(mnt), "--",
         "sh", "-c", script],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 7, r.stderr
    import hashlib

    digest = hashlib.sha256((src / "a" / "big").read_bytes()).hexdigest()
    assert r.stdout.split() == ["65534", digest, "-", "hello", "3000"]
    assert "each object is checked once" in r.stderr  # it says what it checks
    r = subprocess.run(
        [*NOBODY, FUSE, "--rootless", "-r", "-o", f"source={image},basedir={store}", str(mnt),
         "--", "id", "-u"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert (r.returncode, r.stdout) == (0, "0\n"), r.stderr
    r = subprocess.run(
        [*NOBODY, FUSE, "--rootless", "-o", f"source={image},basedir={store}", str(mnt), "--",
         "no-such-command"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 127 and "no-such-command: command not found" in r.stderr
    time.sleep(0.2)
    assert not [p for p in Path("/tmp").glob("composefs-meta-*") if p.owner() == "nobody"]


def test_kept_stack_is_joined_and_stopped(built: tuple[Path, Path, Path], world: Path) -> None:
    """Without a command the namespaces stay, in the background: the PID printed is the
    one to join (nsenter), and SIGTERM to it ends everything."""
    _src, store, image = built
    mnt = world / "mnt-kept"
    mnt.mkdir()
    r = subprocess.run(
        [*NOBODY, FUSE, "--rootless", "-o", f"source={image},basedir={store}", str(mnt)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    pid = int(r.stdout)
    joined = subprocess.run(
        [*NOBODY, "nsenter", f"--target={pid}", "--user", "--mount", "--preserve-credentials",
         "cat", str(mnt / "a" / "small")],
        capture_output=True, timeout=30,
    )  # fmt: skip
    assert joined.stdout == b"hello\n", joined.stderr
    os.kill(pid, signal.SIGTERM)
    for _ in range(100):
        if not Path(f"/proc/{pid}").exists() or "Z" in _state(pid):
            break
        time.sleep(0.05)
    else:
        pytest.fail("the namespace process did not end")


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def test_api_command_as_root_in_a_private_namespace(
    built: tuple[Path, Path, Path], world: Path
) -> None:
    src, store, image = built
    mnt = world / "mnt-api"
    mnt.mkdir()
    out = world / "api-out"
    stack = mount_rootless(
        image, mnt, MountOptions(basedirs=(str(store),)),
        command=["sh", "-c", f"cat {mnt}/b/c/big-copy > {out}; exit 3"], api="legacy",
    )  # fmt: skip
    assert stack.private and stack.ns_pid
    assert stack.wait(30) == 3
    assert out.read_bytes() == (src / "b" / "c" / "big-copy").read_bytes()
    assert not os.path.ismount(mnt)


@pytest.fixture
def private(world: Path, request: pytest.FixtureRequest) -> tuple[Path, Path, Path]:
    """(source, store, image) of two files, for a test that damages the store."""
    base = world / request.node.name
    src = base / "src"
    src.mkdir(parents=True)
    (src / "large").write_bytes(os.urandom(1 << 20))
    (src / "other").write_bytes(os.urandom(10_000))
    store, image = base / "store", base / "image.cfs"
    _open_to_all(src)
    _build(src, store, image)
    _open_to_all(store)
    image.chmod(0o644)
    (base / "mnt").mkdir()
    return src, store, image


def test_tampered_object_is_refused_and_named(private: tuple[Path, Path, Path]) -> None:
    """Without fs-verity the server checks each object before overlayfs may read it: a
    changed one fails (EIO), named in the log; the others are served."""
    src, store, image = private
    obj = object_of(image, b"/large", store)
    with open(obj, "r+b") as f:
        f.seek(300_000)
        f.write(b"\xff" * 10)
    with as_nobody(image, store, image.parent / "mnt") as (tree, proc):
        with pytest.raises(OSError) as e:
            (tree / "large").read_bytes()
        assert e.value.errno == 5
        assert (tree / "other").read_bytes() == (src / "other").read_bytes()
    err = _server_log(proc)
    assert f"object {obj} has fs-verity digest" in err, err


def test_objects_others_can_change_are_refused(private: tuple[Path, Path, Path]) -> None:
    """Checked once, read unchecked afterwards: an object someone else could change is
    refused (EIO, named) unless foreign_objects; so is an object directory."""
    src, store, image = private
    obj = object_of(image, b"/large", store)
    os.chown(obj, 1234, 1234)
    with as_nobody(image, store, image.parent / "mnt") as (tree, proc):
        with pytest.raises(OSError) as e:
            (tree / "large").read_bytes()
        assert e.value.errno == 5
        assert (tree / "other").read_bytes() == (src / "other").read_bytes()
    assert f"object {obj}: it is owned by uid 1234" in _server_log(proc)
    with as_nobody(image, store, image.parent / "mnt", "foreign_objects") as (tree, proc):
        assert (tree / "large").read_bytes() == (src / "large").read_bytes()
    os.chown(store, 1234, 1234)
    r = subprocess.run(
        [*NOBODY, FUSE, "--rootless", "-o", f"source={image},basedir={store}",
         str(image.parent / "mnt"), "--", "true"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 1
    assert f"object directory {store} is owned by uid 1234" in r.stderr, r.stderr


def test_missing_object(private: tuple[Path, Path, Path]) -> None:
    _src, store, image = private
    object_of(image, b"/large", store).unlink()
    with (
        as_nobody(image, store, image.parent / "mnt") as (tree, proc),
        pytest.raises(FileNotFoundError),
    ):
        (tree / "large").read_bytes()
    assert "not found in" in _server_log(proc)
    r = subprocess.run(
        [*NOBODY, FUSE, "--rootless", "-o", f"source={image},basedir={store},checkobjects",
         str(image.parent / "mnt"), "--", "true"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 1 and "1 object(s) missing" in r.stderr, r.stderr


def test_page_cache_is_shared(world: Path) -> None:
    """Two rootless mounts of images sharing a 32 MiB object (and the kernel mount): the
    object's pages are cached once; the second reader grows the cache by < 5%."""
    size = 32 << 20
    payload = os.urandom(size)
    base = world / "cache"
    store = base / "store"
    images = []
    for name in ("one", "two"):
        src = base / name
        src.mkdir(parents=True)
        (src / "shared.bin").write_bytes(payload)
        (src / name).write_bytes(name.encode() * 50)
        _open_to_all(src)
        images.append(base / f"{name}.cfs")
        _build(src, store, images[-1])
        images[-1].chmod(0o644)
    _open_to_all(store)
    obj = object_of(images[0], b"/shared.bin", store)
    with (
        as_nobody(images[0], store, base / "mnt-one") as (one, _p1),
        as_nobody(images[1], store, base / "mnt-two") as (two, _p2),
        kernel_mount(images[1], store, base / "kernel") as kmnt,
    ):
        first, second = cached_growth(
            obj, (one / "shared.bin", two / "shared.bin"), payload, first_max=1.5
        )
        if not (size * 0.8 < first < size * 1.5 and second < size * 0.05):
            pytest.fail(f"Cached grew by {first >> 20} MiB, then {second >> 20} MiB")
        first, second = cached_growth(
            obj, (one / "shared.bin", kmnt / "shared.bin"), payload, first_max=1.5
        )
        if not second < size * 0.05:
            pytest.fail(f"the kernel mount after the rootless one grew Cached by {second} B")


def test_fuse_unavailable_is_named(private: tuple[Path, Path, Path]) -> None:
    _src, store, image = private
    mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    os.chmod("/dev/fuse", 0o600)
    try:
        r = subprocess.run(
            [*NOBODY, FUSE, "--rootless", "-o", f"source={image},basedir={store}",
             str(image.parent / "mnt"), "--", "true"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        os.chmod("/dev/fuse", mode)
    assert r.returncode == 1
    assert r.stderr.startswith(
        "composefs-fuse: FUSE is not available: /dev/fuse (mode 0600) cannot be opened by uid 65534"
    ), r.stderr


def test_disabled_user_namespaces_are_named(private: tuple[Path, Path, Path]) -> None:
    """In a user namespace whose own user.max_user_namespaces is 0 (set there, so the
    machine is not touched), a stack that needs a new one says why it cannot."""
    _src, store, image = private
    script = 'echo 0 > /proc/sys/user/max_user_namespaces && exec "$@"'
    r = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", FUSE,
         "--rootless", "--userns", "-o", f"source={image},basedir={store}",
         str(image.parent / "mnt"), "--", "true"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 1, r.stderr
    assert r.stderr == (
        "composefs-fuse: user namespaces are not available: user namespaces are disabled "
        "(sysctl user.max_user_namespaces = 0)\n"
    )


def test_userns_detection(tmp_path: Path) -> None:
    """The reasons read from the sysctls (a fake /proc), and those of a failed unshare."""
    proc = tmp_path / "proc"
    (proc / "self/ns").mkdir(parents=True)
    (proc / "sys/user").mkdir(parents=True)
    (proc / "sys/kernel").mkdir(parents=True)
    assert rootless.userns_unavailable_reason(proc) == (
        "the kernel has no user namespaces (CONFIG_USER_NS)"
    )
    (proc / "self/ns/user").write_text("")
    assert rootless.userns_unavailable_reason(proc) is None
    (proc / "sys/user/max_user_namespaces").write_text("0\n")
    assert "user.max_user_namespaces = 0" in (rootless.userns_unavailable_reason(proc) or "")
    (proc / "sys/user/max_user_namespaces").write_text("100\n")
    (proc / "sys/kernel/unprivileged_userns_clone").write_text("0\n")
    expected = None if IS_ROOT else "kernel.unprivileged_userns_clone = 0"
    reason = rootless.userns_unavailable_reason(proc)
    assert reason is None if expected is None else expected in (reason or "")
    (proc / "sys/kernel/unprivileged_userns_clone").unlink()
    assert rootless._unshare_error(28, str(proc)).endswith(
        "the limit user.max_user_namespaces is reached"
    )
    assert "security policy" in rootless._unshare_error(1, str(proc))


def test_command_line_errors(private: tuple[Path, Path, Path]) -> None:
    _src, store, image = private
    mnt = str(image.parent / "mnt")
    opts = f"source={image},basedir={store}"
    cases = [
        (["-o", opts, mnt, "--", "true"], "'-- COMMAND' needs --rootless"),
        (["-o", opts + ",verity", mnt], "'verity' needs --rootless"),
        (["--rootless", "-o", opts + ",allow_other", mnt], "'allow_other' does not apply"),
        (["--rootless", "-o", opts, mnt, "--"], "no command after '--'"),
        (["--rootless", "-o", opts + ",verity", mnt, "--", "true"],
         "verity requested, but fs-verity is not available"),
        (["--rootless", "-o", opts, "/nonexistent", "--", "true"],
         "mount point /nonexistent: No such file or directory"),
    ]  # fmt: skip
    for args, message in cases:
        r = subprocess.run([*NOBODY, FUSE, *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 1, (args, r.stderr)
        assert message in r.stderr, (args, r.stderr)


def test_verity_require_where_the_kernel_has_it(private: tuple[Path, Path, Path]) -> None:
    """With kernel fs-verity on the objects, overlayfs checks them (verity=require, the
    digests in user.overlay.metacopy) and the server checks nothing."""
    from composefs.fsverity import enable_verity, verity_supported

    src, store, image = private
    if not verity_supported(store):
        pytest.skip(f"no fs-verity on the filesystem of {store} (or in this kernel)")
    for obj in store.rglob("*"):
        if obj.is_file():
            fd = os.open(obj, os.O_RDONLY)
            try:
                assert enable_verity(fd)
            finally:
                os.close(fd)
    with as_nobody(image, store, image.parent / "mnt", "verity") as (tree, _proc):
        assert (tree / "large").read_bytes() == (src / "large").read_bytes()


def _xattr_request(name: bytes, size: int = 4096) -> memoryview:
    from composefs.fuse import protocol as p

    return memoryview(p.GETXATTR_IN.pack(size, 0) + name + b"\0")


def test_metadata_only_server_unit(tmp_path: Path) -> None:
    """What the metadata-only server answers, without mounting: overlayfs' xattrs under
    user.overlay., the image's own escaped, escaped trusted.overlay.* unescaped; the
    redirect given only once the object is checked; placeholders without content."""
    from composefs import dumpfile, fsverity
    from composefs.erofs.reader import Image
    from composefs.erofs.writer import build_image
    from composefs.fuse import Filesystem, FuseOptions
    from composefs.fuse import protocol as p

    content = os.urandom(5000)
    digest = fsverity.digest(content)
    path = f"{digest.hex()[:2]}/{digest.hex()[2:]}"
    store = tmp_path / "store"
    (store / path[:2]).mkdir(parents=True)
    (store / path).write_bytes(content)
    dump = (
        b"/ 4096 40755 2 0 0 0 1.0 - - - trusted.overlay.opaque=z\n"
        + f"/big 5000 100644 1 0 0 0 1.0 {path} - {digest.hex()} user.overlay.whiteout= "
        "trusted.overlay.origin=o\n".encode()
        + b"/small 3 100644 1 0 0 0 1.0 - abc -\n"
    )
    image = Image(build_image(dumpfile.parse(dump, strict=True)))
    fs = Filesystem(image, [str(store)], FuseOptions(metadata_only=True))

    def nodeid(name: bytes) -> int:
        entry = fs.lookup(p.ROOT_ID, memoryview(name + b"\0"))
        return int(p.ENTRY_OUT_HEAD.unpack_from(entry)[0])

    big, small = nodeid(b"big"), nodeid(b"small")
    names = fs.listxattr(big, memoryview(p.GETXATTR_IN.pack(4096, 0)), 0).split(b"\0")
    assert sorted(n for n in names if n) == [
        b"trusted.overlay.origin", b"user.overlay.metacopy", b"user.overlay.overlay.whiteout",
        b"user.overlay.redirect",
    ]  # fmt: skip
    # the image's trusted.overlay.opaque (stored escaped) as the kernel mount shows it;
    # the writer's own (the root is opaque) for overlayfs
    names = fs.listxattr(p.ROOT_ID, memoryview(p.GETXATTR_IN.pack(4096, 0)), 0).split(b"\0")
    assert sorted(n for n in names if n) == [b"trusted.overlay.opaque", b"user.overlay.opaque"]
    assert fs.getxattr(p.ROOT_ID, _xattr_request(b"trusted.overlay.opaque"), 0) == b"z"
    assert fs.listxattr(p.ROOT_ID, memoryview(p.GETXATTR_IN.pack(4096, 0)), 1000) == (
        b"user.overlay.opaque\0"
    )
    assert fs.getxattr_needs_object(big) and not fs.getxattr_needs_object(small)
    assert fs.getxattr(big, _xattr_request(b"user.overlay.redirect"), 1000) == b"/" + path.encode()
    assert not fs.getxattr_needs_object(big)  # checked once
    read = memoryview(p.READ_IN.pack(0, 0, 4096, 0, 0, 0, 0))
    with pytest.raises(OSError) as e:
        fs.read(big, read)
    assert e.value.errno == 5  # a placeholder: overlayfs reads the object
    assert fs.read(small, read) == b"abc"
    fs.close()
    # a changed object: the redirect is refused, so overlayfs cannot follow it
    (store / path).write_bytes(content[:-1] + b"!")
    fs = Filesystem(image, [str(store)], FuseOptions(metadata_only=True))
    with pytest.raises(OSError) as e:
        fs.getxattr(big, _xattr_request(b"user.overlay.metacopy"), 1000)
    assert e.value.errno == 5
    fs.close()
    # ... unless overlayfs checks it itself (kernel fs-verity), or nothing is checked
    for options in (
        FuseOptions(metadata_only=True, kernel_verity=True),
        FuseOptions(metadata_only=True, verify=False),
    ):
        fs = Filesystem(image, [str(store)], options)
        assert fs.getxattr(big, _xattr_request(b"user.overlay.redirect"), 0).startswith(b"/")
        fs.close()


def test_verity_require_reaches_overlayfs(
    private: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where fs-verity is available overlayfs gets verity=require and enforces it: here
    (no fs-verity, the probe made to say otherwise) every object then fails to open, the
    server having checked nothing."""
    from composefs import fsverity

    _src, store, image = private
    (image.parent / "mnt").mkdir(exist_ok=True)
    monkeypatch.setattr(fsverity, "verity_supported", lambda _path: True)
    options = MountOptions(basedirs=(str(store),), try_verity=True)
    with mount_rootless(image, image.parent / "mnt", options, userns=False) as stack:
        assert stack.checks.startswith("kernel fs-verity")
        assert "verity=require" in Path("/proc/self/mountinfo").read_text()
        with pytest.raises(OSError) as e:
            (Path(stack.path) / "large").read_bytes()
        assert e.value.errno == 5
