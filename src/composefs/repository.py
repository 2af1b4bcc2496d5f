"""A composefs repository: one object store shared by every image on a machine.

The layout is composefs-rs's repository format, version 1, with sha256 digests::

    meta.json               {"version": 1, "algorithm": "fsverity-sha256-12", "features": …}
    objects/XX/<62 hex>     content named by its fs-verity digest: file data and images alike
    images/<64 hex>         -> ../objects/XX/<62 hex>   the images this repository wrote
    images/refs/<name>      -> ../<64 hex> (one more ../ per level of name)   the GC roots

Only images listed under ``images/`` are ever mounted: the kernel keeps EROFS mounting for
root because its parser trusts the image, so we mount only what our own writer produced.
An import never stores a foreign image's bytes: it reads the source (a directory, a dump
file, or an image through the hardened reader) into a tree and writes the image afresh.

**Writes and crashes.**  Every file is written under a temporary name (``.tmp-*``, in
``objects/``, or in ``objects/XX/`` for an object whose digest is known), made durable
(``syncfs`` for a batch of objects, ``fsync`` for an image), then renamed into place and
its directory made durable; symlinks are made the same way.  The
order is objects, then the image object, then ``images/<id>``, then the ref: a crash at any
point leaves only temporary files and unreferenced entries, which ``gc`` removes, never an
object whose content disagrees with its name nor a ref to a missing image.

**Concurrency.**  The repository directory itself is locked with ``flock`` (as composefs-rs
does, so its tools and ours exclude each other): every operation that adds or reads takes a
shared lock for its whole duration; ``gc`` and ``fsck --repair`` take it exclusive.  An
import holds its shared lock from before it first asks whether an object exists until its
ref is durable, so a gc runs either wholly before it (and the import then writes again
whatever gc removed, because it looks only after locking) or wholly after it (and the ref
keeps everything alive).  No grace period is needed, and under the exclusive lock every
temporary file is known to be stale.

**Verity.**  ``init`` enables fs-verity on ``meta.json`` where the filesystem can; such a
repository is *secure*: every object must have fs-verity, each one's kernel measurement
must equal its name, and mounts ask overlayfs for ``verity=require``.  Where fs-verity is
unavailable the repository is *insecure* (as composefs-rs calls it): digests are computed in
userspace, and mounting still pins the image by its id (hashed in a sealed copy).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import posixpath
import re
import stat
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from composefs import fsverity
from composefs.errors import ComposefsError, FormatError
from composefs.fsutil import fsync_dir
from composefs.objects import (
    OBJECT_MODE,
    TEMP_PREFIX,
    ObjectStore,
    ObjectWriter,
    check_objects,
    object_name,
    seal_object,
    stage_copy,
    temporary_files,
)
from composefs.tree import S_IFMT, S_IFREG, Inode, Tree

FORMAT_VERSION = 1
ALGORITHM = "fsverity-sha256-12"
METADATA = "meta.json"
OCI_REFS = "oci/refs"
OCI_LAYERS = "oci/layers"
QUARANTINE = "quarantine"  # where fsck --repair moves damaged objects (not in composefs-rs)

# Feature flags this version understands (composefs-rs defines none yet either).
KNOWN_COMPAT: frozenset[str] = frozenset()
KNOWN_RO_COMPAT: frozenset[str] = frozenset()
KNOWN_INCOMPAT: frozenset[str] = frozenset()

_HEX64 = re.compile(r"[0-9a-f]{64}")
_OBJECT_DIR = re.compile(r"[0-9a-f]{2}")
_OBJECT_FILE = re.compile(r"[0-9a-f]{62}")
_DIR_MODE = 0o755


class RepositoryError(ComposefsError):
    """The repository is missing, not one, of a newer format, damaged, or asked for
    something it does not have; the message names the path or name at fault."""


def user_path() -> Path:
    """Where ``--user`` repositories live, as with composefs-rs."""
    home = os.environ.get("HOME")
    if not home:
        raise RepositoryError("$HOME must be set for the user repository")
    return Path(home) / ".var/lib/composefs"


def system_path() -> Path:
    """Where ``--system`` repositories live, as with composefs-rs."""
    return Path("/sysroot/composefs")


def default_path() -> Path:
    """The system repository for root, the user's own for everybody else."""
    return system_path() if os.geteuid() == 0 else user_path()


def is_image_id(name: str) -> bool:
    return _HEX64.fullmatch(name) is not None


def check_ref_name(name: str) -> str:
    """A ref name is a relative path below ``images/refs``; ``refs/`` in front is allowed."""
    if name.startswith("refs/"):
        name = name[len("refs/") :]
    parts = name.split("/")
    if (
        not name
        or "\0" in name
        or any(p in ("", ".", "..") or p.startswith(TEMP_PREFIX) for p in parts)
    ):
        raise RepositoryError(f"invalid ref name '{name}'")
    return name


def quote_ref(name: str) -> str:
    """An OCI ref name as one file name: ``/`` and ``%`` percent-encoded (as composefs-rs)."""
    if not name or "\0" in name or name in (".", "..") or name.startswith(TEMP_PREFIX):
        raise RepositoryError(f"invalid OCI ref name '{name}'")
    return quote(name, safe=":@+,=!~*'()[]$&;")


def _listdir(path: Path) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []


# -- results ----------------------------------------------------------------------------------


