"""The repository's crash-safety and locking claims, tested by force.

* Imports are killed with SIGKILL at random moments (seeded: set ``CFS_CRASH_SEED`` to
  replay a run; the seed is printed), over a source tree of which a varying part is new
  content each time, so that the kill often lands while objects are being staged or
  renamed.  Afterwards no object may disagree with its name and no ref may name a missing
  image; after ``gc`` the repository must be clean (no temporary files, fsck ok), and every
  ref that survived must name an image whose objects all exist and whose tree is the one
  that was imported.
* Two imports and a gc run at once (processes and threads, various timings) lose nothing.
* A gc waits for the lock an import holds, and an import for a gc's.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from composefs import fsverity
from composefs.erofs.reader import load_tree
from composefs.objects import object_name, temporary_files
from composefs.repository import Repository
from composefs.scan import INLINE_MAX, ScanOptions
from composefs.tree import S_IFLNK, S_IFMT, S_IFREG

CFSCTL = str(Path(sys.executable).parent / "cfsctl")
SEED = int(os.environ.get("CFS_CRASH_SEED", "20240611"))
TRIALS = 24

# What a regular file holds: ("inline", its content) where the image embeds it (at most
# 64 bytes, or empty), else ("object", the fs-verity digest that names its object).
Content = tuple[str, bytes]


# -- source trees -------------------------------------------------------------------------------


class SourceTree:
    """A directory of generated files and what each one holds (:data:`Content`)."""

    def __init__(self, root: Path, rng: random.Random, files: int, dirs: int = 25) -> None:
        self.root = root
        self.rng = rng
        self.expected: dict[str, Content] = {}
        self.symlinks: dict[str, str] = {}
        for d in range(dirs):
            (root / f"d{d:02}" / "sub").mkdir(parents=True)
        for i in range(files):
            d = i % dirs
            where = f"d{d:02}/sub" if i % 7 == 0 else f"d{d:02}"
            self._write(f"{where}/f{i:05}")
        (root / "empty").write_bytes(b"")
        self.expected["empty"] = ("inline", b"")
        for i in range(5):
            target = f"d{i:02}/f{i:05}"
            (root / f"link{i}").symlink_to(target)
            self.symlinks[f"link{i}"] = target

    def _size(self) -> int:
        r = self.rng.random()
        if r < 0.10:
            return self.rng.randint(1, INLINE_MAX)
        if r < 0.60:
            return self.rng.randint(INLINE_MAX + 1, 4096)
        if r < 0.95:
            return self.rng.randint(4097, 32768)
        return self.rng.randint(65536, 262144)

    def _write(self, rel: str) -> None:
        data = self.rng.randbytes(self._size())
        (self.root / rel).write_bytes(data)
        if len(data) <= INLINE_MAX:
            self.expected[rel] = ("inline", data)
        else:
            self.expected[rel] = ("object", fsverity.digest(data))

    def mutate(self, fraction: float) -> int:
        """Give ``fraction`` of the files new content; returns how many."""
        names = sorted(n for n in self.expected if n != "empty")
        chosen = self.rng.sample(names, max(1, round(len(names) * fraction)))
        for rel in chosen:
            self._write(rel)
        return len(chosen)

    def snapshot(self) -> dict[str, Content]:
        return dict(self.expected)

    def digests(self) -> list[bytes]:
        """The objects the tree needs."""
        return [v for kind, v in self.expected.values() if kind == "object"]

    def copy(self, root: Path, rng: random.Random) -> SourceTree:
        """The same tree at ``root``: a real copy, as files are rewritten in place."""
        shutil.copytree(self.root, root, symlinks=True, copy_function=shutil.copy2)
        other = SourceTree.__new__(SourceTree)
        other.root, other.rng = root, rng
        other.expected, other.symlinks = dict(self.expected), dict(self.symlinks)
        return other


def image_contents(repo: Repository, image_id: str) -> tuple[dict[str, Content], dict[str, str]]:
    """What an image says each regular file holds, and its symlinks; every external file's
    payload must name the object of its digest."""
    tree = load_tree(repo.object_path(image_id))
    files: dict[str, Content] = {}
    links: dict[str, str] = {}
    for path, node in tree.walk():
        rel = path.decode().lstrip("/")
        kind = node.mode & S_IFMT
        if kind == S_IFLNK:
            assert node.payload is not None
            links[rel] = node.payload.decode()
        elif kind != S_IFREG:
            continue
        elif node.content is not None or node.size == 0:
            files[rel] = ("inline", node.content or b"")
        else:
            assert node.payload is not None, rel
            digest = bytes.fromhex(node.payload.decode().replace("/", ""))
            assert node.digest in (None, digest), f"{rel}: digest xattr disagrees with payload"
            files[rel] = ("object", digest)
    return files, links


def check_image(
    repo: Repository,
    name: str,
    expected: dict[str, Content],
    symlinks: dict[str, str],
    *,
    sample: random.Random | None = None,
) -> str:
    """``name`` resolves to an image as a mount would find it, all its objects exist with
    the sizes it records, and its tree is ``expected``; returns the image id."""
    image_id, path = repo.image_file(name)
    assert fsverity.digest(path.read_bytes()).hex() == image_id, f"{name}: image != its id"
    for rel, size in repo.image_objects(image_id).items():
        st = (repo.objects / rel).stat()  # raises if missing
        assert st.st_size == size, f"{name}: object {rel} has {st.st_size} bytes, not {size}"
    files, links = image_contents(repo, image_id)
    assert links == symlinks, f"{name}: symlinks differ"
    assert files.keys() == expected.keys(), f"{name}: file names differ"
    wrong = sorted(rel for rel in files if files[rel] != expected[rel])
    assert not wrong, f"{name}: {len(wrong)} files differ from the source, e.g. {wrong[:3]}"
    if sample is not None:  # read some objects back: the content is what the name says
        external = [v for kind, v in expected.values() if kind == "object"]
        for digest in sample.sample(external, min(25, len(external))):
            data = repo.object_path(digest).read_bytes()
            assert fsverity.digest(data) == digest, f"{name}: object {object_name(digest)}"
    return image_id


# -- running cfsctl -----------------------------------------------------------------------------


def cfsctl(repo: Path, *args: str, timeout: float = 60, ok: bool = True) -> Any:
    """Run cfsctl (``--json`` output parsed); a hang fails the test instead of stalling it."""
    try:
        res = subprocess.run(
            [CFSCTL, "--repo", str(repo), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"cfsctl {' '.join(args)} did not finish in {timeout} s (a lock never freed?)")
    if ok:
        assert res.returncode == 0, f"cfsctl {' '.join(args)}: {res.returncode}: {res.stderr}"
    return json.loads(res.stdout) if "--json" in args else res.stdout


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(int(entry))
    return out


def wait_group_gone(pgid: int, timeout: float = 10) -> list[int]:
    """Wait for every process of the group to end; returns those still alive then."""
    deadline = time.monotonic() + timeout
    while True:
        alive = group_members(pgid)
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.02)


@contextlib.contextmanager
def session(cmd: list[str], out: Path) -> Any:
    """A command in a process group of its own (the import and its workers), stdout to
    ``out``; whatever of the group is left at the end is killed."""
    with out.open("wb") as stdout:
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.PIPE, start_new_session=True)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def count_objects(repo: Path) -> int:
    return sum(len(os.listdir(d)) for d in (repo / "objects").iterdir() if d.is_dir())


def timed_import(repo: Path, src: Path, ref: str) -> tuple[float, dict[str, Any]]:
    t = time.perf_counter()
    result = cfsctl(repo, "import", str(src), "--ref", ref, "--json")
    return time.perf_counter() - t, result


# -- (a) SIGKILL at random moments ---------------------------------------------------------------


def test_imports_killed_at_random_moments(tmp_path: Path) -> None:
    print(f"seed {SEED} (CFS_CRASH_SEED={SEED} replays this run)")
    rng = random.Random(SEED)
    repo = tmp_path / "repo"
    cfsctl(repo, "init")
    src = SourceTree(tmp_path / "src", rng, files=1500)
    snapshots: dict[str, dict[str, Content]] = {"base": src.snapshot(), "again": src.snapshot()}

    # Calibrate: one import writing everything, one writing nothing (all reused).
    t_full, first = timed_import(repo, src.root, "base")
    t_reuse, again = timed_import(repo, src.root, "again")
    assert first["objects_added"] > 1000 and again["objects_added"] == 0
    assert first["image_id"] == again["image_id"]
    print(f"uncut import: {t_full:.2f} s writing all, {t_reuse:.2f} s reusing all")

    outcome: dict[str, str] = {}  # ref -> "cut" or the image id the import printed
    orphans: list[str] = []
    for n in range(TRIALS):
        ref = f"r{n:02}"
        fraction = rng.choice((0.05, 0.2, 0.5, 1.0)) * rng.uniform(0.5, 1.0)
        src.mutate(fraction)
        snapshots[ref] = src.snapshot()
        # what this import must write: the new content, and what cut imports left unwritten
        external = src.digests()
        missing = sum(not (repo / "objects" / object_name(d)).exists() for d in external)
        expected_time = t_reuse + missing / len(external) * (t_full - t_reuse)
        delay = rng.uniform(0.05, 1.15) * expected_time
        threads = rng.choice(("1", "2"))  # hashing in workers, or in the import itself
        objects_before = count_objects(repo)
        cmd = [CFSCTL, "--repo", str(repo), "import", str(src.root), "--ref", ref, "--json"]
        cmd += ["--threads", threads]
        with session(cmd, tmp_path / f"{ref}.out") as proc:
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)  # the import alone: its workers must follow
                proc.wait()
            left = wait_group_gone(proc.pid)
            if left:
                orphans.append(f"{ref}: {len(left)} processes outlived the killed import")
            if proc.returncode == 0:
                outcome[ref] = json.loads((tmp_path / f"{ref}.out").read_text())["image_id"]
            else:
                assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
                outcome[ref] = "cut"
        temporary = sum(name.startswith(".tmp-") for name in os.listdir(repo / "objects"))
        print(
            f"trial {ref}: {fraction:4.0%} new, {missing:4} to write, {threads} threads, "
            f"killed after {delay:.2f} s: {'cut' if outcome[ref] == 'cut' else 'completed'}, "
            f"{count_objects(repo) - objects_before:+} objects, {temporary} temporary files"
        )
    assert not orphans, "workers of a killed import lived on (holding the lock): " + "; ".join(
        orphans
    )
    cut = [r for r, o in outcome.items() if o == "cut"]
    assert cut, "no import was actually interrupted: the kills all came too late"

    # Before gc: nothing damaged, no ref to a missing image.
    before = cfsctl(repo, "fsck", "--json", ok=False)
    kinds = {p["kind"] for p in before["problems"]}
    assert "object-damaged" not in kinds, before["problems"]
    assert "ref-broken" not in kinds, before["problems"]
    assert before["problems"] == [], before["problems"]
    print(f"before gc: {before['objects_checked']} objects, {before['temporary_files']} temp")

    removed = cfsctl(repo, "gc", "--json")
    print(
        f"gc: {len(removed['images_removed'])} images, {removed['objects_removed']} objects, "
        f"{removed['temporary_files_removed']} temporary files removed"
    )
    after = cfsctl(repo, "fsck", "--json")
    assert after["ok"] and after["temporary_files"] == 0, after
    assert not any(n.startswith(".tmp-") for n in os.listdir(repo / "objects"))

    r = Repository(repo)
    refs = r.refs()
    for ref, result in outcome.items():
        if result != "cut":
            assert refs.get(ref) == result, f"{ref}: completed import lost its ref"
    assert set(refs) <= set(snapshots), refs
    check_rng = random.Random(SEED)
    for ref in sorted(refs):  # every survivor, cut late or completed, is whole
        check_image(r, ref, snapshots[ref], src.symlinks, sample=check_rng)
    stats = r.stats()
    assert stats.unreferenced_objects == 0
    assert len(stats.images) == len(set(refs.values()))
    print(f"{len(cut)} cut, {len(refs)} refs survive and match their sources")


# Imports itself killed just before its n-th rename: every state the commit goes through.
_KILL_AT_RENAME = """
import os, signal, sys
from composefs.repository import Repository
from composefs.scan import ScanOptions

