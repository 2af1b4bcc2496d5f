"""The repository (composefs-rs layout) through its Python API: layout and names, imports
from a directory, a dump file and an image, refs, name resolution, gc, fsck, stats, and
kernel mounts.  The command line is tested in test_cfsctl.py."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from mounted import assert_same_tree, kernel_mount_skip_reason
from repohelpers import (
    blob,
    is_mounted,
    mkcomposefs,
    object_files,
    object_rel,
    read_back,
    snapshot,
    source_files,
    write_tree,
)
from test_scan import make_tree

from composefs import dumpfile, fsverity
from composefs.erofs.reader import load_tree
from composefs.erofs.writer import build_image
from composefs.objects import ObjectStore
from composefs.repository import (
    ImportResult,
    Repository,
    RepositoryError,
    default_path,
    system_path,
    user_path,
)
from composefs.scan import ScanOptions, scan_directory

KERNEL_SKIP = kernel_mount_skip_reason()
needs_kernel = pytest.mark.skipif(KERNEL_SKIP is not None, reason=KERNEL_SKIP or "")

META = {
    "version": 1,
    "algorithm": "fsverity-sha256-12",
    "features": {"compatible": [], "read-only-compatible": [], "incompatible": []},
}
HEX62 = re.compile(r"[0-9a-f]{62}")


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    r, created = Repository.init(tmp_path / "repo")
    assert created
    return r


def tree_a(root: Path) -> Path:
    return write_tree(
        root,
        {
            "shared": blob("shared", 3000),
            "only-a": blob("only-a", 2000),
            "dir/small": b"inline content\n",
            "empty": b"",
        },
    )


def tree_b(root: Path) -> Path:
    return write_tree(root, {"shared": blob("shared", 3000), "only-b": blob("only-b", 5000)})


def image_bytes(repo: Repository, image_id: str) -> bytes:
    return repo.object_path(image_id).read_bytes()


# -- layout ------------------------------------------------------------------------------------


def test_init_writes_the_layout(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "repo"
    repo, created = Repository.init(path)
    assert created
    assert json.loads((path / "meta.json").read_text()) == META
    assert sorted(p.name for p in path.iterdir()) == ["images", "meta.json", "objects"]
    assert list((path / "objects").iterdir()) == []
    assert [p.name for p in (path / "images").iterdir()] == ["refs"]
    assert list((path / "images" / "refs").iterdir()) == []
    assert repo.secure == fsverity.verity_supported(path)
    before = snapshot(path)
    again, created = Repository.init(path)  # twice is fine and changes nothing
    assert not created and again.path == path
    assert snapshot(path) == before
    insecure, _ = Repository.init(tmp_path / "insecure", insecure=True)
    assert not insecure.secure


def test_require_verity_where_there_is_none(tmp_path: Path) -> None:
    if fsverity.verity_supported(tmp_path):
        pytest.skip("this filesystem has fs-verity")
    with pytest.raises(RepositoryError, match="no fs-verity"):
        Repository.init(tmp_path / "repo", require_verity=True)
    assert not (tmp_path / "repo" / "meta.json").exists()


def test_default_paths(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert user_path() == tmp_path / ".var/lib/composefs"
    assert system_path() == Path("/sysroot/composefs")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert default_path() == system_path()
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert default_path() == tmp_path / ".var/lib/composefs"
    monkeypatch.delenv("HOME")
    with pytest.raises(RepositoryError, match=r"\$HOME"):
        user_path()


def test_import_layout_names_and_digests(repo: Repository, tmp_path: Path) -> None:
    src = tree_a(tmp_path / "a")
    result = repo.import_directory(src, ref="a/b")
    image_id = result.image_id
    objects = object_files(repo.path)
    # the two external files and the image; inline and empty files need no object
    assert sorted(objects) == sorted(
        [
            object_rel(blob("shared", 3000)),
            object_rel(blob("only-a", 2000)),
            object_rel(image_bytes(repo, image_id)),
        ]
    )
    for rel, path in objects.items():
        assert HEX62.fullmatch(rel[3:])
        assert fsverity.digest(path.read_bytes()).hex() == rel.replace("/", "")
    assert fsverity.digest(image_bytes(repo, image_id)).hex() == image_id
    assert (
        os.readlink(repo.path / "images" / image_id) == f"../objects/{image_id[:2]}/{image_id[2:]}"
    )
    assert os.readlink(repo.path / "images" / "refs" / "a" / "b") == f"../../{image_id}"
    assert result == ImportResult(
        image_id, "a/b", files=4, objects_added=2, objects_reused=0, bytes_added=5000,
        image_size=len(image_bytes(repo, image_id)),
    )  # fmt: skip
    repo.add_ref("top", image_id)
    repo.add_ref("x/y/z", "a/b")
    assert os.readlink(repo.path / "images" / "refs" / "top") == f"../{image_id}"
    assert os.readlink(repo.path / "images" / "refs" / "x/y/z") == f"../../../{image_id}"
    assert repo.refs() == {"a/b": image_id, "top": image_id, "x/y/z": image_id}
    assert read_back(repo.path, image_id) == source_files(src)
    # nothing temporary is left behind
    assert [p.name for p in (repo.path / "objects").iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(
    "options,flags",
    [
        (ScanOptions(), ()),
        (ScanOptions(hardlinks=True, use_epoch=True), ("--hardlinks", "--use-epoch")),
        (ScanOptions(skip_xattrs=True, skip_devices=True), ("--skip-xattrs", "--skip-devices")),
    ],
    ids=["default", "hardlinks-epoch", "skip"],
)
def test_import_is_byte_identical_to_mkcomposefs(
    repo: Repository, tmp_path: Path, options: ScanOptions, flags: tuple[str, ...]
) -> None:
    src = make_tree(tmp_path / "src")
    result = repo.import_directory(src, options=options)
    store, image = tmp_path / "store", tmp_path / "image.cfs"
    mkcomposefs(src, image, f"--digest-store={store}", *flags)
    assert image_bytes(repo, result.image_id) == image.read_bytes()
    # the same objects, under the same names
    theirs = {str(p.relative_to(store)) for p in store.rglob("*") if p.is_file()}
    ours = set(object_files(repo.path)) - {f"{result.image_id[:2]}/{result.image_id[2:]}"}
    assert ours == theirs


def test_import_dump_and_image_with_their_object_directory(
    repo: Repository, tmp_path: Path
) -> None:
    """A --digest-store made apart (scan into an ObjectStore), its dump and its image:
    each imports to the same image as the directory itself, copying objects in once."""
    src = tree_a(tmp_path / "a")
    store = ObjectStore(tmp_path / "store")
    tree = scan_directory(src, ScanOptions(), store)
    image = tmp_path / "a.cfs"
    image.write_bytes(build_image(tree))
    dump = tmp_path / "a.dump"
    dump.write_bytes(dumpfile.dumps(tree))

    first = repo.import_tree(dumpfile.load(dump), objects_from=store.path, source=str(dump))
    assert (first.objects_added, first.objects_reused, first.bytes_added) == (2, 0, 5000)
    assert image_bytes(repo, first.image_id) == image.read_bytes()
    assert read_back(repo.path, first.image_id) == source_files(src)

    other, _ = Repository.init(tmp_path / "other")
    second = other.import_tree(load_tree(image), objects_from=store.path, ref="from-image")
    assert second.image_id == first.image_id
    assert (second.objects_added, second.bytes_added) == (2, 5000)
    assert read_back(other.path, second.image_id) == source_files(src)

    # the objects are there now: a dump alone is enough, and nothing is copied
    third = repo.import_tree(dumpfile.load(dump), ref="again")
    assert third.image_id == first.image_id
    assert (third.objects_added, third.objects_reused, third.bytes_added) == (0, 2, 0)
    assert repo.import_directory(src).image_id == first.image_id


def test_import_rewrites_foreign_payloads(repo: Repository, tmp_path: Path) -> None:
    """A dump whose backing files have other names than digests: each is read, hashed and
    stored under its digest, and the image names it so."""
    data = blob("foreign", 1000)
    (tmp_path / "objs" / "sub").mkdir(parents=True)
    (tmp_path / "objs" / "sub" / "file.bin").write_bytes(data)
    dump = tmp_path / "x.dump"
    dump.write_text(
        "/ 4096 40755 2 0 0 0 0.0 - - -\n/file 1000 100644 1 0 0 0 0.0 sub/file.bin - -\n"
    )
    result = repo.import_tree(dumpfile.load(dump), objects_from=tmp_path / "objs")
    node = load_tree(repo.object_path(result.image_id)).lookup(b"/file")
    assert node is not None
    assert node.payload == object_rel(data).encode()
    assert node.digest == fsverity.digest(data)
    assert read_back(repo.path, result.image_id) == {"file": data}


def test_import_dump_without_its_objects_changes_nothing(repo: Repository, tmp_path: Path) -> None:
    src = tree_a(tmp_path / "a")
    store = ObjectStore(tmp_path / "store")
    dump = tmp_path / "a.dump"
    dump.write_bytes(dumpfile.dumps(scan_directory(src, ScanOptions(), store)))
    repo.import_directory(tree_b(tmp_path / "b"), ref="b")  # has "shared", not "only-a"
    before = snapshot(repo.path)
    with pytest.raises(RepositoryError, match=r"/only-a: object .* is not in the repository"):
        repo.import_tree(dumpfile.load(dump), ref="a", source=str(dump))
    assert snapshot(repo.path) == before


@pytest.mark.parametrize("bad", ["shared", "only-a"])
def test_recorded_digest_must_match_the_object(repo: Repository, tmp_path: Path, bad: str) -> None:
    """Whichever object disagrees (the first or the last one read), the import is refused
    naming the dump, the file and the object, and nothing stays behind."""
    src = tree_a(tmp_path / "a")
    store = ObjectStore(tmp_path / "store")
    dump = tmp_path / "a.dump"
    dump.write_bytes(dumpfile.dumps(scan_directory(src, ScanOptions(), store)))
    obj = store.path / object_rel((src / bad).read_bytes())
    obj.chmod(0o644)
    with open(obj, "r+b") as f:
        f.seek(100)
        f.write(b"tampered")
    before = snapshot(repo.path)
    with pytest.raises(RepositoryError) as e:
        repo.import_tree(dumpfile.load(dump), objects_from=store.path, source=str(dump))
    assert str(e.value).startswith(f"{dump}: /{bad}: object {obj} has digest ")
    assert "the image records" in str(e.value)
    assert snapshot(repo.path) == before


def test_object_path_escaping_the_directory_is_refused(repo: Repository, tmp_path: Path) -> None:
    (tmp_path / "secret").write_bytes(blob("secret", 100))
    (tmp_path / "objs").mkdir()
    dump = tmp_path / "x.dump"
    dump.write_text("/ 4096 40755 2 0 0 0 0.0 - - -\n/f 100 100644 1 0 0 0 0.0 ../secret - -\n")
    before = snapshot(repo.path)
    with pytest.raises(RepositoryError, match="escapes"):
        repo.import_tree(dumpfile.load(dump), objects_from=tmp_path / "objs")
    assert snapshot(repo.path) == before


def test_second_import_writes_only_new_objects(repo: Repository, tmp_path: Path) -> None:
    files = {f"d{i % 4}/f{i:02d}": blob(f"f{i}", 100 + 37 * i) for i in range(40)}
    first = repo.import_directory(write_tree(tmp_path / "one", files), ref="one")
    assert first.objects_added == 40
    kept = {rel: p.stat() for rel, p in object_files(repo.path).items()}
    files2 = dict(list(files.items())[:38])  # 95% shared
    files2["new/x"] = blob("new-x", 5000)
    files2["new/y"] = blob("new-y", 6000)
    files2["new/x-again"] = blob("new-x", 5000)  # a third new name, not a new content
    second = repo.import_directory(write_tree(tmp_path / "two", files2), ref="two")
    assert (second.objects_added, second.objects_reused, second.bytes_added) == (2, 39, 11000)
    now = object_files(repo.path)
    new = set(now) - set(kept)
    assert new == {
        object_rel(blob("new-x", 5000)), object_rel(blob("new-y", 6000)),
        f"{second.image_id[:2]}/{second.image_id[2:]}",
    }  # fmt: skip
    for rel, st in kept.items():
        after = now[rel].stat()
        assert (after.st_ino, after.st_mtime_ns, after.st_ctime_ns) == (
            st.st_ino, st.st_mtime_ns, st.st_ctime_ns,
        ), rel  # fmt: skip
    assert read_back(repo.path, second.image_id) == files2


# -- refs and names ----------------------------------------------------------------------------


def test_refs_add_remove(repo: Repository, tmp_path: Path) -> None:
    a = repo.import_directory(tree_a(tmp_path / "a")).image_id
    b = repo.import_directory(tree_b(tmp_path / "b")).image_id
    assert repo.refs() == {}
    assert repo.add_ref("refs/rel/1", a) == a  # "refs/" in front is allowed
    assert repo.add_ref("rel/2", "rel/1") == a  # a ref may name another ref's image
    assert repo.add_ref("latest", b) == b
    assert repo.refs() == {"latest": b, "rel/1": a, "rel/2": a}
    assert [(e.id, e.refs) for e in repo.images()] == sorted(
        [(a, ["rel/1", "rel/2"]), (b, ["latest"])]
    )
    assert {e.id: e.size for e in repo.images()} == {
        a: len(image_bytes(repo, a)), b: len(image_bytes(repo, b))
    }  # fmt: skip
    repo.add_ref("latest", a)  # replaced
    assert repo.resolve("latest") == a
    repo.remove_ref("rel/1")
    assert (repo.path / "images/refs/rel").is_dir()
    repo.remove_ref("refs/rel/2")
    assert not (repo.path / "images/refs/rel").exists()  # emptied directories go too
    assert repo.refs() == {"latest": a}
    with pytest.raises(RepositoryError, match="no ref named 'rel/2'"):
        repo.remove_ref("rel/2")


def test_ref_to_unknown_image(repo: Repository, tmp_path: Path) -> None:
    repo.import_directory(tree_a(tmp_path / "a"), ref="a")
    before = snapshot(repo.path)
    with pytest.raises(RepositoryError, match="is not in"):
        repo.add_ref("x", "0" * 64)
    with pytest.raises(RepositoryError, match="no image or ref named 'nosuch'"):
        repo.add_ref("x", "nosuch")
    for name in ["../x", "a/../../x", "", "a//b", ".tmp-x", "./x"]:
        with pytest.raises(RepositoryError, match="invalid ref name"):
            repo.add_ref(name, "a")
    assert snapshot(repo.path) == before


def test_only_images_the_repository_lists_resolve(repo: Repository, tmp_path: Path) -> None:
    src = tree_a(tmp_path / "a")
    image_id = repo.import_directory(src, ref="a").image_id
    data_id = object_rel(blob("only-a", 2000)).replace("/", "")
    refs = repo.path / "images" / "refs"
    assert repo.resolve(image_id) == image_id
    assert repo.resolve("a") == repo.resolve("refs/a") == image_id
    with pytest.raises(RepositoryError, match=f"image {data_id} is not in"):
        repo.resolve(data_id)  # an object, but not an image
    (refs / "outside").symlink_to(f"../../objects/{data_id[:2]}/{data_id[2:]}")
    with pytest.raises(RepositoryError, match="ref 'outside' points outside images/"):
        repo.resolve("outside")
    (refs / "absolute").symlink_to(repo.object_path(image_id))
    with pytest.raises(RepositoryError, match="ref 'absolute' points outside images/"):
        repo.resolve("absolute")
    (refs / "data").symlink_to(f"../{data_id}")
    with pytest.raises(RepositoryError, match=f"image {data_id} \\(from ref 'data'\\) is not in"):
        repo.resolve("data")
    (refs / "plain").write_text(image_id)
    with pytest.raises(RepositoryError, match="ref 'plain' is not a symlink"):
        repo.resolve("plain")
    with pytest.raises(RepositoryError, match="invalid ref name"):
        repo.resolve("../x")
    # images/<id> itself must name the object <id>
    (repo.path / "images" / data_id).symlink_to(f"../objects/{image_id[:2]}/{image_id[2:]}")
    with pytest.raises(RepositoryError, match="points elsewhere"):
        repo.resolve(data_id)
    assert repo.refs() == {"a": image_id}  # the broken ones are left out


# -- gc ----------------------------------------------------------------------------------------


def test_gc(repo: Repository, tmp_path: Path) -> None:
    src_a, src_b = tree_a(tmp_path / "a"), tree_b(tmp_path / "b")
    a = repo.import_directory(src_a, ref="keep/a").image_id
    b = repo.import_directory(src_b).image_id  # no ref: garbage
    stale = repo.path / "objects" / ".tmp-abcdef-stale"
    stale.write_bytes(b"left by a crash")
    staged = repo.path / "objects" / "ab" / ".tmp-abcdef-cdef"  # a known digest's: in XX/
    staged.parent.mkdir(exist_ok=True)
    staged.write_bytes(b"also left by a crash")
    orphan_data = blob("orphan", 700)  # an object no image uses, as after a crash
    orphan = repo.path / "objects" / object_rel(orphan_data)
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(orphan_data)
    b_size = len(image_bytes(repo, b))

    before = snapshot(repo.path)
    dry = repo.gc(dry_run=True)
    assert snapshot(repo.path) == before
    assert dry.dry_run
    assert dry.images_removed == [b]
    assert dry.objects_removed == 3  # only-b, the image b, the orphan; "shared" stays
    assert dry.bytes_removed == 5000 + b_size + 700
    assert dry.temporary_files_removed == 2

    done = repo.gc()
    assert not done.dry_run
    assert (done.images_removed, done.objects_removed, done.bytes_removed) == (
        dry.images_removed, dry.objects_removed, dry.bytes_removed,
    )  # fmt: skip
    assert done.temporary_files_removed == 2
    assert not stale.exists() and not staged.exists() and not orphan.exists()
    assert not (repo.path / "images" / b).is_symlink()
    assert not repo.object_path(b).exists()
    assert not (repo.path / "objects" / object_rel(blob("only-b", 5000))).exists()
    assert sorted(object_files(repo.path)) == sorted(
        [object_rel(blob("shared", 3000)), object_rel(blob("only-a", 2000)), f"{a[:2]}/{a[2:]}"]
    )
    assert read_back(repo.path, a) == source_files(src_a)
    assert repo.fsck().ok
    # nothing more to do
    again = repo.gc()
    assert again.images_removed == [] and again.objects_removed == 0
    assert again.temporary_files_removed == 0


def test_gc_follows_a_moved_ref(repo: Repository, tmp_path: Path) -> None:
    old = repo.import_directory(tree_a(tmp_path / "a"), ref="app")
    new = repo.import_directory(tree_b(tmp_path / "b"), ref="app").image_id
    result = repo.gc()
    assert result.images_removed == [old.image_id]
    assert result.objects_removed == 2  # only-a and the old image
    assert result.bytes_removed == 2000 + old.image_size
    assert [e.id for e in repo.images()] == [new]
    assert read_back(repo.path, new) == source_files(tmp_path / "b")


def test_gc_refuses_when_a_live_image_is_unreadable(repo: Repository, tmp_path: Path) -> None:
    a = repo.import_directory(tree_a(tmp_path / "a"), ref="a").image_id
    repo.import_directory(tree_b(tmp_path / "b"))
    repo.object_path(a).write_bytes(b"not an image")
    before = snapshot(repo.path)
    with pytest.raises(RepositoryError, match=f"image {a} cannot be read .*run fsck before gc"):
        repo.gc()
    assert snapshot(repo.path) == before


def test_gc_refuses_when_a_ref_is_broken(repo: Repository, tmp_path: Path) -> None:
    """A ref gc cannot read must stop it: else what the ref kept would be deleted."""
    a = repo.import_directory(tree_a(tmp_path / "a"), ref="a").image_id
    (repo.path / "images" / a).unlink()  # the listing goes; ref and objects remain
    before = snapshot(repo.path)
    with pytest.raises(RepositoryError, match=r"ref 'a' is broken .* before gc"):
        repo.gc()
    assert snapshot(repo.path) == before
    repo.remove_ref("a")
    assert repo.gc().objects_removed > 0


# -- fsck --------------------------------------------------------------------------------------


def test_fsck_clean(repo: Repository, tmp_path: Path) -> None:
    repo.import_directory(tree_a(tmp_path / "a"), ref="a")
    repo.import_directory(tree_b(tmp_path / "b"), ref="x/b")
    (repo.path / "objects" / ".tmp-123-x").write_bytes(b"")
    (repo.path / "objects" / "ab").mkdir(exist_ok=True)
    (repo.path / "objects" / "ab" / ".tmp-123-cdef").write_bytes(b"")
    r = repo.fsck()
    assert r.ok and r.problems == [] and r.repaired == []
    assert (r.objects_checked, r.images_checked, r.refs_checked) == (5, 2, 2)
    assert r.temporary_files == 2  # reported, not a problem
    assert r.to_json()["ok"] is True


def test_fsck_repair_and_reimport(repo: Repository, tmp_path: Path) -> None:
    src = tree_a(tmp_path / "a")
    image_id = repo.import_directory(src, ref="a").image_id
    rel = object_rel(blob("only-a", 2000))
    obj = repo.path / "objects" / rel
    obj.chmod(0o644)
    with open(obj, "r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01")
    damaged = fsverity.digest(obj.read_bytes()).hex()
    r = repo.fsck()
    assert not r.ok
    assert [(p.kind, p.path, p.detail) for p in r.problems] == [
        ("object-damaged", f"objects/{rel}", f"content has digest {damaged}")
    ]
    assert r.to_json()["ok"] is False
    assert obj.exists()  # only reported

    r = repo.fsck(repair=True)
    quarantined = repo.path / "quarantine" / rel.replace("/", "")
    assert r.repaired == [f"moved objects/{rel} to quarantine/{rel.replace('/', '')}"]
    assert not obj.exists() and quarantined.read_bytes()[1000:1002] == b"\x00\x01"
    assert [p.kind for p in r.problems] == ["object-damaged", "objects-missing"]

    r = repo.fsck()  # now the image lacks the object
    assert [(p.kind, p.path) for p in r.problems] == [("objects-missing", f"images/{image_id}")]
    assert f"1 of 2 objects missing, e.g. {rel}" == r.problems[0].detail

    again = repo.import_directory(src, ref="a")
    assert again.image_id == image_id and again.objects_added == 1
    assert repo.fsck().ok
    assert read_back(repo.path, image_id) == source_files(src)


def test_fsck_damaged_image_object(repo: Repository, tmp_path: Path) -> None:
    image_id = repo.import_directory(tree_a(tmp_path / "a"), ref="a").image_id
    path = repo.object_path(image_id)
    data = bytearray(path.read_bytes())
    data[data.find(b"inline content")] ^= 0x20
    path.write_bytes(bytes(data))
    r = repo.fsck(repair=True)
    rel = f"{image_id[:2]}/{image_id[2:]}"
    assert [(p.kind, p.path) for p in r.problems] == [
        ("object-damaged", f"objects/{rel}"),
        ("image-missing", f"images/{image_id}"),
        ("ref-broken", "images/refs/a"),
    ]
    assert r.repaired == [
        f"moved objects/{rel} to quarantine/{image_id}",
        f"removed images/{image_id} (its object is gone)",
    ]
    r = repo.fsck()
    assert [(p.kind, p.path) for p in r.problems] == [("ref-broken", "images/refs/a")]
    assert repo.import_directory(tmp_path / "a", ref="a").image_id == image_id
    assert repo.fsck().ok


def test_fsck_reports_missing_dangling_and_stray(repo: Repository, tmp_path: Path) -> None:
    a = repo.import_directory(tree_a(tmp_path / "a"), ref="a").image_id
    b = repo.import_directory(tree_b(tmp_path / "b"), ref="b").image_id
    (repo.path / "objects" / object_rel(blob("only-b", 5000))).unlink()
    (repo.path / "images" / a).unlink()  # ref "a" now dangles
    (repo.path / "images" / "refs" / "nowhere").symlink_to("../" + "e" * 64)
    (repo.path / "objects" / "zz").mkdir()
    (repo.path / "objects" / a[:2] / "not-an-object").write_bytes(b"")
    (repo.path / "images" / "README").write_text("hello")
    r = repo.fsck()
    found = sorted((p.kind, p.path) for p in r.problems)
    assert found == sorted(
        [
            ("objects-missing", f"images/{b}"),
            ("ref-broken", "images/refs/a"),
            ("ref-broken", "images/refs/nowhere"),
            ("stray-file", "objects/zz"),
            ("stray-file", f"objects/{a[:2]}/not-an-object"),
            ("stray-file", "images/README"),
        ]
    )
    details = {p.path: p.detail for p in r.problems}
    assert details["images/refs/a"] == f"image {a} (from ref 'a') is not in {repo.path}/images"
    assert details[f"images/{b}"].startswith("1 of 2 objects missing")
    assert not r.ok


# -- stats -------------------------------------------------------------------------------------


def test_stats_by_hand(repo: Repository, tmp_path: Path) -> None:
    """Tree A: x, y, z, a second copy of x, a small inline file; tree B: x, y, w."""
    x, y, z, w = (blob(t, n) for t, n in [("x", 1000), ("y", 2000), ("z", 3000), ("w", 4000)])
    a = repo.import_directory(
        write_tree(tmp_path / "a", {"x": x, "y": y, "z": z, "sub/x-copy": x, "s": b"0123456789"}),
        ref="a",
    )
    b = repo.import_directory(write_tree(tmp_path / "b", {"x": x, "y": y, "w": w}), ref="b")
    orphan = blob("orphan", 500)
    (repo.path / "objects" / object_rel(orphan)).parent.mkdir(exist_ok=True)
    (repo.path / "objects" / object_rel(orphan)).write_bytes(orphan)

    s = repo.stats()
    by_id = {i.id: i for i in s.images}
    ia, ib = by_id[a.image_id], by_id[b.image_id]
    assert (ia.refs, ia.files, ia.bytes, ia.objects) == (["a"], 5, 7010, 3)
    assert (ia.referenced_bytes, ia.unique_bytes, ia.shared_bytes) == (6000, 3000, 3000)
    assert (ib.refs, ib.files, ib.bytes, ib.objects) == (["b"], 3, 7000, 3)
    assert (ib.referenced_bytes, ib.unique_bytes, ib.shared_bytes) == (7000, 4000, 3000)
    assert s.objects == 4 + 2 + 1  # x y z w, two images, the orphan
    assert s.stored_bytes == 10000 + a.image_size + b.image_size + 500
    assert s.content_bytes == 14010
    assert s.referenced_bytes == 10000
    # stored once instead of three times: x (1000 + 1000), y (2000); inline bytes are
    # stored in each image, sharing saves nothing of them
    assert s.saved_bytes == 4000
    assert (s.unreferenced_objects, s.unreferenced_bytes) == (1, 500)


# -- metadata ----------------------------------------------------------------------------------


def _meta(**changes: object) -> str:
    meta: dict[str, object] = json.loads(json.dumps(META))
    meta.update(changes)
    return json.dumps(meta)


@pytest.mark.parametrize(
    "content,message",
    [
        (_meta(version=2), "repository format version 2 is newer than this tool supports (1)"),
        (_meta(version=0), "invalid repository format version 0"),
        (_meta(version="1"), "'version' missing or not a number"),
        ("{not json", "not valid JSON"),
        ("[1]", "not a JSON object"),
        (
            _meta(algorithm="fsverity-sha512-12"),
            "the repository uses algorithm 'fsverity-sha512-12'",
        ),
        (
            _meta(features={"incompatible": ["zstd-objects"]}),
            "needs features this tool does not have: zstd-objects",
        ),
        (_meta(features={"incompatible": "x"}), "'features' is malformed"),
    ],
    ids=["v2", "v0", "v-string", "not-json", "not-object", "sha512", "incompat", "malformed"],
)
def test_unusable_metadata(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "repo"
    Repository.init(path)
    (path / "meta.json").write_text(content)
    with pytest.raises(RepositoryError) as e:
        Repository(path)
    assert message in str(e.value) and str(path / "meta.json") in str(e.value)
    with pytest.raises(RepositoryError):
        Repository.init(path)  # init validates an existing repository, rewrites nothing
    assert (path / "meta.json").read_text() == content


def test_not_a_repository(tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match="no such repository"):
        Repository(tmp_path / "missing")
    (tmp_path / "objects").mkdir()
    with pytest.raises(RepositoryError, match=r"not a composefs repository .*older composefs-rs"):
        Repository(tmp_path)
    (tmp_path / "file").write_text("")
    with pytest.raises(RepositoryError, match=r"(?i)not a directory"):
        Repository(tmp_path / "file")


def test_unknown_read_only_feature_makes_it_read_only(repo: Repository, tmp_path: Path) -> None:
    image_id = repo.import_directory(tree_a(tmp_path / "a"), ref="a").image_id
    (repo.path / "meta.json").write_text(_meta(features={"read-only-compatible": ["future"]}))
    ro = Repository(repo.path)
    assert ro.read_only_features == ["future"]
    before = snapshot(repo.path)
    for action in (
        lambda: ro.import_directory(tmp_path / "a"),
        lambda: ro.add_ref("b", image_id),
        lambda: ro.remove_ref("a"),
        lambda: ro.gc(),
        lambda: ro.fsck(repair=True),
    ):
        with pytest.raises(RepositoryError, match=r"read-only: meta\.json lists features .*future"):
            action()
    assert ro.refs() == {"a": image_id} and ro.fsck().ok and not ro.gc(dry_run=True).images_removed
    assert ro.stats().images[0].id == image_id
    assert snapshot(repo.path) == before


# -- kernel mounts -----------------------------------------------------------------------------


@needs_kernel
def test_kernel_mount_by_ref_and_id(repo: Repository, tmp_path: Path) -> None:
    from composefs.mount import unmount

    src = make_tree(tmp_path / "src")
    image_id = repo.import_directory(src, ref="os/1").image_id
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for name in ("os/1", "refs/os/1", image_id):
        assert repo.mount(name, mnt) == image_id
        try:
            assert assert_same_tree(src, mnt) > 10
        finally:
            unmount(mnt)
        assert not is_mounted(mnt)


@needs_kernel
def test_kernel_mount_refuses_an_altered_image(repo: Repository, tmp_path: Path) -> None:
    from composefs.mount import MountError

    image_id = repo.import_directory(tree_a(tmp_path / "a"), ref="a").image_id
    path = repo.object_path(image_id)
    data = bytearray(path.read_bytes())
    data[data.find(b"inline content")] ^= 0x20  # still a valid image, another digest
    path.write_bytes(bytes(data))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for name in ("a", image_id):
        with pytest.raises(MountError, match="wrong fs-verity"):
            repo.mount(name, mnt)
        assert not is_mounted(mnt)


def test_mount_refuses_names_not_under_images(repo: Repository, tmp_path: Path) -> None:
    """Refused before anything is mounted, so no kernel (nor root) is needed."""
    repo.import_directory(tree_a(tmp_path / "a"), ref="a")
    data_id = object_rel(blob("only-a", 2000)).replace("/", "")
    (repo.path / "images" / "refs" / "evil").symlink_to(
        f"../../objects/{data_id[:2]}/{data_id[2:]}"
    )
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for name, message in [
        (data_id, "is not in"),
        ("evil", "points outside images/"),
        ("../x", "invalid ref name"),
        ("nosuch", "no image or ref named 'nosuch'"),
    ]:
        with pytest.raises(RepositoryError, match=message):
            repo.mount(name, mnt)
        with pytest.raises(RepositoryError, match=message):
            repo.mount(name, mnt, fuse=True)
        assert not is_mounted(mnt)


def test_copy_of_a_repository_is_a_repository(repo: Repository, tmp_path: Path) -> None:
    """Everything is relative: a copied repository resolves and checks the same."""
    src = tree_a(tmp_path / "a")
    image_id = repo.import_directory(src, ref="x/a").image_id
    copy = tmp_path / "copy"
    shutil.copytree(repo.path, copy, symlinks=True)
    other = Repository(copy)
    assert other.resolve("x/a") == image_id
    assert other.fsck().ok
    assert read_back(copy, image_id) == source_files(src)


def test_imports_commit_in_batches(
    repo: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Objects become durable and visible batch by batch: an interrupted import keeps what
    it wrote, and a retry finds it."""
    from composefs import objects

    monkeypatch.setattr(objects, "BATCH_OBJECTS", 3)
    files = {f"f{i:02d}": blob(f"batch{i}", 1000 + i) for i in range(10)}
    files["dup"] = blob("batch3", 1003)  # the same content twice: one object
    result = repo.import_directory(write_tree(tmp_path / "t", files), ref="t")
    assert (result.objects_added, result.objects_reused) == (10, 1)
    assert len(object_files(repo.path)) == 11  # ten objects and the image
    assert not list((repo.path / "objects").glob(".tmp-*"))
    assert repo.fsck().ok