@dataclass
class ImportResult:
    image_id: str
    ref: str | None
    files: int = 0
    objects_added: int = 0
    objects_reused: int = 0
    bytes_added: int = 0
    image_size: int = 0


@dataclass
class ImageEntry:
    id: str
    refs: list[str]
    size: int | None  # None when the image object is missing


@dataclass
class GcResult:
    dry_run: bool
    images_removed: list[str] = field(default_factory=list)
    objects_removed: int = 0
    bytes_removed: int = 0
    temporary_files_removed: int = 0


@dataclass
class Problem:
    kind: str  # object-damaged, object-unverified, stray-file, image-unreadable, ...
    path: str  # relative to the repository
    detail: str


@dataclass
class FsckResult:
    secure: bool
    objects_checked: int = 0
    images_checked: int = 0
    refs_checked: int = 0
    temporary_files: int = 0
    problems: list[Problem] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["ok"] = self.ok
        return out


@dataclass
class ImageStats:
    id: str
    refs: list[str]
    files: int = 0  # regular files
    bytes: int = 0  # their content, every copy counted
    objects: int = 0  # distinct external objects
    referenced_bytes: int = 0  # content stored for it (each object once)
    unique_bytes: int = 0  # in objects no other image uses
    shared_bytes: int = 0  # in objects other images use too


@dataclass
class RepositoryStats:
    images: list[ImageStats]
    objects: int = 0  # every file under objects/, images included
    stored_bytes: int = 0
    content_bytes: int = 0  # regular-file content of all images, every copy counted
    referenced_bytes: int = 0  # distinct objects the images use
    saved_bytes: int = 0  # content kept in objects, every copy counted, less referenced_bytes
    unreferenced_objects: int = 0  # neither an image nor used by one: what gc frees
    unreferenced_bytes: int = 0


Progress = Callable[[int, int], None]  # (done, total)


# -- the repository ---------------------------------------------------------------------------