repo, src, ref, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
calls = 0
rename = os.rename

def counted(a, b, **kw):
    global calls
    calls += 1
    if calls == n:
        os.kill(os.getpid(), signal.SIGKILL)
    rename(a, b, **kw)

os.rename = counted
Repository(repo).import_directory(src, ref=ref, options=ScanOptions(threads=1))
print(calls)
"""


def test_import_killed_before_each_rename(tmp_path: Path) -> None:
    """The random kills mostly land while objects are staged; the commit (objects renamed
    into place, then the image, its link, the ref) is short.  Here an import is killed
    before each of its renames in turn, each time into a repository holding an older image
    that shares half its content."""
    rng = random.Random(SEED + 2)
    base = SourceTree(tmp_path / "src", rng, files=16, dirs=2)
    base_snapshot = base.snapshot()
    seed_repo = tmp_path / "seed"
    cfsctl(seed_repo, "init")
    cfsctl(seed_repo, "import", str(base.root), "--ref", "base")
    base.mutate(0.5)
    new_snapshot = base.snapshot()

    def run(n: int) -> tuple[Path, subprocess.CompletedProcess[str]]:
        repo = tmp_path / f"repo{n}"
        shutil.copytree(seed_repo, repo, symlinks=True)
        cmd = [sys.executable, "-c", _KILL_AT_RENAME, str(repo), str(base.root), "new", str(n)]
        return repo, subprocess.run(cmd, capture_output=True, text=True, timeout=60)

    repo, whole = run(0)  # never killed: counts the renames
    assert whole.returncode == 0, whole.stderr
    renames = int(whole.stdout)
    print(f"a whole import makes {renames} renames")
    new_objects = len(set(base.digests()) - {v for k, v in base_snapshot.values() if k == "object"})
    assert new_objects > 0
    assert renames == new_objects + 3, "one rename per new object, the image, its link, the ref"
    check_image(Repository(repo), "new", new_snapshot, base.symlinks)
    shutil.rmtree(repo)
    for n in range(1, renames + 1):
        repo, res = run(n)
        assert res.returncode == -signal.SIGKILL, res.stderr
        r = Repository(repo)
        before = r.fsck()
        assert before.ok, f"killed before rename {n}: {before.problems}"
        r.gc()
        after = r.fsck()
        assert after.ok and after.temporary_files == 0, f"killed before rename {n}: {after}"
        check_image(r, "base", base_snapshot, base.symlinks)
        assert set(r.refs()) == {"base"}, f"killed before rename {n}"  # the ref is last
        assert r.stats().unreferenced_objects == 0
        shutil.rmtree(repo)


def _staging_source(tmp_path: Path) -> Path:
    """Enough content that an import spends a while staging it."""
    src = tmp_path / "src"
    for d in range(8):
        (src / f"d{d}").mkdir(parents=True)
        for i in range(60):
            (src / f"d{d}" / f"f{i}").write_bytes(os.urandom(96 * 1024))
    return src


def _kill_while_staging(cmd: list[str], repo: Path, out: Path) -> None:
    """Run ``cmd``, SIGKILL it (it alone) once it has staged a file; every process it
    started must then end by itself."""
    with session(cmd, out) as proc:
        deadline = time.monotonic() + 30
        while not temporary_files(repo / "objects"):
            assert proc.poll() is None, f"it ended before it staged anything: {proc.stderr.read()}"
            assert time.monotonic() < deadline
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        left = wait_group_gone(proc.pid)
        assert not left, f"{len(left)} processes outlived the killed import"


def test_killed_import_leaves_no_process_holding_the_lock(tmp_path: Path) -> None:
    """Kill an import while its workers are staging objects: gc must get the lock."""
    repo = tmp_path / "repo"
    cfsctl(repo, "init")
    src = _staging_source(tmp_path)
    cmd = [CFSCTL, "--repo", str(repo), "import", str(src), "--threads", "2", "--ref", "x"]
    _kill_while_staging(cmd, repo, tmp_path / "out")
    removed = cfsctl(repo, "gc", "--json", timeout=20)
    assert removed["temporary_files_removed"] > 0
    fsck = cfsctl(repo, "fsck", "--json")
    assert fsck["ok"] and fsck["temporary_files"] == 0
    assert Repository(repo).refs() == {}


# A caller running threads gets forkserver workers: children of the server, not its own.
_THREADED_IMPORT = """
import sys, threading, time
from composefs.repository import Repository
from composefs.scan import ScanOptions

