"""cfsctl, the repository's command line, run as a process: what it prints (text and
--json), its exit status, one-line errors, and that a failed command changes nothing.

Mounts need root (kernel) or /dev/fuse (FUSE); each skips with the reason.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from mounted import assert_same_tree, kernel_mount_skip_reason
from repohelpers import (
    BIN,
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

from composefs import fsverity
from composefs.cli import cfsctl
from composefs.progress import human_size

CFSCTL = str(BIN / "cfsctl")
IS_ROOT = os.geteuid() == 0
KERNEL_SKIP = kernel_mount_skip_reason()
needs_kernel = pytest.mark.skipif(KERNEL_SKIP is not None, reason=KERNEL_SKIP or "")


def _fuse_skip_reason() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if not IS_ROOT and shutil.which("fusermount3") is None:
        return "no fusermount3 (Debian package fuse3) for an unprivileged mount"
    return None


FUSE_SKIP = _fuse_skip_reason()
needs_fuse = pytest.mark.skipif(FUSE_SKIP is not None, reason=FUSE_SKIP or "")

META = {
    "version": 1,
    "algorithm": "fsverity-sha256-12",
    "features": {"compatible": [], "read-only-compatible": [], "incompatible": []},
}


# Commands run in this process (main() with stdout and stderr captured), which is several
# times faster than a process each; mounts (a FUSE server forks), commands that need
# another environment, and every command when CFSCTL_TEST_PROCESSES is set, run
# .venv/bin/cfsctl as a process.
ALL_PROCESSES = bool(os.environ.get("CFSCTL_TEST_PROCESSES"))


def run(
    *args: str, env: dict[str, str] | None = None, process: bool = False
) -> subprocess.CompletedProcess[str]:
    if process or env is not None or ALL_PROCESSES or "mount" in args:
        return subprocess.run([CFSCTL, *args], capture_output=True, text=True, env=env, timeout=120)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = cfsctl.main(list(args))
        except SystemExit as e:  # argparse
            status = e.code if isinstance(e.code, int) else 1
        finally:
            gc.enable()  # import turns it off for the rest of a process's short life
    return subprocess.CompletedProcess([CFSCTL, *args], status, out.getvalue(), err.getvalue())


def ok(*args: str, env: dict[str, str] | None = None) -> str:
    r = run(*args, env=env)
    assert r.returncode == 0, (args, r.stderr)
    return r.stdout


def fails(*args: str, status: int = 1, env: dict[str, str] | None = None) -> str:
    """Run a command that must fail: one line on stderr, nothing on stdout; the line."""
    r = run(*args, env=env)
    assert r.returncode == status, (args, r.returncode, r.stdout, r.stderr)
    assert r.stdout == "", (args, r.stdout)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cfsctl: "), (args, r.stderr)
    return lines[0]


def ok_json(*args: str) -> object:
    return json.loads(ok(*args, "--json"))


class Repo:
    """A repository made with ``cfsctl init``; ``cfs(...)`` runs cfsctl --repo on it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        ok("--repo", str(path), "init")

    def args(self, *args: str) -> list[str]:
        return ["--repo", str(self.path), *args]

    def ok(self, *args: str) -> str:
        return ok(*self.args(*args))

    def json(self, *args: str) -> object:
        return ok_json(*self.args(*args))

    def fails(self, *args: str, status: int = 1) -> str:
        return fails(*self.args(*args), status=status)

    def import_(self, src: Path, *args: str) -> dict[str, object]:
        result = self.json("import", str(src), *args)
        assert isinstance(result, dict)
        return result

    def image_path(self, image_id: str) -> Path:
        return self.path / "objects" / image_id[:2] / image_id[2:]


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    return Repo(tmp_path / "repo")


def tree_a(root: Path) -> Path:
    return write_tree(
        root,
        {
            "shared": blob("shared", 3000),
            "only-a": blob("only-a", 2000),
            "dir/small": b"inline content\n",
        },
    )


def tree_b(root: Path) -> Path:
    return write_tree(root, {"shared": blob("shared", 3000), "only-b": blob("only-b", 5000)})


def alter_image(path: Path) -> None:
    """Change one byte of inline content: still a valid image, with another digest."""
    data = bytearray(path.read_bytes())
    at = data.find(b"inline content")
    assert at > 0
    data[at] ^= 0x20
    path.write_bytes(bytes(data))


# -- init and where the repository is ------------------------------------------------------------


