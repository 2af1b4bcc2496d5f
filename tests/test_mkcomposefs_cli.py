"""The mkcomposefs command line, run as a real process like scripts run it."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, SHOULD_FAIL, UPSTREAM, needs_upstream

MKCOMPOSEFS = str(Path(sys.executable).parent / "mkcomposefs")

# docs/fsverity.md §5: image digests printed by the reference's --print-digest.
IMAGE_DIGESTS = [
    ("special.dump", ["--min-version=0", "--max-version=0"], "6fae72a66167ef8d5830fa15647263ef1b535681aa91fdf195fa3d6f5e3ae15e"),
    ("special.dump", ["--min-version=1", "--max-version=1"], "1d268f8bc7609b4f8f8467e98565f45300f9e192c0e6ef2d05820d3ea41d4515"),
    ("bigfile.dump", [], "160c71227628d810604ad305e5d4a912e01a5964866b9bec9f8fddc55e352bfb"),
    ("longlink.dump", [], "32f1351322d32ebed1bde5fd72e2d218435c4aada13a359f1b1d1f1e126815a6"),
]  # fmt: skip
# docs/format.md §14, the worked example.
TINY_DUMP = (
    b"/ 4096 40755 2 0 0 0 1700000000.0 - - -\n"
    b"/ext.bin 10000 100644 1 0 0 0 1700000000.0 "
    b"56/d299c86ab735388169327e546b464800d8cb6b3935303ed51b4f3142fc7362 - "
    b"56d299c86ab735388169327e546b464800d8cb6b3935303ed51b4f3142fc7362\n"
    b"/hello.txt 6 100644 1 0 0 0 1700000000.0 - hello\\n -\n"
    b"/link 7 120777 1 0 0 0 1700000000.0 ext.bin - -\n"
)
TINY_SHA256 = "57d32183138223ce5c8fe65d8cee2d1962f814583b07a4f8a9f41399c06dcb63"
TINY_DIGEST = "7ca59eccd8e516d08769ef46ddab0c3bec1de2af3f0445f5c54656267ed7178f"
WHITEOUT_DUMP = b"/ 4096 40755 2 0 0 0 0.0 - - -\n/wh 0 20000 1 0 0 0 0.0 - - -\n"


def mk(*args: str, stdin: bytes | None = None, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return subprocess.run(
        [MKCOMPOSEFS, *args],
        input=stdin,
        capture_output=True,
        env={**os.environ, **(env or {})},
    )


def test_worked_example(tmp_path: Path) -> None:
    dump = tmp_path / "tiny.dump"
    dump.write_bytes(TINY_DUMP)
    out = tmp_path / "tiny.img"
    r = mk("--from-file", "--print-digest", str(dump), str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode() == TINY_DIGEST + "\n"
    assert hashlib.sha256(out.read_bytes()).hexdigest() == TINY_SHA256
    assert out.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@needs_upstream
@pytest.mark.parametrize(("name", "options", "digest"), IMAGE_DIGESTS)
def test_print_digest_only(name: str, options: list[str], digest: str, tmp_path: Path) -> None:
    r = mk("--from-file", "--print-digest-only", *options, str(UPSTREAM / name))
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode() == digest + "\n"
    assert list(tmp_path.iterdir()) == []


def test_stdin_and_stdout(tmp_path: Path) -> None:
    r = mk("--from-file", "--print-digest", "-", "-", stdin=TINY_DUMP)
    assert r.returncode == 0, r.stderr
    image, digest_line = r.stdout[:-65], r.stdout[-65:]
    assert hashlib.sha256(image).hexdigest() == TINY_SHA256
    assert digest_line == (TINY_DIGEST + "\n").encode()


def test_proc_self_fd_target(tmp_path: Path) -> None:
    """The man page's sandboxed-pipeline idiom: write to an inherited descriptor."""
    dump = tmp_path / "tiny.dump"
    dump.write_bytes(TINY_DUMP)
    out = tmp_path / "via-fd.img"
    script = f'"{MKCOMPOSEFS}" --from-file "{dump}" /proc/self/fd/3 3>"{out}"'
    r = subprocess.run(["bash", "-c", script], capture_output=True)
    assert r.returncode == 0, r.stderr
    assert hashlib.sha256(out.read_bytes()).hexdigest() == TINY_SHA256
    # and through a pipe
    script = f'"{MKCOMPOSEFS}" --from-file "{dump}" /proc/self/fd/3 3>&1 >/dev/null | sha256sum'
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == TINY_SHA256


def test_symlinked_target_is_written_through(tmp_path: Path) -> None:
    dump = tmp_path / "tiny.dump"
    dump.write_bytes(TINY_DUMP)
    real = tmp_path / "real.img"
    real.write_bytes(b"old")
    link = tmp_path / "link.img"
    link.symlink_to(real)
    assert mk("--from-file", str(dump), str(link)).returncode == 0
    assert link.is_symlink()
    assert hashlib.sha256(real.read_bytes()).hexdigest() == TINY_SHA256