threading.Thread(target=time.sleep, args=(600,), daemon=True).start()
Repository(sys.argv[1]).import_directory(sys.argv[2], options=ScanOptions(threads=2))
"""


def test_killed_threaded_import_leaves_no_workers(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    cfsctl(repo, "init")
    src = _staging_source(tmp_path)
    cmd = [sys.executable, "-c", _THREADED_IMPORT, str(repo), str(src)]
    _kill_while_staging(cmd, repo, tmp_path / "out")
    cfsctl(repo, "gc", "--json", timeout=20)
    fsck = cfsctl(repo, "fsck", "--json")
    assert fsck["ok"] and fsck["temporary_files"] == 0, "a worker staged files after gc"


# -- (b) concurrency ---------------------------------------------------------------------------


def test_two_imports_and_gc_at_once(tmp_path: Path) -> None:
    """Each round drops the previous round's refs (so gc has objects to remove, most of
    them wanted again by the new imports), then starts two imports and a gc at random
    offsets: in processes (cfsctl) on even rounds, in threads of this process on odd ones."""
    rng = random.Random(SEED + 1)
    repo = tmp_path / "repo"
    cfsctl(repo, "init")
    a = SourceTree(tmp_path / "a", rng, files=600)
    b = a.copy(tmp_path / "b", rng)
    b.mutate(0.5)
    cfsctl(repo, "import", str(a.root), "--ref", "a-init")
    cfsctl(repo, "import", str(b.root), "--ref", "b-init")
    previous = ["a-init", "b-init"]
    for k in range(4):
        a.mutate(rng.uniform(0.1, 0.4))
        b.mutate(rng.uniform(0.1, 0.4))
        for ref in previous:
            cfsctl(repo, "ref", "rm", ref)
        refs = {f"a{k}": a, f"b{k}": b}
        offsets = {name: rng.uniform(0, 0.4) for name in (*refs, "gc")}
        print(f"round {k} ({'processes' if k % 2 == 0 else 'threads'}): offsets {offsets}")
        if k % 2 == 0:
            ids = _race_processes(tmp_path, repo, refs, offsets)
        else:
            ids = _race_threads(repo, refs, offsets)
        r = Repository(repo)
        assert r.refs() == ids, "a ref went missing or points elsewhere"
        for ref, tree in refs.items():
            check_image(r, ref, tree.snapshot(), tree.symlinks, sample=rng)
        fsck = cfsctl(repo, "fsck", "--json")
        assert fsck["ok"], fsck["problems"]
        previous = list(refs)


def _race_processes(
    tmp_path: Path, repo: Path, refs: dict[str, SourceTree], offsets: dict[str, float]
) -> dict[str, str]:
    cmds = {
        ref: [CFSCTL, "--repo", str(repo), "import", str(tree.root), "--ref", ref]
        for ref, tree in refs.items()
    }
    cmds["gc"] = [CFSCTL, "--repo", str(repo), "gc"]
    with contextlib.ExitStack() as stack:
        procs = {}
        start = time.monotonic()
        for name in sorted(offsets, key=offsets.__getitem__):
            time.sleep(max(0.0, start + offsets[name] - time.monotonic()))
            procs[name] = stack.enter_context(session(cmds[name], tmp_path / f"{name}.out"))
        for name, proc in procs.items():
            try:
                rc = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{name} did not finish in 60 s")
            assert rc == 0, f"{name}: {proc.stderr.read()}"
    return {ref: (tmp_path / f"{ref}.out").read_text().strip() for ref in refs}


def _race_threads(
    repo: Path, refs: dict[str, SourceTree], offsets: dict[str, float]
) -> dict[str, str]:
    results: dict[str, Any] = {}
    start = time.monotonic()

    def run(name: str) -> None:
        time.sleep(max(0.0, start + offsets[name] - time.monotonic()))
        r = Repository(repo)  # as another process would: its own lock descriptor
        try:
            if name == "gc":
                results[name] = r.gc()
            else:
                options = ScanOptions(threads=1)
                results[name] = r.import_directory(refs[name].root, ref=name, options=options)
        except BaseException as e:
            results[name] = e

    threads = [threading.Thread(target=run, args=(name,)) for name in offsets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "a thread did not finish in 60 s"
    for name, result in results.items():
        assert not isinstance(result, BaseException), f"{name}: {result!r}"
    return {ref: results[ref].image_id for ref in refs}


def _small_repo(tmp_path: Path) -> Repository:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):
        (src / f"f{i}").write_bytes(os.urandom(5000))
    repo, _ = Repository.init(tmp_path / "repo", insecure=True)
    repo.import_directory(src, ref="keep")
    (src / "f0").write_bytes(os.urandom(5000))
    repo.import_directory(src, ref="drop")
    return repo


def test_gc_waits_for_a_shared_lock(tmp_path: Path) -> None:
    repo = _small_repo(tmp_path)
    repo.remove_ref("drop")  # its image becomes garbage
    done: list[Any] = []
    with repo.lock():  # as an import holds it
        t = threading.Thread(target=lambda: done.append(Repository(repo.path).gc()))
        t.start()
        t.join(0.5)
        assert t.is_alive() and not done, "gc did not wait for the shared lock"
        # readers still get in while gc waits (and gc holds nothing yet)
        assert set(Repository(repo.path).refs()) == {"keep"}
    t.join(10)
    assert not t.is_alive(), "gc did not proceed once the lock was released"
    assert len(done[0].images_removed) == 1


def test_import_waits_for_gc(tmp_path: Path) -> None:
    repo = _small_repo(tmp_path)
    done: list[Any] = []
    (tmp_path / "src" / "new").write_bytes(os.urandom(5000))
    with repo.lock(exclusive=True):  # as gc holds it
        t = threading.Thread(
            target=lambda: done.append(
                Repository(repo.path).import_directory(tmp_path / "src", ref="new")
            )
        )
        t.start()
        t.join(0.5)
        assert t.is_alive() and not done, "import did not wait for the exclusive lock"
        assert not any(n.startswith(".tmp-") for n in os.listdir(repo.objects))
    t.join(10)
    assert not t.is_alive(), "import did not proceed once the lock was released"
    assert repo.refs()["new"] == done[0].image_id
    assert repo.fsck().ok