def test_init(tmp_path: Path) -> None:
    path = tmp_path / "repo"
    out = ok("--repo", str(path), "init")
    lines = out.splitlines()
    assert lines[:2] == [
        f"Initialized composefs repository at {path}",
        "  algorithm: fsverity-sha256-12",
    ]
    verity = fsverity.verity_supported(path)
    assert lines[2] == (
        "  verity:    required" if verity
        else "  verity:    not available on this filesystem (insecure)"
    )  # fmt: skip
    assert json.loads((path / "meta.json").read_text()) == META
    assert sorted(str(p.relative_to(path)) for p in path.rglob("*")) == [
        "images", "images/refs", "meta.json", "objects",
    ]  # fmt: skip
    before = snapshot(path)
    assert ok("--repo", str(path), "init") == f"Repository already initialized at {path}\n"
    assert ok("init", str(path)) == f"Repository already initialized at {path}\n"
    assert snapshot(path) == before
    out = ok("init", "--insecure", str(tmp_path / "insecure"))
    assert "  verity:    not required (insecure)" in out.splitlines()
    assert json.loads((tmp_path / "insecure" / "meta.json").read_text()) == META


def test_init_refuses_other_algorithms(tmp_path: Path) -> None:
    line = fails("init", "--algorithm", "fsverity-sha512-12", str(tmp_path / "repo"))
    assert line == "cfsctl: unsupported algorithm 'fsverity-sha512-12' (only fsverity-sha256-12)"
    assert not (tmp_path / "repo").exists()


def test_user_repository(tmp_path: Path) -> None:
    env = {**os.environ, "HOME": str(tmp_path / "home")}
    where = tmp_path / "home" / ".var/lib/composefs"
    out = ok("--user", "init", env=env)
    assert out.startswith(f"Initialized composefs repository at {where}\n")
    assert json.loads((where / "meta.json").read_text()) == META
    src = tree_a(tmp_path / "a")
    image_id = ok("--user", "import", str(src), "--ref", "mine", env=env).strip()
    assert os.readlink(where / "images/refs/mine") == f"../{image_id}"
    listed = json.loads(ok("--user", "images", "--json", env=env))
    assert [(e["id"], e["refs"]) for e in listed] == [(image_id, ["mine"])]
    # --repo, --user and --system exclude each other
    r = run("--user", "--repo", str(where), "images", env=env)
    assert r.returncode == 1 and "not allowed with argument" in r.stderr


@pytest.mark.skipif(os.path.exists("/sysroot/composefs"), reason="a system repository exists")
def test_system_repository_is_the_default_for_root(tmp_path: Path) -> None:
    assert fails("--system", "images") == (
        "cfsctl: /sysroot/composefs: no such repository (create it with 'init')"
    )
    env = {**os.environ, "HOME": str(tmp_path)}
    line = fails("images", env=env)
    if IS_ROOT:
        assert line == "cfsctl: /sysroot/composefs: no such repository (create it with 'init')"
    else:
        assert line.startswith(f"cfsctl: {tmp_path}/.var/lib/composefs: no such repository")
    assert not os.path.exists("/sysroot/composefs")


def test_usage_errors(repo: Repo) -> None:
    for args, message in [
        ([], "no command given"),
        (["ref"], "ref: say add, rm or ls"),
        (["import", "x", "--objects", "y"], "--objects goes with --dump or --image"),
        (["mount", "-f", "x", "y"], "--foreground goes with --fuse"),
    ]:
        r = run(*repo.args(*args))
        assert r.returncode == 1 and message in r.stderr, (args, r.stderr)
    assert ok("--version").startswith("cfsctl (composefs-py) ")


# -- import ------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags", [(), ("--use-epoch", "--hardlinks")], ids=["default", "epoch"])
def test_import_directory(repo: Repo, tmp_path: Path, flags: tuple[str, ...]) -> None:
    src = make_tree(tmp_path / "src")
    out = repo.ok("import", str(src), "--ref", "os/v1", *flags)
    image_id = out.strip()
    assert out == image_id + "\n" and len(image_id) == 64
    image = repo.image_path(image_id)
    assert fsverity.digest(image.read_bytes()).hex() == image_id
    # the image mkcomposefs writes with the same options, byte for byte
    mkcomposefs(src, tmp_path / "image.cfs", *flags)
    assert image.read_bytes() == (tmp_path / "image.cfs").read_bytes()
    for rel, path in object_files(repo.path).items():
        assert len(rel) == 65 and rel[2] == "/"
        assert fsverity.digest(path.read_bytes()).hex() == rel.replace("/", "")
    assert (
        os.readlink(repo.path / "images" / image_id) == f"../objects/{image_id[:2]}/{image_id[2:]}"
    )
    assert os.readlink(repo.path / "images/refs/os/v1") == f"../../{image_id}"
    assert read_back(repo.path, image_id) == source_files(src)