class Repository:
    """An open repository.  Every method takes the lock it needs for its own duration."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.objects = self.path / "objects"
        self.images_dir = self.path / "images"
        self.refs_dir = self.images_dir / "refs"
        meta = _read_metadata(self.path)
        self.secure = meta.secure
        self.read_only_features = meta.read_only_features

    # -- creating and opening ------------------------------------------------------------------

    @classmethod
    def init(
        cls, path: str | os.PathLike[str], *, insecure: bool = False, require_verity: bool = False
    ) -> tuple[Repository, bool]:
        """Create (or confirm) a repository; returns it and whether it was created.

        fs-verity is enabled on ``meta.json`` unless ``insecure``; where the filesystem
        cannot do it, the repository is made insecure, or with ``require_verity`` refused.
        """
        p = Path(path)
        if (p / METADATA).exists():
            return cls(p), False  # validates; an existing repository is left as it is
        try:
            p.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
        except OSError as e:
            raise RepositoryError(f"{p}: cannot create repository: {e.strerror}") from None
        if not p.is_dir():
            raise RepositoryError(f"{p}: not a directory")
        body = json.dumps(_metadata_json(), indent=2).encode() + b"\n"
        verity = False
        if not insecure:
            verity = fsverity.verity_supported(p)
            if not verity and require_verity:
                raise RepositoryError(
                    f"{p}: the filesystem (or kernel) has no fs-verity; "
                    "pass --insecure to create a repository that does not use it"
                )
        (p / "objects").mkdir(mode=_DIR_MODE, exist_ok=True)
        (p / "images" / "refs").mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
        tmp = p / f"{TEMP_PREFIX}{METADATA}.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, body)
            os.fsync(fd)
        finally:
            os.close(fd)
        if verity:
            fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
            try:
                verity = fsverity.enable_verity(fd)
            finally:
                os.close(fd)
        try:
            os.link(tmp, p / METADATA)  # never replaces a meta.json made meanwhile
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        for d in (p / "images", p):
            fsync_dir(d)
        return cls(p), True

    # -- locking -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, *, exclusive: bool = False, wait_message: str | None = None) -> Iterator[None]:
        """Hold the repository lock (its own open file description, so threads of one
        process exclude each other as processes do)."""
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            op = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
            try:
                fcntl.flock(fd, op | fcntl.LOCK_NB)
            except BlockingIOError:
                if wait_message is not None and sys.stderr.isatty():
                    sys.stderr.write(wait_message + "\n")
                fcntl.flock(fd, op)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _writable(self) -> None:
        if self.read_only_features:
            raise RepositoryError(
                f"{self.path}: read-only: {METADATA} lists features this tool does not know "
                f"({', '.join(self.read_only_features)})"
            )

    # -- names ---------------------------------------------------------------------------------

    def object_path(self, digest: bytes | str) -> Path:
        h = digest if isinstance(digest, str) else digest.hex()
        return self.objects / h[:2] / h[2:]

    def resolve(self, name: str) -> str:
        """The image id ``name`` stands for: an id listed under ``images/``, or a ref.

        Only what the repository's own links say is believed: each link must have exactly
        the form this repository writes, so nothing outside ``objects/`` can be reached.
        """
        if is_image_id(name.lower()):
            self._image_link(name.lower())
            return name.lower()
        ref = check_ref_name(name)
        link = self.refs_dir / ref
        try:
            target = os.readlink(link)
        except FileNotFoundError:
            raise RepositoryError(f"no image or ref named '{name}' in {self.path}") from None
        except OSError as e:
            if e.errno == errno.EINVAL:
                raise RepositoryError(f"ref '{ref}' is not a symlink") from None
            raise RepositoryError(f"ref '{ref}': {e.strerror}") from None
        resolved = posixpath.normpath(posixpath.join("images/refs", posixpath.dirname(ref), target))
        image_id = resolved.removeprefix("images/")
        if not resolved.startswith("images/") or not is_image_id(image_id):
            raise RepositoryError(f"ref '{ref}' points outside images/: {target}")
        self._image_link(image_id, via=f"ref '{ref}'")
        return image_id

    def _image_link(self, image_id: str, via: str | None = None) -> None:
        """Check ``images/<id>`` names the object ``<id>``; say what is wrong if not."""
        link = self.images_dir / image_id
        what = f"image {image_id}" + (f" (from {via})" if via else "")
        try:
            target = os.readlink(link)
        except FileNotFoundError:
            raise RepositoryError(f"{what} is not in {self.path}/images") from None
        except OSError as e:
            raise RepositoryError(f"{what}: {e.strerror}") from None
        if target != f"../objects/{image_id[:2]}/{image_id[2:]}":
            raise RepositoryError(f"{what}: images/{image_id} points elsewhere: {target}")

    def image_file(self, name: str) -> tuple[str, Path]:
        """(id, path of the image object) for an image or ref name; the file must exist."""
        image_id = self.resolve(name)
        path = self.object_path(image_id)
        if not path.is_file():
            raise RepositoryError(f"image {image_id}: its object is missing (run fsck)")
        return image_id, path

    # -- refs ----------------------------------------------------------------------------------

    def refs(self) -> dict[str, str]:
        """Every ref and the image id it names (unresolvable ones left out)."""
        out: dict[str, str] = {}
        for ref in self._ref_names():
            with contextlib.suppress(RepositoryError):
                out[ref] = self.resolve("refs/" + ref)
        return out

    def _ref_names(self) -> list[str]:
        names = []
        for dirpath, dirnames, filenames in os.walk(self.refs_dir):
            rel = os.path.relpath(dirpath, self.refs_dir)
            for n in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
                names.append(n if rel == "." else f"{rel}/{n}")
        return sorted(names)

    def add_ref(self, ref: str, target: str) -> str:
        """Point ``ref`` at an image (given by id or by another ref); returns the id."""
        self._writable()
        ref = check_ref_name(ref)
        with self.lock():
            image_id = self.resolve(target)
            self._set_ref(ref, image_id)
        return image_id

    def _set_ref(self, ref: str, image_id: str) -> None:
        depth = ref.count("/") + 1
        link = self.refs_dir / ref
        for attempt in range(3):
            link.parent.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
            try:
                self._symlink("../" * depth + image_id, link)
                return
            except FileNotFoundError:
                if attempt == 2:  # a concurrent 'ref rm' kept removing the directory
                    raise

    def remove_ref(self, ref: str) -> None:
        self._writable()
        ref = check_ref_name(ref)
        with self.lock():
            link = self.refs_dir / ref
            if not link.is_symlink():
                raise RepositoryError(f"no ref named '{ref}' in {self.path}")
            link.unlink()
            parent = link.parent
            fsync_dir(parent)
            while parent != self.refs_dir:  # drop directories the ref alone needed
                try:
                    parent.rmdir()
                except OSError:
                    break
                parent = parent.parent
                fsync_dir(parent)

    def _symlink(self, target: str, link: Path) -> None:
        """Create or replace ``link`` atomically and durably."""
        tmp = self.objects / f"{TEMP_PREFIX}link-{os.urandom(6).hex()}"
        os.symlink(target, tmp)
        try:
            os.rename(tmp, link)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        fsync_dir(link.parent)

    # -- images --------------------------------------------------------------------------------

    def images(self) -> list[ImageEntry]:
        """Every image under ``images/``, with the refs naming it, sorted by id."""
        by_id: dict[str, list[str]] = {}
        for ref, image_id in self.refs().items():
            by_id.setdefault(image_id, []).append(ref)
        out = []
        for image_id in self._image_ids():
            try:
                size: int | None = self.object_path(image_id).stat().st_size
            except FileNotFoundError:
                size = None
            out.append(ImageEntry(image_id, by_id.get(image_id, []), size))
        return out

    def _image_ids(self) -> list[str]:
        return [n for n in _listdir(self.images_dir) if is_image_id(n)]

    def image_objects(self, image_id: str) -> dict[str, int]:
        """The objects an image uses: ``XX/<62 hex>`` -> size."""
        return _image_usage(self.object_path(image_id))[3]

    # -- importing -----------------------------------------------------------------------------

    def import_directory(
        self,
        source: str | os.PathLike[str],
        *,
        ref: str | None = None,
        options: Any = None,
        progress: Callable[[Any], None] | None = None,
    ) -> ImportResult:
        """Read a directory tree (as ``mkcomposefs`` does), store its content and image."""
        from composefs.scan import ScanOptions, ScanStats, scan_directory

        self._writable()
        if ref is not None:
            ref = check_ref_name(ref)
        stats = ScanStats()
        store = ObjectStore(self.objects, create=False)
        with self.lock():
            tree = scan_directory(
                source,
                options or ScanOptions(),
                store,
                progress=progress,
                stats=stats,
                require_verity=self.secure,
            )
            result = self.commit_tree(tree, ref)
        result.objects_added = stats.objects_added
        result.objects_reused = stats.objects_reused
        result.bytes_added = stats.bytes_added
        return result

    def import_tree(
        self,
        tree: Tree,
        *,
        ref: str | None = None,
        objects_from: str | os.PathLike[str] | None = None,
        source: str = "<tree>",
        progress: Progress | None = None,
    ) -> ImportResult:
        """Store an image of ``tree`` (from a dump file or an image).

        Every file stored outside the image must end up as an object here: with
        ``objects_from`` (an object directory such as a ``--digest-store``), each one is
        read from there, its digest computed and checked against the one the tree records,
        and copied in if new; without it, each must be in the repository already.  The
        payloads are rewritten to the repository's ``XX/<62 hex>`` names.
        """
        self._writable()
        if ref is not None:
            ref = check_ref_name(ref)
        with self.lock():
            counts = self._gather_objects(tree, objects_from, source, progress)
            result = self.commit_tree(tree, ref)
        result.objects_added, result.objects_reused, result.bytes_added = counts
        return result

    def _gather_objects(
        self,
        tree: Tree,
        objects_from: str | os.PathLike[str] | None,
        source: str,
        progress: Progress | None,
    ) -> tuple[int, int, int]:
        external: dict[bytes, list[tuple[bytes, Inode]]] = {}
        for path, node in tree.walk():
            if node.mode & S_IFMT == S_IFREG and node.content is None and node.size > 0:
                if node.payload is None:
                    raise RepositoryError(
                        f"{source}: {_show(path)}: a file with content but no backing object"
                    )
                external.setdefault(node.payload, []).append((path, node))
        writer = ObjectWriter(ObjectStore(self.objects, create=False), require_verity=self.secure)
        done = 0
        store_fd = -1
        if objects_from is not None:
            try:
                store_fd = os.open(objects_from, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as e:
                raise RepositoryError(f"{objects_from}: {e.strerror}") from None
        try:
            for payload, users in external.items():
                path, node = users[0]
                recorded = node.digest
                if objects_from is None:
                    digest = recorded or _digest_of_name(payload)
                    if digest is None or not writer.contains(digest):
                        raise RepositoryError(
                            f"{source}: {_show(path)}: object {_show(payload)} is not in the "
                            "repository (import with --objects DIR to copy it from there)"
                        )
                    writer.reused += 1
                else:
                    digest, staged = _read_object(
                        Path(objects_from), store_fd, payload, writer, source, path, recorded
                    )
                    if staged is not None:
                        writer.adopt(digest, staged, node.size)
                    else:
                        writer.reused += 1
                name = object_name(digest).encode()
                for _path, user in users:
                    user.digest = digest
                    user.payload = name
                done += 1
                if progress is not None:
                    progress(done, len(external))
            writer.commit()
        except BaseException:
            writer.abort()
            raise
        finally:
            if store_fd >= 0:
                os.close(store_fd)
        return writer.added, writer.reused, writer.added_bytes

    def commit_tree(self, tree: Tree, ref: str | None = None) -> ImportResult:
        """Write the image of ``tree`` as an object, list it, and point ``ref`` at it.
        The caller holds the lock and has made every object the tree uses durable."""
        from composefs.erofs.writer import build_image

        files = sum(1 for _p, n in tree.walk() if n.mode & S_IFMT == S_IFREG)
        image = build_image(tree)
        image_id = self.put_object(image)
        self._symlink(f"../objects/{image_id[:2]}/{image_id[2:]}", self.images_dir / image_id)
        if ref is not None:
            self._set_ref(ref, image_id)
        return ImportResult(image_id, ref, files=files, image_size=len(image))

    def put_object(self, data: bytes) -> str:
        """Store ``data`` as an object, durably, and return its id (an image, a manifest, a
        record).  The caller holds the lock."""
        digest = fsverity.digest(data)
        final = self.object_path(digest)
        if final.is_file() and final.stat().st_size == len(data):
            return digest.hex()
        tmp = self.objects / f"{TEMP_PREFIX}object-{os.urandom(6).hex()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, OBJECT_MODE)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fchmod(fd, OBJECT_MODE)
                os.fsync(fd)
            try:
                seal_object(tmp, digest, required=self.secure)
            except OSError as e:
                raise RepositoryError(f"storing object {digest.hex()}: {e.strerror}") from None
            final.parent.mkdir(mode=_DIR_MODE, exist_ok=True)
            os.rename(tmp, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        fsync_dir(final.parent)
        fsync_dir(self.objects)
        return digest.hex()

    def read_object(self, object_id: str, limit: int = 64 << 20) -> bytes:
        """The bytes of a (small) object, checked against its id."""
        try:
            with open(self.object_path(object_id), "rb") as f:
                data = f.read(limit + 1)
        except FileNotFoundError:
            raise RepositoryError(f"object {object_id} is missing (run fsck)") from None
        if len(data) > limit or fsverity.digest(data).hex() != object_id:
            raise RepositoryError(f"object {object_id} is damaged (run fsck)")
        return data

    # -- pinned records: OCI images ------------------------------------------------------------
    #
    # oci/refs/<quoted name> -> ../../objects/XX/<62 hex>, a JSON record: gc keeps its
    # "image" (with everything the image uses), every object listed in its "objects", and
    # those named in the objects of its "object_lists" (concatenated binary digests).
    # oci/layers/<digest> -> ../../objects/XX/<62 hex>: layer records by diff_id, a cache
    # that pulls reuse; not a gc root (links left dangling by gc are dropped).

    def oci_refs(self) -> dict[str, str]:
        """OCI ref name -> record id, for every well-formed link."""
        out: dict[str, str] = {}
        for quoted in _listdir(self.path / OCI_REFS):
            record = self._object_link(self.path / OCI_REFS / quoted, 2)
            if record is not None and not quoted.startswith(TEMP_PREFIX):
                out[unquote(quoted)] = record
        return out

    def oci_record(self, name: str) -> tuple[str, dict[str, Any]]:
        """(record id, record) of an OCI ref."""
        link = self.path / OCI_REFS / quote_ref(name)
        record_id = self._object_link(link, 2)
        if record_id is None:
            raise RepositoryError(f"no OCI image named '{name}' in {self.path}")
        try:
            record = json.loads(self.read_object(record_id))
        except ValueError:
            raise RepositoryError(f"OCI image '{name}': its record is not JSON") from None
        if not isinstance(record, dict):
            raise RepositoryError(f"OCI image '{name}': its record is not a JSON object")
        return record_id, record

    def set_oci_ref(self, name: str, record_id: str) -> None:
        """Point an OCI ref at a record (stored with :meth:`put_object`); lock held."""
        directory = self.path / OCI_REFS
        directory.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
        self._symlink(f"../../objects/{record_id[:2]}/{record_id[2:]}", directory / quote_ref(name))

    def remove_oci_ref(self, name: str) -> None:
        self._writable()
        with self.lock():
            link = self.path / OCI_REFS / quote_ref(name)
            if not link.is_symlink():
                raise RepositoryError(f"no OCI image named '{name}' in {self.path}")
            link.unlink()
            fsync_dir(link.parent)

    def layer_record(self, key: str) -> str | None:
        """The id of the layer record cached under ``key`` (a diff_id), if any."""
        return self._object_link(self.path / OCI_LAYERS / key, 2)

    def set_layer_record(self, key: str, record_id: str) -> None:
        directory = self.path / OCI_LAYERS
        directory.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
        self._symlink(f"../../objects/{record_id[:2]}/{record_id[2:]}", directory / key)

    def _object_link(self, link: Path, depth: int) -> str | None:
        """The object id a link of the form this repository writes names, else None."""
        try:
            target = os.readlink(link)
        except OSError:
            return None
        prefix = "../" * depth + "objects/"
        rest = target.removeprefix(prefix)
        if rest == target or len(rest) != 65 or rest[2] != "/":
            return None
        object_id = rest[:2] + rest[3:]
        return object_id if is_image_id(object_id) else None

    def _pinned(self) -> tuple[set[str], set[str]]:
        """(images, objects) the OCI refs keep alive."""
        images: set[str] = set()
        objects: set[str] = set()
        for name in self.oci_refs():
            record_id, record = self.oci_record(name)
            objects.add(record_id)
            image = record.get("image")
            if isinstance(image, str) and is_image_id(image):
                images.add(image)
            for o in record.get("objects", []):
                if isinstance(o, str) and is_image_id(o):
                    objects.add(o)
            for o in record.get("object_lists", []):  # objects naming 32-byte digests
                if isinstance(o, str) and is_image_id(o):
                    objects.add(o)
                    data = self.read_object(o)
                    objects.update(data[i : i + 32].hex() for i in range(0, len(data), 32))
        return images, objects

    # -- mounting ------------------------------------------------------------------------------

    def mount(
        self,
        name: str,
        mountpoint: str | os.PathLike[str],
        *,
        fuse: bool = False,
        foreground: bool = False,
    ) -> str:
        """Mount an image of this repository (kernel, or FUSE); returns its id.

        The image is always checked against its id before it is mounted, so a ref can
        never mount bytes other than those the repository wrote.  A FUSE server is started
        after the lock is released: it runs for as long as the mount lives (a daemon forked
        from this process would otherwise hold the lock, and gc wait, until unmounted).
        """
        if fuse:
            with self.lock():
                image_id, path = self.image_file(name)
                data = path.read_bytes()  # the server's private copy: checked, then immutable
            if fsverity.digest(data).hex() != image_id:
                raise RepositoryError(f"image {image_id}: content does not match its id (run fsck)")
            # served without the lock: the server may run for months, and gc must not wait
            self._serve_fuse(image_id, data, mountpoint, foreground)
            return image_id
        from composefs.mount import MountOptions
        from composefs.mount import mount as kernel_mount

        with self.lock():
            image_id, path = self.image_file(name)
            options = MountOptions(
                basedirs=(os.fspath(self.objects),), digest=image_id, verity=self.secure
            )
            kernel_mount(path, mountpoint, options)
        return image_id

    def _serve_fuse(
        self, image_id: str, data: bytes, mountpoint: str | os.PathLike[str], foreground: bool
    ) -> None:
        from composefs.erofs.reader import Image
        from composefs.fuse import serve

        serve(
            Image(data, name=image_id),
            mountpoint,
            [os.fspath(self.objects)],
            daemonize=not foreground,
        )

    # -- garbage collection --------------------------------------------------------------------

    def gc(self, *, dry_run: bool = False) -> GcResult:
        """Remove images no ref reaches, then objects no remaining image uses, and stale
        temporary files.  Image links go before objects, so a crash halfway leaves no link
        to a removed object."""
        if not dry_run:
            self._writable()
        result = GcResult(dry_run)
        with self.lock(
            exclusive=not dry_run, wait_message="cfsctl: waiting for other users to finish"
        ):
            self._refuse_broken_refs()
            pinned_images, live = self._pinned()
            live_images = set(self.refs().values()) | pinned_images
            for image_id in live_images:
                live.add(image_id)
                try:
                    live.update(self.image_objects(image_id))
                except (OSError, FormatError) as e:
                    raise RepositoryError(
                        f"image {image_id} cannot be read ({_reason(e)}): run fsck before gc"
                    ) from None
            for image_id in self._image_ids():
                if image_id not in live_images:
                    result.images_removed.append(image_id)
                    if not dry_run:
                        (self.images_dir / image_id).unlink()
            if result.images_removed and not dry_run:
                fsync_dir(self.images_dir)
            for rel, st in self._object_files():
                key = rel.replace("/", "")
                if rel in live or key in live:
                    continue
                result.objects_removed += 1
                result.bytes_removed += st.st_size
                if not dry_run:
                    os.unlink(self.objects / rel)
            for key in _listdir(self.path / OCI_LAYERS):
                record = self._object_link(self.path / OCI_LAYERS / key, 2)
                if (record is None or record not in live) and not dry_run:
                    os.unlink(self.path / OCI_LAYERS / key)  # its record is going: uncache
            for name in self._temporary_files():
                result.temporary_files_removed += 1
                if not dry_run:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.objects / name)
            if not dry_run:
                fsync_dir(self.objects)
        return result

    def _refuse_broken_refs(self) -> None:
        """gc must not take a ref it cannot read for one that is gone: whatever that ref
        meant to keep would be deleted.  It stops instead, naming the ref."""
        for ref in self._ref_names():
            try:
                self.resolve("refs/" + ref)
            except RepositoryError as e:
                raise RepositoryError(
                    f"ref '{ref}' is broken ({e}); remove it (ref rm) or repair it before gc"
                ) from None
        for quoted in _listdir(self.path / OCI_REFS):
            if quoted.startswith(TEMP_PREFIX):
                continue
            if self._object_link(self.path / OCI_REFS / quoted, 2) is None:
                raise RepositoryError(
                    f"OCI ref '{unquote(quoted)}' is broken (not a link to an object); "
                    "remove it (oci rm) before gc"
                )
            # a record that cannot be read stops gc in _pinned, which reads every one

    def _object_files(self) -> Iterator[tuple[str, os.stat_result]]:
        """Every well-named object file: (``XX/<62 hex>``, lstat)."""
        for d in _listdir(self.objects):
            if not _OBJECT_DIR.fullmatch(d):
                continue
            with os.scandir(self.objects / d) as it:
                for entry in it:
                    if _OBJECT_FILE.fullmatch(entry.name):
                        yield f"{d}/{entry.name}", entry.stat(follow_symlinks=False)

    def _temporary_files(self) -> list[str]:
        return temporary_files(self.objects) if self.objects.is_dir() else []

    # -- checking ------------------------------------------------------------------------------

    def fsck(self, *, repair: bool = False, progress: Progress | None = None) -> FsckResult:
        """Check every object against its name, every image and the objects it needs,
        every link and ref.  With ``repair``, damaged objects are moved to
        ``quarantine/`` and links to missing images removed (refs are left for the user)."""
        if repair:
            self._writable()
        result = FsckResult(self.secure)
        with self.lock(exclusive=repair, wait_message="cfsctl: waiting for other users"):
            damaged = self._fsck_objects(result, progress)
            if repair:
                for rel in damaged:
                    self._quarantine(rel, result)
            self._fsck_images(result, repair)
            self._fsck_refs(result)
            self._fsck_oci(result)
            result.temporary_files = len(self._temporary_files())
        return result

    def _fsck_objects(self, result: FsckResult, progress: Progress | None) -> list[str]:
        names: list[str] = []
        for d in _listdir(self.objects) if self.objects.is_dir() else []:
            full = self.objects / d
            if d.startswith(TEMP_PREFIX):
                continue
            if not _OBJECT_DIR.fullmatch(d) or not full.is_dir() or full.is_symlink():
                result.problems.append(Problem("stray-file", f"objects/{d}", "not an object"))
                continue
            for n in sorted(os.listdir(full)):
                rel = f"{d}/{n}"
                if n.startswith(TEMP_PREFIX):
                    continue  # staged by a writer: counted as a temporary file
                if not _OBJECT_FILE.fullmatch(n):
                    result.problems.append(Problem("stray-file", f"objects/{rel}", "not an object"))
                else:
                    names.append(rel)
        damaged = []
        for rel, outcome in check_objects(self.objects, names, progress=progress):
            result.objects_checked += 1
            expected = rel.replace("/", "")
            if isinstance(outcome, str):
                problem = Problem("object-unreadable", f"objects/{rel}", outcome)
            else:
                digest, kernel = outcome
                if digest.hex() == expected and (kernel or not self.secure):
                    continue
                if digest.hex() != expected:
                    problem = Problem(
                        "object-damaged", f"objects/{rel}", f"content has digest {digest.hex()}"
                    )
                else:
                    problem = Problem("object-unverified", f"objects/{rel}", "fs-verity missing")
            result.problems.append(problem)
            damaged.append(rel)
        return damaged

    def _quarantine(self, rel: str, result: FsckResult) -> None:
        qdir = self.path / QUARANTINE
        qdir.mkdir(mode=0o700, exist_ok=True)
        target = qdir / rel.replace("/", "")
        n = 0
        while target.exists():
            n += 1
            target = qdir / f"{rel.replace('/', '')}.{n}"
        os.rename(self.objects / rel, target)
        fsync_dir(qdir)
        fsync_dir(self.objects / rel.split("/")[0])
        result.repaired.append(f"moved objects/{rel} to {target.relative_to(self.path)}")

    def _fsck_images(self, result: FsckResult, repair: bool) -> None:
        try:
            names = sorted(os.listdir(self.images_dir))
        except FileNotFoundError:
            result.problems.append(Problem("layout", "images", "missing"))
            return
        for n in names:
            if n == "refs":
                continue
            rel = f"images/{n}"
            if not is_image_id(n):
                result.problems.append(Problem("stray-file", rel, "not an image link"))
                continue
            result.images_checked += 1
            try:
                self._image_link(n)
            except RepositoryError as e:
                result.problems.append(Problem("image-link", rel, str(e)))
                continue
            path = self.object_path(n)
            if not path.is_file():
                result.problems.append(Problem("image-missing", rel, "its object is missing"))
                if repair:
                    (self.images_dir / n).unlink()
                    fsync_dir(self.images_dir)
                    result.repaired.append(f"removed {rel} (its object is gone)")
                continue
            try:
                _files, _bytes, _external, objects = _image_usage(path)
            except (OSError, FormatError) as e:
                result.problems.append(Problem("image-unreadable", rel, _reason(e)))
                continue
            missing = [o for o in objects if not (self.objects / o).is_file()]
            if missing:
                result.problems.append(
                    Problem(
                        "objects-missing",
                        rel,
                        f"{len(missing)} of {len(objects)} objects missing, e.g. {missing[0]}",
                    )
                )

    def _fsck_refs(self, result: FsckResult) -> None:
        for ref in self._ref_names():
            result.refs_checked += 1
            try:
                image_id = self.resolve("refs/" + ref)
            except RepositoryError as e:
                result.problems.append(Problem("ref-broken", f"images/refs/{ref}", str(e)))
                continue
            if not self.object_path(image_id).is_file():
                result.problems.append(
                    Problem("ref-broken", f"images/refs/{ref}", f"image {image_id} is missing")
                )

    def _fsck_oci(self, result: FsckResult) -> None:
        for quoted in _listdir(self.path / OCI_REFS):
            rel = f"{OCI_REFS}/{quoted}"
            result.refs_checked += 1
            if self._object_link(self.path / rel, 2) is None:
                result.problems.append(Problem("ref-broken", rel, "not a link to an object"))
                continue
            try:
                _id, record = self.oci_record(unquote(quoted))
            except RepositoryError as e:
                result.problems.append(Problem("ref-broken", rel, str(e)))
                continue
            image = record.get("image")
            if not isinstance(image, str) or not self.object_path(image).is_file():
                result.problems.append(Problem("ref-broken", rel, f"image {image} is missing"))
            missing = [
                o
                for o in record.get("objects", [])
                if not (isinstance(o, str) and self.object_path(o).is_file())
            ]
            if missing:
                result.problems.append(
                    Problem("objects-missing", rel, f"{len(missing)} objects missing")
                )

    # -- statistics ----------------------------------------------------------------------------

    def stats(self) -> RepositoryStats:
        """What every image uses, what it shares, and what sharing saves."""
        with self.lock():
            entries = self.images()
            usage: dict[str, tuple[int, int, int, dict[str, int]]] = {}
            for entry in entries:
                try:
                    usage[entry.id] = _image_usage(self.object_path(entry.id))
                except (OSError, FormatError) as e:
                    raise RepositoryError(
                        f"image {entry.id} cannot be read ({_reason(e)}): run fsck"
                    ) from None
            users: dict[str, int] = {}
            for _f, _b, _e, objects in usage.values():
                for o in objects:
                    users[o] = users.get(o, 0) + 1
            out = RepositoryStats([])
            referenced: dict[str, int] = {}
            external = 0  # content in objects, every copy counted; inline content is not
            for entry in entries:
                files, content, in_objects, objects = usage[entry.id]
                s = ImageStats(entry.id, entry.refs, files, content, len(objects))
                s.referenced_bytes = sum(objects.values())
                s.unique_bytes = sum(size for o, size in objects.items() if users[o] == 1)
                s.shared_bytes = s.referenced_bytes - s.unique_bytes
                out.images.append(s)
                out.content_bytes += content
                external += in_objects
                referenced.update(objects)
            out.referenced_bytes = sum(referenced.values())
            out.saved_bytes = external - out.referenced_bytes
            _pinned_images, pinned = self._pinned()
            in_use = (
                set(referenced)
                | {f"{i[:2]}/{i[2:]}" for i in usage}
                | {f"{i[:2]}/{i[2:]}" for i in pinned}
            )
            for rel, st in self._object_files():
                out.objects += 1
                out.stored_bytes += st.st_size
                if rel not in in_use:
                    out.unreferenced_objects += 1
                    out.unreferenced_bytes += st.st_size
        return out


# -- helpers ----------------------------------------------------------------------------------


@dataclass
class _Metadata:
    secure: bool
    read_only_features: list[str]


def _metadata_json() -> dict[str, Any]:
    return {
        "version": FORMAT_VERSION,
        "algorithm": ALGORITHM,
        "features": {"compatible": [], "read-only-compatible": [], "incompatible": []},
    }


def _read_metadata(path: Path) -> _Metadata:
    """Open and check ``meta.json``: one clear error for every way it can be unusable."""
    meta_path = path / METADATA
    if path.exists() and not path.is_dir():
        raise RepositoryError(f"{path}: not a directory")
    try:
        fd = os.open(meta_path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        if not path.exists():
            raise RepositoryError(f"{path}: no such repository (create it with 'init')") from None
        if not path.is_dir():
            raise RepositoryError(f"{path}: not a directory") from None
        hint = "an older composefs-rs repository? " if (path / "objects").is_dir() else ""
        raise RepositoryError(
            f"{path}: not a composefs repository (no {METADATA}; {hint}'init' makes one)"
        ) from None
    except OSError as e:
        raise RepositoryError(f"{meta_path}: {e.strerror}") from None
    try:
        raw = os.read(fd, 1 << 16)
        secure = fsverity.measure_verity(fd) is not None
    finally:
        os.close(fd)
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise RepositoryError(f"{meta_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise RepositoryError(f"{meta_path}: not a JSON object")
    version = meta.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise RepositoryError(f"{meta_path}: 'version' missing or not a number")
    if version > FORMAT_VERSION:
        raise RepositoryError(
            f"{meta_path}: repository format version {version} is newer than this tool "
            f"supports ({FORMAT_VERSION})"
        )
    if version < 1:
        raise RepositoryError(f"{meta_path}: invalid repository format version {version}")
    algorithm = meta.get("algorithm")
    if algorithm != ALGORITHM:
        raise RepositoryError(
            f"{meta_path}: the repository uses algorithm {algorithm!r}; "
            f"only {ALGORITHM} is supported"
        )
    features = meta.get("features", {})
    if not isinstance(features, dict) or not all(
        isinstance(v, list) and all(isinstance(f, str) for f in v) for v in features.values()
    ):
        raise RepositoryError(f"{meta_path}: 'features' is malformed")
    unknown = [f for f in features.get("incompatible", []) if f not in KNOWN_INCOMPAT]
    if unknown:
        raise RepositoryError(
            f"{meta_path}: the repository needs features this tool does not have: "
            + ", ".join(unknown)
        )
    ro = [f for f in features.get("read-only-compatible", []) if f not in KNOWN_RO_COMPAT]
    return _Metadata(secure, ro)


def _show(path: bytes) -> str:
    return path.decode("utf-8", "backslashreplace")


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError):
        return e.strerror or str(e)
    return str(e)


def _digest_of_name(payload: bytes) -> bytes | None:
    """The digest an object path names (``xx/<62 hex>``, optionally with a leading /)."""
    text = payload.lstrip(b"/").decode("ascii", "replace")
    if len(text) == 65 and text[2] == "/":
        h = text[:2] + text[3:]
        if _HEX64.fullmatch(h):
            return bytes.fromhex(h)
    return None


def _read_object(
    store: Path,
    store_fd: int,
    payload: bytes,
    writer: ObjectWriter,
    source: str,
    path: bytes,
    recorded: bytes | None,
) -> tuple[bytes, str | None]:
    """Digest of ``store/payload`` (checked against ``recorded``) and a staged copy of it
    unless the repository has it already."""
    from composefs.syscalls import open_beneath

    rel = payload.lstrip(b"/")
    try:
        # beneath the store, whatever the payload or symlinks in the store say
        fd = open_beneath(store_fd, rel, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.EXDEV, errno.ELOOP):
            raise RepositoryError(
                f"{source}: {_show(path)}: object path {_show(payload)} escapes {store} "
                "(or goes through a symlink)"
            ) from None
        raise RepositoryError(
            f"{source}: {_show(path)}: object {store}/{_show(rel)}: {e.strerror}"
        ) from None
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            raise RepositoryError(f"{store}/{_show(rel)}: not a regular file")
        digest = fsverity.measure_verity(fd, before.st_dev) or fsverity.digest_fd(fd)
        if recorded is not None and digest != recorded:
            raise RepositoryError(
                f"{source}: {_show(path)}: object {store}/{_show(rel)} has digest "
                f"{digest.hex()}, the image records {recorded.hex()}"
            )
        if writer.contains(digest):
            return digest, None
        staged = stage_copy(os.fspath(writer.store.path), fd, writer.token, digest)
        after = os.fstat(fd)
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            if staged is not None:
                os.unlink(staged)
            raise RepositoryError(f"{store}/{_show(rel)}: changed while it was read")
        return digest, staged
    finally:
        os.close(fd)


def _image_usage(path: Path) -> tuple[int, int, int, dict[str, int]]:
    """(regular files, their content bytes, the part of it in objects (every copy
    counted), objects used: ``XX/<62 hex>`` -> size)."""
    from composefs.erofs.reader import Image

    files = content = external = 0
    objects: dict[str, int] = {}
    with Image(path) as image:
        for ino, obj in image.regular_files():
            files += 1
            content += ino.size
            if obj is not None:
                objects[obj.decode("ascii", "replace")] = ino.size
                external += ino.size
    return files, content, external, objects
