"""Kernel mounts of composefs images: EROFS serves the metadata, overlayfs the data.

The image is mounted as EROFS, detached (it never appears in any mount table), and used as
the only ordinary lower layer of an overlayfs whose data-only layers are the object
directories; overlayfs follows each file's ``trusted.overlay.redirect`` into them and, with
``verity=require``, checks the ``trusted.overlay.metacopy`` digest against the object's
fs-verity.  Once the overlay is attached, unmounting it releases everything else: the
EROFS superblock, and the loop device when one was needed (it is set to autoclear).

How it is done, from the preferred way down:

* the new mount API (``fsopen``/``fsconfig``/``fsmount``/``move_mount``) with the EROFS
  mount passed to overlayfs as ``lowerdir+=/proc/self/fd/N`` (nothing to clean up) and
  ``datadir+=`` per object directory (Linux 6.8+); overlayfs' own error text is reported;
* EROFS straight on the image file (Linux 6.12+), else on a read-only loop device;
* the legacy ``mount(2)`` option string ``lowerdir=EROFS::OBJ1::OBJ2`` (data-only layers,
  Linux 6.5+), then ``lowerdir=EROFS:OBJ1`` on kernels without data-only layers, where the
  image's root whiteout stubs hide the store's ``00``..``ff`` directories.

``digest=`` pins the image: with kernel fs-verity on the image file its measurement is
compared and the file (immutable under verity) is mounted; without it, the image is copied
into a sealed memfd, which nobody can change, hashed there and mounted from there, so the
bytes checked are the bytes the kernel parses.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Literal, NamedTuple

from composefs import syscalls
from composefs.erofs import format as fmt
from composefs.errors import ComposefsError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from composefs.rootless import RootlessMount

__all__ = [
    "MountError",
    "MountOptions",
    "MountOptionsError",
    "mount",
    "mount_rootless",
    "parse_options",
    "unmount",
]

ErofsBacking = Literal["auto", "file", "loop"]
MountApi = Literal["auto", "new", "legacy"]


class MountError(ComposefsError):
    """A mount failed; the message is the whole line mount.composefs prints."""


class MountOptionsError(MountError):
    """Options that make no sense; ``usage`` asks the CLI to show its usage too."""

    def __init__(self, message: str, *, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage


_DIGEST_HEX = 64  # a sha256 fs-verity digest

# mount.composefs runs at every mount: the modules only some mounts need (hashing, the
# legacy path's temporary directory) are imported when needed, to keep start-up short.


class MountOptions(NamedTuple):
    """What ``mount.composefs -o`` takes (tools.md §4.1), as a value.

    ``digest`` is 64 hex digits (the image's fs-verity digest); an empty string asks for
    ``verity`` without pinning the image, as with the reference.  ``verity`` makes
    overlayfs refuse any file whose object lacks the recorded fs-verity digest;
    ``try_verity`` does so only where the kernel and the object filesystem can.
    ``check_objects`` (not in the reference) refuses to mount when an object the image
    refers to is missing, instead of failing on first open.
    """

    basedirs: tuple[str, ...]
    digest: str | None = None
    verity: bool = False
    try_verity: bool = False
    readonly: bool = False
    upperdir: str | None = None
    workdir: str | None = None
    idmap: str | None = None
    check_objects: bool = False

    def validate(self) -> None:
        if not self.basedirs:
            raise MountOptionsError("No object dirs specified", usage=True)
        if any(not d for d in self.basedirs):
            raise MountOptionsError("Value for basedir option has incorrect format")
        if (self.upperdir is None) != (self.workdir is None):
            raise MountOptionsError("Both workdir and upperdir must be specified if used")
        if self.digest:
            try:
                raw = bytes.fromhex(self.digest)
            except ValueError:
                raw = b""
            if len(raw) * 2 != _DIGEST_HEX or len(self.digest) != _DIGEST_HEX:
                raise MountOptionsError(
                    f"invalid digest '{self.digest}': expected {_DIGEST_HEX} "
                    "hex digits (a sha256 fs-verity digest)"
                )

    @property
    def requires_verity(self) -> bool:
        return self.verity or self.digest is not None


_VALUED = ("basedir", "digest", "upperdir", "workdir", "idmap")


def _split_items(text: str) -> Iterator[tuple[str, str | None]]:
    """``key[=value]`` items of a comma-separated list; ``\\`` escapes the next character
    (so ``\\,`` does not split), and is removed from values, not from keys."""
    item: list[str] = []
    escaped = False
    items = []
    for ch in text:
        if escaped:
            item.append("\\" + ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ",":
            items.append(item)
            item = []
        else:
            item.append(ch)
    if escaped:
        item.append("\\")
    items.append(item)
    for parts in items:
        raw = "".join(parts)
        key, eq, value = raw.partition("=")
        if not eq:
            yield raw, None
            continue
        unescaped: list[str] = []
        skip = False
        for ch in value:
            if ch == "\\" and not skip:
                skip = True
                continue
            skip = False
            unescaped.append(ch)
        yield key, "".join(unescaped)


def parse_options(text: str | None) -> MountOptions:
    """Parse a ``mount.composefs -o`` string; later items override earlier ones."""
    values: dict[str, str] = {}
    flags = {"verity": False, "tryverity": False, "ro": False, "checkobjects": False}
    for key, value in _split_items(text) if text is not None else ():
        if key in _VALUED:
            if value is None:
                raise MountOptionsError(f"No value specified for {key} option")
            values[key] = value
        elif key in ("verity", "tryverity", "checkobjects", "ro"):
            flags[key] = True
        elif key == "rw":
            flags["ro"] = False
        else:
            raise MountOptionsError(f"Unsupported option {key}")
    basedir = values.get("basedir")
    return MountOptions(
        basedirs=tuple(basedir.split(":")) if basedir is not None else (),
        digest=values.get("digest"),
        verity=flags["verity"],
        try_verity=flags["tryverity"],
        readonly=flags["ro"],
        upperdir=values.get("upperdir"),
        workdir=values.get("workdir"),
        idmap=values.get("idmap"),
        check_objects=flags["checkobjects"],
    )


# -- the image --------------------------------------------------------------------------------


def _pinned_copy(image_fd: int, name: str) -> int:
    """A sealed memfd holding the image's bytes: no write, grow or shrink is possible any
    more, so a digest computed over it stays true for as long as it is mounted."""
    memfd = os.memfd_create(
        f"composefs:{os.path.basename(name)}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
    )
    try:
        size = os.fstat(image_fd).st_size
        offset = 0
        while offset < size:
            sent = os.sendfile(memfd, image_fd, offset, min(size - offset, 1 << 30))
            if sent == 0:
                break  # the file shrank under us: we hash what we copied
            offset += sent
        fcntl.fcntl(
            memfd,
            fcntl.F_ADD_SEALS,
            fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL,
        )
    except BaseException:
        os.close(memfd)
        raise
    return memfd


def _verified_image(image_fd: int, digest: str, name: str) -> int:
    """An fd of the image whose content has the expected fs-verity digest (it may be
    ``image_fd`` itself or a new sealed copy, which the caller closes)."""
    from composefs import fsverity

    expected = bytes.fromhex(digest)
    measured = fsverity.measure_verity(image_fd)
    if measured is not None:
        if measured != expected:
            raise MountError(f"Failed to mount composefs {name}: Image has wrong fs-verity")
        return image_fd
    memfd = _pinned_copy(image_fd, name)
    if fsverity.digest_fd(memfd) != expected:
        os.close(memfd)
        raise MountError(f"Failed to mount composefs {name}: Image has wrong fs-verity")
    return memfd


def _image_has_acl(fd: int, name: str) -> bool:
    header = os.pread(fd, fmt.COMPOSEFS_HEADER.size, 0)
    if len(header) < fmt.COMPOSEFS_HEADER.size:
        raise MountError(f"Failed to mount composefs {name}: not a composefs image (too short)")
    magic, _version, flags, _cfs_version = fmt.COMPOSEFS_HEADER.unpack(header)
    if magic != fmt.COMPOSEFS_MAGIC:
        raise MountError(
            f"Failed to mount composefs {name}: not a composefs image (magic {magic:#010x})"
        )
    return bool(flags & fmt.COMPOSEFS_FLAGS_HAS_ACL)


def _missing_objects(image_fd: int, basedirs: Iterable[str]) -> list[bytes]:
    from composefs.erofs.reader import Image
    from composefs.imageinfo import missing_objects, object_paths

    with open(os.dup(image_fd), "rb") as f, Image(f) as image:
        wanted = object_paths(image.to_tree())
    for basedir in basedirs:
        wanted = missing_objects(wanted, basedir)
    return sorted(wanted)


# -- EROFS -------------------------------------------------------------------------------------


def _erofs_context(source: str, has_acl: bool) -> syscalls.FsContext:
    ctx = syscalls.FsContext("erofs")
    try:
        ctx.set_string("source", source)
        ctx.set_flag("ro")
        if not has_acl:
            ctx.set_flag("noacl")  # ACL lookups are pure cost on images without any
        ctx.create()
    except BaseException:
        ctx.close()
        raise
    return ctx


def _erofs_new_api(
    image_fd: int, name: str, has_acl: bool, userns_fd: int | None, backing: ErofsBacking
) -> int:
    """A detached, read-only EROFS mount of the image; returns the mount fd."""
    ctx = None
    if backing != "loop":
        try:
            ctx = _erofs_context(f"/proc/self/fd/{image_fd}", has_acl)
        except OSError as e:
            # ENOTBLK: this kernel (or this file, e.g. a memfd) cannot back EROFS directly.
            if e.errno != errno.ENOTBLK or backing == "file":
                raise
    if ctx is None:
        device, loop_fd = syscalls.loop_attach(image_fd, name)
        try:
            ctx = _erofs_context(device, has_acl)
        finally:
            os.close(loop_fd)  # the superblock holds the device now; autoclear does the rest
    with ctx:
        mount_fd = syscalls.fsmount(ctx, syscalls.MOUNT_ATTR_RDONLY)
    if userns_fd is not None:
        try:
            syscalls.mount_setattr(mount_fd, syscalls.MOUNT_ATTR_IDMAP, userns_fd)
        except BaseException:
            os.close(mount_fd)
            raise
    return mount_fd


@contextmanager
def _erofs_legacy(image_fd: int, name: str, has_acl: bool, backing: ErofsBacking) -> Iterator[str]:
    """EROFS mounted with mount(2) on a private temporary directory, for as long as the
    overlay is being set up; lazily unmounted and removed afterwards."""
    import tempfile

    tmpdir = tempfile.mkdtemp(prefix=".composefs.", dir="/tmp")
    options = "" if has_acl else "noacl"
    try:
        loop_fd = None
        try:
            if backing != "loop":
                try:
                    syscalls.mount(
                        f"/proc/self/fd/{image_fd}", tmpdir, "erofs", syscalls.MS_RDONLY, options
                    )
                except OSError as e:
                    if e.errno != errno.ENOTBLK or backing == "file":
                        raise
                    backing = "loop"
            if backing == "loop":
                device, loop_fd = syscalls.loop_attach(image_fd, name)
                syscalls.mount(device, tmpdir, "erofs", syscalls.MS_RDONLY, options)
        finally:
            if loop_fd is not None:
                os.close(loop_fd)
        try:
            yield tmpdir
        finally:
            syscalls.umount(tmpdir, syscalls.MNT_DETACH)
    finally:
        os.rmdir(tmpdir)


# -- overlayfs ---------------------------------------------------------------------------------


class _NoNewApi(Exception):
    """The kernel cannot do this mount with the new API (too old for lowerdir+)."""


def _overlay_new_api(
    lower: str, options: MountOptions, verity: bool, try_verity: bool, target: str
) -> None:
    try:
        ctx = syscalls.FsContext("overlay")
    except OSError as e:
        if e.errno == errno.ENOSYS:
            raise _NoNewApi from None
        raise
    with ctx:
        try:
            ctx.set_flag("composefs-probe-unknown-key")
        except OSError:
            pass  # a real fs_context refuses unknown keys
        else:
            raise _NoNewApi  # an emulation of the new API that would ignore our options
        ctx.set_string("source", "composefs")
        ctx.set_string("metacopy", "on")
        ctx.set_string("redirect_dir", "on")
        if verity or try_verity:
            try:
                ctx.set_string("verity", "require")
            except OSError:
                if not try_verity:
                    raise
        try:
            ctx.set_string("lowerdir+", lower)
        except OSError as e:
            if e.errno == errno.EINVAL:
                raise _NoNewApi from None  # before Linux 6.8
            raise
        for basedir in options.basedirs:
            ctx.set_string("datadir+", basedir)
        if options.upperdir is not None and options.workdir is not None:
            ctx.set_string("upperdir", options.upperdir)
            ctx.set_string("workdir", options.workdir)
        ctx.create()
        mount_fd = syscalls.fsmount(ctx, syscalls.MOUNT_ATTR_RDONLY if options.readonly else 0)
    try:
        syscalls.move_mount(mount_fd, target)
    finally:
        os.close(mount_fd)


def _escape_legacy(path: str) -> str:
    return path.replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")


def _overlay_legacy(lower: str, options: MountOptions, verity: bool, target: str) -> None:
    flags = syscalls.MS_RDONLY if options.readonly else 0
    extra = ""
    if options.upperdir is not None and options.workdir is not None:
        extra += f",upperdir={_escape_legacy(options.upperdir)}"
        extra += f",workdir={_escape_legacy(options.workdir)}"
    if verity:
        extra += ",verity=require"
    layers = [_escape_legacy(lower)] + [_escape_legacy(d) for d in options.basedirs]
    try:
        # "::" makes the object directories data-only layers (Linux 6.5+).
        data = f"metacopy=on,redirect_dir=on,lowerdir={'::'.join(layers)}{extra}"
        syscalls.mount("composefs", target, "overlay", flags | syscalls.MS_SILENT, data)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        # Older kernels: the stores become ordinary lower layers; the image's opaque root
        # and its 00..ff whiteout stubs keep their directories out of sight.
        data = f"metacopy=on,redirect_dir=on,lowerdir={':'.join(layers)}{extra}"
        syscalls.mount("composefs", target, "overlay", flags, data)


# -- the whole mount ---------------------------------------------------------------------------


def directory_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` is not a usable directory, in strerror words; None when it is one
    (the kernel would only say ENOENT or ENOTDIR, without naming which directory)."""
    try:
        if stat.S_ISDIR(os.stat(path).st_mode):
            return None
        return os.strerror(errno.ENOTDIR)
    except OSError as e:
        return e.strerror or str(e)


def _check_directories(options: MountOptions, name: str) -> None:
    """Name the directory at fault; the kernel would only say ENOENT or ENOTDIR."""
    dirs = [("object directory", d) for d in options.basedirs]
    if options.upperdir is not None and options.workdir is not None:
        dirs += [("upperdir", options.upperdir), ("workdir", options.workdir)]
    for role, path in dirs:
        reason = directory_problem(path)
        if reason is not None:
            raise MountError(f"Failed to mount composefs {name}: {role} {path}: {reason}")


def _verity_for(options: MountOptions, name: str) -> tuple[bool, bool]:
    """(require, try): whether to ask overlayfs for ``verity=require``, strictly or not.

    The kernel accepts ``verity=require`` even where fs-verity cannot work (a kernel built
    without it, an object filesystem without it), and then every read of an external file
    fails; so the object directories are probed first.  ``verity`` then fails with the
    reason, ``tryverity`` and a bare ``digest=`` drop the requirement.
    """
    if not (options.requires_verity or options.try_verity):
        return False, False
    from composefs import fsverity

    unsupported = [d for d in options.basedirs if not fsverity.verity_supported(d)]
    if unsupported:
        if options.verity:
            raise MountError(
                f"Failed to mount composefs {name}: verity requested, but fs-verity is not "
                f"available for {unsupported[0]} (kernel or filesystem without fs-verity)"
            )
        return False, False
    return options.requires_verity, options.try_verity


def mount(
    image: str | os.PathLike[str],
    mountpoint: str | os.PathLike[str],
    options: MountOptions,
    *,
    api: MountApi = "auto",
    erofs_backing: ErofsBacking = "auto",
) -> None:
    """Mount a composefs image at ``mountpoint`` (needs CAP_SYS_ADMIN).

    ``api`` and ``erofs_backing`` force one of the ways described in the module doc (for
    tests and for working around a kernel); "auto" picks the best the kernel offers.
    Raises :class:`MountError` with mount.composefs' message.
    """
    name = os.fspath(image)
    target = os.fspath(mountpoint)
    options.validate()
    with ExitStack() as stack:
        userns_fd = None
        if options.idmap is not None:
            try:
                userns_fd = os.open(options.idmap, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
            except OSError as e:
                raise MountError(f"Failed to open userns {options.idmap}: {e.strerror}") from None
            stack.callback(os.close, userns_fd)
        try:
            image_fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise MountError(f"Failed to open {name}: {e.strerror}") from None
        stack.callback(os.close, image_fd)
        try:
            if not stat.S_ISREG(os.fstat(image_fd).st_mode):
                raise OSError(errno.EINVAL, "not a regular file")
            if options.digest:
                source_fd = _verified_image(image_fd, options.digest, name)
                if source_fd != image_fd:
                    stack.callback(os.close, source_fd)
            else:
                source_fd = image_fd
            has_acl = _image_has_acl(source_fd, name)
            _check_directories(options, name)
            if options.check_objects:
                missing = _missing_objects(source_fd, options.basedirs)
                if missing:
                    raise MountError(
                        f"Failed to mount composefs {name}: {len(missing)} object(s) missing "
                        f"from {':'.join(options.basedirs)}, first {os.fsdecode(missing[0])}"
                    )
            verity, try_verity = _verity_for(options, name)
            if api != "legacy":
                try:
                    lower_fd = _erofs_new_api(source_fd, name, has_acl, userns_fd, erofs_backing)
                except OSError as e:
                    if e.errno != errno.ENOSYS or api == "new":
                        raise
                else:
                    stack.callback(os.close, lower_fd)
                    lower = f"/proc/self/fd/{lower_fd}"
                    try:
                        _overlay_new_api(lower, options, verity, try_verity, target)
                        return
                    except _NoNewApi:
                        if api == "new":
                            raise OSError(errno.ENOSYS, "the kernel lacks lowerdir+") from None
                    _overlay_legacy(lower, options, verity, target)
                    return
            if userns_fd is not None:
                raise OSError(errno.EOPNOTSUPP, "idmap needs the new mount API")
            with _erofs_legacy(source_fd, name, has_acl, erofs_backing) as lower:
                _overlay_legacy(lower, options, verity, target)
        except OSError as e:
            raise MountError(f"Failed to mount composefs {name}: {_describe(e)}") from None


def _describe(e: OSError) -> str:
    text = e.strerror or str(e)
    if e.errno == errno.EPERM and os.geteuid() != 0:
        text += " (mounting needs root, or CAP_SYS_ADMIN)"
    return text


def unmount(mountpoint: str | os.PathLike[str], *, lazy: bool = False) -> None:
    """Unmount a composefs mount; everything under it goes with it."""
    syscalls.umount(os.fspath(mountpoint), syscalls.MNT_DETACH if lazy else 0)


def mount_rootless(
    image: str | os.PathLike[str],
    mountpoint: str | os.PathLike[str],
    options: MountOptions,
    *,
    command: Sequence[str] | None = None,
    userns: bool | None = None,
    map_root: bool = False,
    verify: bool = True,
    foreign_objects: bool = False,
    acl: bool = True,
    threads: int = 4,
    api: MountApi = "auto",
) -> RootlessMount:
    """Mount a composefs image without root, at kernel speed: a FUSE server (a new child
    process) serves the image's metadata, and overlayfs, mounted on top of it in new user
    and mount namespaces, reads file content straight from the object files (see
    :mod:`composefs.rootless`, which also says what is verified where).

    With ``command`` (a program and its arguments, like ``unshare``) it runs in the
    namespaces, which end with it: :meth:`~composefs.rootless.RootlessMount.wait` returns
    its exit status.  Without, the namespaces stay until
    :meth:`~composefs.rootless.RootlessMount.stop`: processes join them with
    ``join_command()`` (``nsenter``) or reach the tree at ``.path``
    (``/proc/PID/root/MOUNTPOINT``).

    ``userns`` (default: unless root) makes a user namespace mapping only this user's ids
    (to root with ``map_root``); as root without one, a command gets a private mount
    namespace and a kept mount is made in this process's own, visible to all.
    ``options`` as for :func:`mount`: ``basedirs``, ``digest``, ``verity`` and
    ``try_verity`` (overlayfs ``verity=require``), ``check_objects``; ``verify=False``
    checks no object, ``foreign_objects`` accepts objects others could change.  Raises
    :class:`~composefs.rootless.RootlessError` (a :class:`MountError`) with the reason
    when it cannot be done: no user namespaces, no FUSE, no overlayfs...
    """
    from composefs.rootless import start

    return start(
        image, mountpoint, options, command=command, userns=userns, map_root=map_root,
        verify=verify, foreign_objects=foreign_objects, acl=acl, threads=threads, api=api,
    )  # fmt: skip