@needs_upstream
@pytest.mark.parametrize("path", SHOULD_FAIL, ids=lambda p: p.name)
def test_should_fail_assets(path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.img"
    r = mk("--from-file", str(path), str(out), env={"CFS_PARSE_STRICT": "1"})
    assert r.returncode == 1
    err = r.stderr.decode()
    assert err.startswith("mkcomposefs: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert f"{path}:" in err  # names the file and the line, even for write-time errors
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary file left either


def test_failure_leaves_existing_image_untouched(tmp_path: Path) -> None:
    out = tmp_path / "out.img"
    out.write_bytes(b"previous image")
    bad = tmp_path / "bad.dump"
    bad.write_bytes(TINY_DUMP + b"/x 0 644 1 0 0 0 0.0 - - -\n")
    r = mk("--from-file", str(bad), str(out))
    assert r.returncode == 1
    assert r.stderr.decode() == f"mkcomposefs: {bad}:5: Invalid mode 644\n"
    assert out.read_bytes() == b"previous image"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.dump", "out.img"]


def _version_byte(image: bytes) -> int:
    return int.from_bytes(image[12:16], "little")


@pytest.mark.parametrize(
    ("options", "version"),
    [
        ([], 1),  # a whiteout bumps the default to version 1
        (["--max-version=1"], 1),
        (["--min-version=0"], 0),  # giving one option makes the other default to 0
        (["--max-version=0"], 0),
        (["--min-version=1"], 1),
    ],
)
def test_version_options(options: list[str], version: int, tmp_path: Path) -> None:
    dump = tmp_path / "wh.dump"
    dump.write_bytes(WHITEOUT_DUMP)
    out = tmp_path / "wh.img"
    assert mk("--from-file", *options, str(dump), str(out)).returncode == 0
    assert _version_byte(out.read_bytes()) == version


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "No source path specified"),
        (["--from-file", "a"], "No destination path specified"),
        (["--from-file", "a", "b", "c"], "Too many arguments"),
        (["--from-file", "--print-digest-only", "a", "b"], "Cannot specify destination path with --print-digest-only"),
        (["--from-file", "--min-version=x", "a", "b"], "Invalid min version x"),
        (["--from-file", "--max-version=", "a", "b"], "Invalid max version "),
        (["--from-file", "--threads=0", "a", "b"], "Invalid threads count 0"),
        (["--from-file", "", "b"], "Empty source path specified"),
    ],
)  # fmt: skip
def test_usage_errors(args: list[str], message: str) -> None:
    r = mk(*args)
    assert r.returncode == 1
    assert r.stderr.decode().splitlines()[0] == message


def test_unsupported_version_is_a_write_error(tmp_path: Path) -> None:
    dump = tmp_path / "tiny.dump"
    dump.write_bytes(TINY_DUMP)
    r = mk("--from-file", "--min-version=2", str(dump), str(tmp_path / "o.img"))
    assert r.returncode == 1
    assert r.stderr.decode().startswith("mkcomposefs: cannot write file: Invalid argument")


def test_missing_source(tmp_path: Path) -> None:
    r = mk("--from-file", str(tmp_path / "nope.dump"), str(tmp_path / "o.img"))
    assert r.returncode == 1
    assert "No such file or directory" in r.stderr.decode()


REFERENCE = shutil.which("mkcomposefs")
reference_only = pytest.mark.skipif(
    REFERENCE is None or Path(REFERENCE).resolve() == Path(MKCOMPOSEFS).resolve(),
    reason="reference mkcomposefs not on PATH",
)


@reference_only
@needs_upstream
@pytest.mark.parametrize("path", sorted(UPSTREAM.glob("*.dump")), ids=lambda p: p.name)
def test_same_result_as_reference(path: Path, tmp_path: Path) -> None:
    assert REFERENCE is not None
    ours, theirs = tmp_path / "ours.img", tmp_path / "theirs.img"
    a = mk("--from-file", "--print-digest", str(path), str(ours))
    b = subprocess.run(
        [REFERENCE, "--from-file", "--print-digest", str(path), str(theirs)], capture_output=True
    )
    assert a.returncode == b.returncode
    assert a.stdout == b.stdout
    if b.returncode == 0:
        assert ours.read_bytes() == theirs.read_bytes()


def test_demo_dump_builds(tmp_path: Path) -> None:
    out = tmp_path / "demo.img"
    r = mk("--from-file", str(REPO / "examples/demo.dump"), str(out), env={"CFS_PARSE_STRICT": "1"})
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size % 4096 == 0