def test_import_json(repo: Repo, tmp_path: Path) -> None:
    result = repo.import_(tree_a(tmp_path / "a"), "--ref", "a")
    image_id = result["image_id"]
    assert isinstance(image_id, str)
    assert result == {
        "image_id": image_id, "ref": "a", "files": 3, "objects_added": 2,
        "objects_reused": 0, "bytes_added": 5000,
        "image_size": repo.image_path(image_id).stat().st_size,
    }  # fmt: skip
    again = repo.import_(tmp_path / "a")
    assert (again["image_id"], again["ref"]) == (image_id, None)
    assert (again["objects_added"], again["objects_reused"], again["bytes_added"]) == (0, 2, 0)


@pytest.fixture
def digest_store(tmp_path: Path) -> tuple[Path, Path, Path, Path, str]:
    """(source, store, image, dump, id): mkcomposefs --digest-store and composefs-info dump."""
    src = tree_a(tmp_path / "a")
    store, image, dump = tmp_path / "store", tmp_path / "a.cfs", tmp_path / "a.dump"
    mkcomposefs(src, image, f"--digest-store={store}")
    r = subprocess.run(
        [str(BIN / "composefs-info"), "dump", str(image)], capture_output=True, check=True
    )
    dump.write_bytes(r.stdout)
    image_id = fsverity.digest(image.read_bytes()).hex()
    return src, store, image, dump, image_id


def test_import_dump_with_objects(
    repo: Repo, digest_store: tuple[Path, Path, Path, Path, str]
) -> None:
    src, store, _image, dump, image_id = digest_store
    result = repo.import_(dump, "--dump", "--objects", str(store), "--ref", "d")
    assert result["image_id"] == image_id
    counts = (result["objects_added"], result["objects_reused"], result["bytes_added"])
    assert counts == (2, 0, 5000)
    assert read_back(repo.path, image_id) == source_files(src)
    # the objects are in the repository now: the dump alone is enough
    result = repo.import_(dump, "--dump", "--ref", "d2")
    assert result["image_id"] == image_id
    assert (result["objects_added"], result["objects_reused"]) == (0, 2)
    assert repo.json("ref", "ls") == {"d": image_id, "d2": image_id}
    assert repo.ok("fsck").endswith(": ok\n")


def test_import_dump_without_objects_fails_cleanly(
    repo: Repo, digest_store: tuple[Path, Path, Path, Path, str], tmp_path: Path
) -> None:
    _src, _store, _image, dump, _id = digest_store
    repo.import_(tree_b(tmp_path / "b"), "--ref", "b")  # has "shared" only
    before = snapshot(repo.path)
    line = repo.fails("import", "--dump", str(dump), "--ref", "d")
    missing = object_rel(blob("only-a", 2000))
    assert line == (
        f"cfsctl: {dump}: /only-a: object {missing} is not in the repository "
        "(import with --objects DIR to copy it from there)"
    )
    assert snapshot(repo.path) == before


def test_import_image_with_objects(
    repo: Repo, digest_store: tuple[Path, Path, Path, Path, str]
) -> None:
    src, store, image, _dump, image_id = digest_store
    out = repo.ok("import", "--image", str(image), "--objects", str(store), "--ref", "i")
    assert out == image_id + "\n"
    assert repo.image_path(image_id).read_bytes() == image.read_bytes()
    assert read_back(repo.path, image_id) == source_files(src)
    assert repo.ok("import", str(src)) == out  # the directory gives the same image


def test_dump_recording_another_digest_is_refused(
    repo: Repo, digest_store: tuple[Path, Path, Path, Path, str], tmp_path: Path
) -> None:
    _src, store, _image, dump, _id = digest_store
    right = fsverity.digest(blob("only-a", 2000)).hex()
    wrong = fsverity.digest(blob("something else", 2000)).hex()
    text = dump.read_text()
    assert text.count(f" {right}\n") == 1  # the digest field (the payload is XX/...)
    bad = tmp_path / "bad.dump"
    bad.write_text(text.replace(f" {right}\n", f" {wrong}\n"))
    before = snapshot(repo.path)
    line = repo.fails("import", "--dump", str(bad), "--objects", str(store))
    assert line == (
        f"cfsctl: {bad}: /only-a: object {store}/{right[:2]}/{right[2:]} has digest {right}, "
        f"the image records {wrong}"
    )
    assert snapshot(repo.path) == before
    # and an object whose content was changed in the store
    obj = store / right[:2] / right[2:]
    obj.chmod(0o644)
    obj.write_bytes(blob("changed", 2000))
    line = repo.fails("import", "--dump", str(dump), "--objects", str(store))
    assert f"{dump}: /only-a: object {obj} has digest " in line
    assert snapshot(repo.path) == before


def test_import_errors(repo: Repo, tmp_path: Path) -> None:
    before = snapshot(repo.path)
    line = repo.fails("import", str(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere") in line
    assert repo.fails("import", str(tree_a(tmp_path / "a")), "--ref", "../up") == (
        "cfsctl: invalid ref name '../up'"
    )
    line = repo.fails("import", "--image", str(tmp_path / "a" / "only-a"))
    assert line.startswith(f"cfsctl: {tmp_path / 'a' / 'only-a'}")
    assert snapshot(repo.path) == before


def test_second_import_writes_only_new_objects(repo: Repo, tmp_path: Path) -> None:
    files = {f"d{i % 5}/f{i:02d}": blob(f"f{i}", 200 + 13 * i) for i in range(40)}
    first = repo.import_(write_tree(tmp_path / "one", files), "--ref", "one")
    assert first["objects_added"] == 40
    kept = {rel: p.stat() for rel, p in object_files(repo.path).items()}
    files2 = {k: v for i, (k, v) in enumerate(files.items()) if i not in (7, 21)}  # 95%
    files2["d1/f07"] = blob("changed", 300)  # one file changed
    files2["extra"] = blob("extra", 4096)  # one added
    second = repo.import_(write_tree(tmp_path / "two", files2), "--ref", "two")
    assert second["objects_added"] == 2
    assert second["objects_reused"] == 38
    assert second["bytes_added"] == 300 + 4096
    now = object_files(repo.path)
    assert len(now) == len(kept) + 3  # the two objects and the image
    for rel, st in kept.items():
        after = now[rel].stat()
        assert (after.st_ino, after.st_mtime_ns, after.st_ctime_ns) == (
            st.st_ino, st.st_mtime_ns, st.st_ctime_ns,
        ), rel  # fmt: skip
    assert read_back(repo.path, str(second["image_id"])) == files2


# -- images and refs ---------------------------------------------------------------------------


def test_images_and_refs(repo: Repo, tmp_path: Path) -> None:
    a = repo.ok("import", str(tree_a(tmp_path / "a")), "--ref", "a").strip()
    b = repo.ok("import", str(tree_b(tmp_path / "b"))).strip()
    size = {i: repo.image_path(i).stat().st_size for i in (a, b)}
    assert repo.json("images") == sorted(
        [{"id": a, "refs": ["a"], "size": size[a]}, {"id": b, "refs": [], "size": size[b]}],
        key=lambda e: str(e["id"]),
    )
    repo.ok("ref", "add", "rel/1", b)
    repo.ok("ref", "add", "rel/2", "rel/1")
    repo.ok("ref", "add", "refs/latest", "a")
    assert os.readlink(repo.path / "images/refs/rel/2") == f"../../{b}"
    assert repo.json("ref", "ls") == {"a": a, "latest": a, "rel/1": b, "rel/2": b}
    assert repo.ok("ref", "ls") == f"a -> {a}\nlatest -> {a}\nrel/1 -> {b}\nrel/2 -> {b}\n"
    text = repo.ok("images").splitlines()
    assert sorted(text) == sorted(
        [
            f"{a}  {human_size(size[a]):>10}  a, latest",
            f"{b}  {human_size(size[b]):>10}  rel/1, rel/2",
        ]
    )
    assert repo.ok("ref", "rm", "rel/1", "rel/2") == ""
    assert not (repo.path / "images/refs/rel").exists()
    assert repo.json("ref", "ls") == {"a": a, "latest": a}
    # a ref can only name an image the repository lists
    before = snapshot(repo.path)
    data_id = object_rel(blob("only-a", 2000)).replace("/", "")
    assert repo.fails("ref", "add", "x", data_id) == (
        f"cfsctl: image {data_id} is not in {repo.path}/images"
    )
    assert repo.fails("ref", "add", "x", "nosuch") == (
        f"cfsctl: no image or ref named 'nosuch' in {repo.path}"
    )
    assert repo.fails("ref", "add", "../x", a) == "cfsctl: invalid ref name '../x'"
    assert repo.fails("ref", "rm", "nosuch") == f"cfsctl: no ref named 'nosuch' in {repo.path}"
    assert snapshot(repo.path) == before


def test_images_with_a_missing_object(repo: Repo, tmp_path: Path) -> None:
    a = repo.ok("import", str(tree_a(tmp_path / "a")), "--ref", "a").strip()
    repo.image_path(a).unlink()
    assert repo.json("images") == [{"id": a, "refs": ["a"], "size": None}]
    assert repo.ok("images") == f"{a}  {'missing':>10}  a\n"
    assert repo.fails("mount", "a", str(tmp_path)) == (
        f"cfsctl: image {a}: its object is missing (run fsck)"
    )
    line = repo.fails("stats")
    assert line.startswith(f"cfsctl: image {a} cannot be read (") and line.endswith("run fsck")


# -- gc ----------------------------------------------------------------------------------------


def test_gc(repo: Repo, tmp_path: Path) -> None:
    src_a = tree_a(tmp_path / "a")
    a = repo.ok("import", str(src_a), "--ref", "a").strip()
    b = repo.ok("import", str(tree_b(tmp_path / "b"))).strip()
    b_size = repo.image_path(b).stat().st_size
    (repo.path / "objects" / ".tmp-0123-stale").write_bytes(b"x" * 10)

    before = snapshot(repo.path)
    dry = repo.json("gc", "--dry-run")
    assert snapshot(repo.path) == before
    assert dry == {
        "dry_run": True, "images_removed": [b], "objects_removed": 2,
        "bytes_removed": 5000 + b_size, "temporary_files_removed": 1,
    }  # fmt: skip
    text = repo.ok("gc", "-n").splitlines()
    assert text == [
        f"would remove image {b}",
        f"Would remove 1 images, 2 objects ({human_size(5000 + b_size)}), 1 temporary files",
    ]
    assert snapshot(repo.path) == before

    done = repo.json("gc")
    assert done == {**dry, "dry_run": False}
    assert not (repo.path / "images" / b).is_symlink()
    assert not repo.image_path(b).exists()
    assert not (repo.path / "objects" / ".tmp-0123-stale").exists()
    assert not (repo.path / "objects" / object_rel(blob("only-b", 5000))).exists()
    assert (repo.path / "objects" / object_rel(blob("shared", 3000))).exists()  # a uses it
    assert sorted(object_files(repo.path)) == sorted(
        [object_rel(blob("shared", 3000)), object_rel(blob("only-a", 2000)), f"{a[:2]}/{a[2:]}"]
    )
    assert read_back(repo.path, a) == source_files(src_a)
    assert repo.ok("gc").splitlines() == ["Removed 0 images, 0 objects (0 B), 0 temporary files"]
    assert repo.ok("fsck").endswith(": ok\n")
    # without its ref, a goes too, and the repository is empty again
    repo.ok("ref", "rm", "a")
    assert repo.json("gc")["objects_removed"] == 3  # type: ignore[index]
    assert object_files(repo.path) == {}


def test_import_without_a_ref_warns_that_gc_removes_it(repo: Repo, tmp_path: Path) -> None:
    src = tree_a(tmp_path / "a")
    r = run("--repo", str(repo.path), "import", str(src))
    image_id = r.stdout.strip()
    assert r.returncode == 0 and len(image_id) == 64
    assert r.stderr == (
        f"cfsctl: note: no ref names image {image_id[:16]}; the next gc removes it"
        f" (import with --ref NAME, or: cfsctl ref add NAME {image_id})\n"
    )
    # named by a ref (this import's or an earlier one's), it is kept: no note
    for args in (("--ref", "a"), ()):
        r = run("--repo", str(repo.path), "import", str(src), *args)
        assert r.returncode == 0 and r.stdout.strip() == image_id and r.stderr == ""


# -- fsck --------------------------------------------------------------------------------------


def test_fsck_damage_repair_reimport(repo: Repo, tmp_path: Path) -> None:
    src = tree_a(tmp_path / "a")
    image_id = repo.ok("import", str(src), "--ref", "a").strip()
    assert repo.ok("fsck").splitlines() == [
        "3 objects, 1 images, 1 refs checked (insecure repository): ok"
    ] or fsverity.verity_supported(repo.path)
    assert repo.json("fsck")["ok"] is True  # type: ignore[index]

    rel = object_rel(blob("only-a", 2000))
    obj = repo.path / "objects" / rel
    obj.chmod(0o644)
    with open(obj, "r+b") as f:
        f.seek(10)
        f.write(b"!")
    damaged = fsverity.digest(obj.read_bytes()).hex()
    r = run(*repo.args("fsck"))
    assert r.returncode == 1
    assert f"objects/{rel}: object-damaged: content has digest {damaged}" in r.stdout.splitlines()
    assert r.stdout.endswith(": 1 problems\n")
    r = run(*repo.args("fsck", "--json"))
    assert r.returncode == 1
    report = json.loads(r.stdout)
    assert report["ok"] is False
    problem = {"kind": "object-damaged", "path": f"objects/{rel}"}
    assert report["problems"] == [{**problem, "detail": f"content has digest {damaged}"}]

    r = run(*repo.args("fsck", "--repair"))
    assert r.returncode == 1  # what was found is still reported
    quarantined = f"quarantine/{rel.replace('/', '')}"
    assert f"repaired: moved objects/{rel} to {quarantined}" in r.stdout.splitlines()
    assert (repo.path / quarantined).exists() and not obj.exists()
    r = run(*repo.args("fsck", "--json"))
    assert r.returncode == 1
    assert [(p["kind"], p["path"]) for p in json.loads(r.stdout)["problems"]] == [
        ("objects-missing", f"images/{image_id}")
    ]

    result = repo.import_(src)  # the same source brings the object back
    assert result["image_id"] == image_id and result["objects_added"] == 1
    assert repo.json("fsck")["ok"] is True  # type: ignore[index]
    assert read_back(repo.path, image_id) == source_files(src)


def test_fsck_missing_dangling_stray(repo: Repo, tmp_path: Path) -> None:
    a = repo.ok("import", str(tree_a(tmp_path / "a")), "--ref", "a").strip()
    b = repo.ok("import", str(tree_b(tmp_path / "b")), "--ref", "b").strip()
    missing = object_rel(blob("only-b", 5000))
    (repo.path / "objects" / missing).unlink()
    (repo.path / "images" / a).unlink()
    (repo.path / "objects" / "stray").write_bytes(b"")
    (repo.path / "images" / "refs" / "nested").mkdir()
    (repo.path / "images" / "refs" / "nested" / "plain-file").write_bytes(b"")
    r = run(*repo.args("fsck", "--json"))
    assert r.returncode == 1
    report = json.loads(r.stdout)
    assert report["ok"] is False
    problems = {(p["kind"], p["path"]): p["detail"] for p in report["problems"]}
    assert set(problems) == {
        ("objects-missing", f"images/{b}"),
        ("ref-broken", "images/refs/a"),
        ("ref-broken", "images/refs/nested/plain-file"),
        ("stray-file", "objects/stray"),
    }
    assert problems[("objects-missing", f"images/{b}")] == (
        f"1 of 2 objects missing, e.g. {missing}"
    )
    assert "is not in" in problems[("ref-broken", "images/refs/a")]
    assert "is not a symlink" in problems[("ref-broken", "images/refs/nested/plain-file")]
    text = run(*repo.args("fsck")).stdout
    assert f"images/{b}: objects-missing: 1 of 2 objects missing, e.g. {missing}\n" in text
    assert "objects/stray: stray-file: not an object\n" in text
    assert text.endswith(": 4 problems\n")


# -- stats -------------------------------------------------------------------------------------


def test_stats(repo: Repo, tmp_path: Path) -> None:
    """A: x, y, z, a copy of x and a small (inline) file; B: x, y, w (sizes 1000, 2000,
    3000, 4000).  The inline bytes are content, but neither referenced nor saved."""
    x, y, z, w = (blob(t, n) for t, n in [("x", 1000), ("y", 2000), ("z", 3000), ("w", 4000)])
    files_a = {"x": x, "y": y, "z": z, "d/x2": x, "small": b"0123456789"}
    a = repo.import_(write_tree(tmp_path / "a", files_a), "--ref", "a")
    b = repo.import_(write_tree(tmp_path / "b", {"x": x, "y": y, "w": w}), "--ref", "b")
    s = repo.json("stats")
    assert isinstance(s, dict)
    images = {i["id"]: i for i in s.pop("images")}
    assert images[a["image_id"]] == {
        "id": a["image_id"], "refs": ["a"], "files": 5, "bytes": 7010, "objects": 3,
        "referenced_bytes": 6000, "unique_bytes": 3000, "shared_bytes": 3000,
    }  # fmt: skip
    assert images[b["image_id"]] == {
        "id": b["image_id"], "refs": ["b"], "files": 3, "bytes": 7000, "objects": 3,
        "referenced_bytes": 7000, "unique_bytes": 4000, "shared_bytes": 3000,
    }  # fmt: skip
    image_bytes = int(a["image_size"]) + int(b["image_size"])  # type: ignore[call-overload]
    assert s == {
        "objects": 6, "stored_bytes": 10000 + image_bytes, "content_bytes": 14010,
        "referenced_bytes": 10000, "saved_bytes": 4000,
        "unreferenced_objects": 0, "unreferenced_bytes": 0,
    }  # fmt: skip
    text = repo.ok("stats").splitlines()
    assert text[0].split() == ["IMAGE", "FILES", "CONTENT", "STORED", "UNIQUE", "SHARED", "REFS"]
    row_a = next(line for line in text if line.startswith(str(a["image_id"])[:16]))
    assert row_a.split()[1] == "5" and row_a.endswith("  a")
    assert f"sharing saves {human_size(4000)}" in text[-1]
    assert text[-1].startswith("2 images; 6 objects, ")
    # after the ref of b goes, w and the image b are what gc would free
    repo.ok("ref", "rm", "b")
    repo.ok("gc")
    s = repo.json("stats")
    assert isinstance(s, dict)
    assert (s["objects"], s["referenced_bytes"], s["saved_bytes"]) == (4, 6000, 1000)


# -- mounting ----------------------------------------------------------------------------------


def _unmount(mnt: Path) -> None:
    if is_mounted(mnt):
        subprocess.run(["umount", str(mnt)], check=False, capture_output=True)
        if is_mounted(mnt) and shutil.which("fusermount3"):
            subprocess.run(["fusermount3", "-u", str(mnt)], check=False, capture_output=True)
    assert not is_mounted(mnt)


@pytest.fixture
def mounted_src(repo: Repo, tmp_path: Path) -> tuple[Path, str, Path]:
    src = make_tree(tmp_path / "src")
    image_id = repo.ok("import", str(src), "--ref", "os/1").strip()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    return src, image_id, mnt


@needs_kernel
def test_kernel_mount(repo: Repo, mounted_src: tuple[Path, str, Path]) -> None:
    src, image_id, mnt = mounted_src
    for name in ("os/1", image_id):
        assert repo.ok("mount", name, str(mnt)) == ""
        try:
            assert is_mounted(mnt)
            assert assert_same_tree(src, mnt) > 10
        finally:
            _unmount(mnt)


@needs_fuse
def test_fuse_mount(repo: Repo, mounted_src: tuple[Path, str, Path]) -> None:
    src, image_id, mnt = mounted_src
    for name in ("os/1", image_id):
        assert repo.ok("mount", "--fuse", name, str(mnt)) == ""
        try:
            assert is_mounted(mnt)
            assert assert_same_tree(src, mnt) > 10
            # the server holds no lock on the repository: gc runs meanwhile
            r = subprocess.run(
                [CFSCTL, *repo.args("gc", "--json")], capture_output=True, text=True, timeout=20
            )
            assert r.returncode == 0, r.stderr
            assert json.loads(r.stdout)["images_removed"] == []
        finally:
            _unmount(mnt)


def test_mount_refuses_names_not_under_images(repo: Repo, tmp_path: Path) -> None:
    repo.ok("import", str(tree_a(tmp_path / "a")), "--ref", "a")
    data_id = object_rel(blob("only-a", 2000)).replace("/", "")
    refs = repo.path / "images" / "refs"
    (refs / "evil").symlink_to(f"../../objects/{data_id[:2]}/{data_id[2:]}")
    (refs / "evil2").symlink_to(f"../{data_id}")
    (refs / "abs").symlink_to(str(tmp_path / "a" / "only-a"))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    before = snapshot(repo.path)
    cases = [
        (data_id, f"cfsctl: image {data_id} is not in {repo.path}/images"),
        (
            "evil",
            f"cfsctl: ref 'evil' points outside images/: ../../objects/{data_id[:2]}/{data_id[2:]}",
        ),
        ("evil2", f"cfsctl: image {data_id} (from ref 'evil2') is not in {repo.path}/images"),
        ("abs", f"cfsctl: ref 'abs' points outside images/: {tmp_path}/a/only-a"),
        ("../x", "cfsctl: invalid ref name '../x'"),
        ("nosuch", f"cfsctl: no image or ref named 'nosuch' in {repo.path}"),
    ]
    for name, message in cases:
        for fuse in ([], ["--fuse"]):
            assert repo.fails("mount", *fuse, name, str(mnt)) == message
            assert not is_mounted(mnt)
    assert snapshot(repo.path) == before


@pytest.mark.parametrize(
    "kind",
    [
        pytest.param("kernel", marks=needs_kernel),
        pytest.param("fuse", marks=needs_fuse),
    ],
)
def test_mount_refuses_an_altered_image(repo: Repo, tmp_path: Path, kind: str) -> None:
    image_id = repo.ok("import", str(tree_a(tmp_path / "a")), "--ref", "a").strip()
    alter_image(repo.image_path(image_id))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for name in ("a", image_id):
        if kind == "kernel":
            line = repo.fails("mount", name, str(mnt))
            # the digest computed over a sealed copy is not the id
            prefix = f"cfsctl: Failed to mount composefs {repo.image_path(image_id)}: "
            assert line.startswith(prefix) and "wrong fs-verity" in line, line
        else:
            line = repo.fails("mount", "--fuse", name, str(mnt))
            assert line == f"cfsctl: image {image_id}: content does not match its id (run fsck)"
        assert not is_mounted(mnt)


# -- bad input ---------------------------------------------------------------------------------


def _meta(**changes: object) -> str:
    meta: dict[str, object] = json.loads(json.dumps(META))
    meta.update(changes)
    return json.dumps(meta)


BAD_META = {
    "version-2": (
        _meta(version=2),
        "repository format version 2 is newer than this tool supports (1)",
    ),
    "not-json": ('{"version": 1,', "not valid JSON"),
    "sha512": (
        _meta(algorithm="fsverity-sha512-12"),
        "the repository uses algorithm 'fsverity-sha512-12'; only fsverity-sha256-12 is supported",
    ),
    "incompatible": (
        _meta(features={"compatible": [], "incompatible": ["chunked-objects"]}),
        "the repository needs features this tool does not have: chunked-objects",
    ),
}


def _commands(tmp_path: Path, image_id: str) -> list[list[str]]:
    src = tmp_path / "a"
    mnt = tmp_path / "mnt"
    mnt.mkdir(exist_ok=True)
    return [
        ["images"],
        ["import", str(src), "--ref", "new"],
        ["ref", "add", "new", image_id],
        ["ref", "rm", "a"],
        ["ref", "ls", "--json"],
        ["gc"],
        ["fsck", "--repair"],
        ["stats"],
        ["mount", "a", str(mnt)],
        ["mount", "--fuse", "a", str(mnt)],
    ]


@pytest.mark.parametrize("case", sorted(BAD_META))
def test_unusable_metadata_changes_nothing(repo: Repo, tmp_path: Path, case: str) -> None:
    content, message = BAD_META[case]
    image_id = repo.ok("import", str(tree_a(tmp_path / "a")), "--ref", "a").strip()
    (repo.path / "meta.json").write_text(content)
    before = snapshot(repo.path)
    for args in [*_commands(tmp_path, image_id), ["init"]]:
        line = repo.fails(*args)
        prefix = f"cfsctl: {repo.path}/meta.json: "
        if case == "not-json":  # then the parser's own words follow
            assert line.startswith(prefix + message + " ("), (args, line)
        else:
            assert line == prefix + message, (args, line)
    assert snapshot(repo.path) == before
    assert not is_mounted(tmp_path / "mnt")


def test_missing_repository(tmp_path: Path) -> None:
    tree_a(tmp_path / "a")
    where = tmp_path / "nowhere"
    for args in _commands(tmp_path, "0" * 64):
        line = fails("--repo", str(where), *args)
        assert line == f"cfsctl: {where}: no such repository (create it with 'init')", args
    assert not where.exists()


def test_not_a_repository(tmp_path: Path) -> None:
    tree_a(tmp_path / "a")
    where = tmp_path / "plain"
    write_tree(where, {"file": b"data"})
    before = snapshot(where)
    for args in _commands(tmp_path, "0" * 64):
        line = fails("--repo", str(where), *args)
        assert line == (
            f"cfsctl: {where}: not a composefs repository (no meta.json; 'init' makes one)"
        ), args
    assert snapshot(where) == before


def test_unknown_names_change_nothing(repo: Repo, tmp_path: Path) -> None:
    image_id = repo.ok("import", str(tree_a(tmp_path / "a")), "--ref", "a").strip()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    before = snapshot(repo.path)
    unknown = f"cfsctl: no image or ref named 'nosuch' in {repo.path}"
    assert repo.fails("mount", "nosuch", str(mnt)) == unknown
    assert repo.fails("mount", "--fuse", "nosuch", str(mnt)) == unknown
    assert repo.fails("ref", "add", "b", "nosuch") == unknown
    assert repo.fails("ref", "rm", "nosuch") == f"cfsctl: no ref named 'nosuch' in {repo.path}"
    assert repo.fails("ref", "add", "b", "f" * 64) == (
        f"cfsctl: image {'f' * 64} is not in {repo.path}/images"
    )
    assert repo.json("ref", "ls") == {"a": image_id}
    assert snapshot(repo.path) == before


def test_read_only_feature(repo: Repo, tmp_path: Path) -> None:
    """An unknown read-only-compatible feature: reading works, writing is refused."""
    image_id = repo.ok("import", str(tree_a(tmp_path / "a")), "--ref", "a").strip()
    (repo.path / "meta.json").write_text(_meta(features={"read-only-compatible": ["future"]}))
    before = snapshot(repo.path)
    message = (
        f"cfsctl: {repo.path}: read-only: meta.json lists features this tool does not know (future)"
    )
    for args in (
        ["import", str(tmp_path / "a")],
        ["ref", "add", "b", "a"],
        ["ref", "rm", "a"],
        ["gc"],
        ["fsck", "--repair"],
    ):
        assert repo.fails(*args) == message, args
    assert repo.json("ref", "ls") == {"a": image_id}
    assert repo.json("fsck")["ok"] is True  # type: ignore[index]
    assert repo.json("gc", "--dry-run")["images_removed"] == []  # type: ignore[index]
    assert snapshot(repo.path) == before
