"""fs-verity digests: the spec's vectors, an independent reference, and `fsverity digest`."""

from __future__ import annotations

import hashlib
import io
import os
import random
import struct
import subprocess
from pathlib import Path

import pytest
from conftest import have_tool

from composefs import fsverity
from composefs.cli import info

# docs/fsverity.md §5, computed there with fsverity-utils.
VECTORS = [
    (b"", "3d248ca542a24fc62d1c43b916eae5016878e2533c88238480b26128a1f1af95"),
    (b"a", "bce75948b9e7510293f8f2720412af9697c1479281323f3f220623fb8e94b557"),
    (b"a" * 4096, "a2a808ddaced77f0b6b3068f47b14b5a1fb3fc43674993ab11b8e7e6f2d089e2"),
    (b"a" * 4097, "18b155c0b6e054f3f7d22488ed15340e74dc161ce2d123e13eb685c3ce565f70"),
    (b"x" * 10000, "56d299c86ab735388169327e546b464800d8cb6b3935303ed51b4f3142fc7362"),
    (bytes(1 << 20), "feb19a23e72cb1b8f935d668a09ecaad0bf7c5b9cdfa6dbba7c88a9998ed2b87"),
    (
        bytes(range(256)) * 40000,
        "0cc25ec3788c148011fffc59efda7d6b8ebf9ac26de40e825c28e1c5f527c658",
    ),
]
LIBCOMPOSEFS_EMPTY = "cfc3391077edfd51859f6e5e16e03f82b1da3ee1a35d418b0d0b3b57740b4405"


def reference_digest(data: bytes) -> bytes:
    """A deliberately simple, whole-tree-in-memory fs-verity digest (no salt)."""
    block = 4096

    def hash_level(level: bytes) -> bytes:
        out = b""
        for i in range(0, len(level), block):
            chunk = level[i : i + block]
            out += hashlib.sha256(chunk + bytes(block - len(chunk))).digest()
        return out

    if not data:
        root = bytes(32)
    else:
        level = hash_level(data)
        while len(level) > 32:
            level = hash_level(level)
        root = level
    descriptor = struct.pack("<BBBBIQ", 1, 1, 12, 0, 0, len(data)) + root.ljust(64, b"\0")
    descriptor += bytes(256 - len(descriptor))
    return hashlib.sha256(descriptor).digest()


# Sizes around block and tree-level boundaries: 1 block, 128 hashes per block (one level-1
# block covers 512 KiB), two levels cover 64 MiB.
BOUNDARY_SIZES = sorted(
    {
        n + d
        for n in (0, 4096, 2 * 4096, 128 * 4096, 129 * 4096, 128 * 128 * 4096)
        for d in (-1, 0, 1)
        if n + d >= 0
    }
)


@pytest.mark.parametrize(
    ("data", "expected"), VECTORS, ids=lambda v: str(len(v)) if isinstance(v, bytes) else ""
)
def test_spec_vectors(data: bytes, expected: str) -> None:
    assert fsverity.digest(data).hex() == expected
    assert reference_digest(data).hex() == expected


def test_libcomposefs_empty_file_quirk() -> None:
    assert fsverity.FsVerityHasher(empty_quirk=True).hexdigest() == LIBCOMPOSEFS_EMPTY


@pytest.mark.parametrize("size", BOUNDARY_SIZES)
def test_boundary_sizes_match_reference(size: int) -> None:
    data = random.Random(size).randbytes(size)
    assert fsverity.digest(data) == reference_digest(data)


def test_streaming_in_random_chunks_equals_one_shot() -> None:
    rng = random.Random(7)
    for _ in range(20):
        data = rng.randbytes(rng.randrange(0, 600_000))
        hasher = fsverity.FsVerityHasher()
        pos = 0
        while pos < len(data):
            step = rng.choice([1, 7, 4095, 4096, 4097, 65536, 300_000])
            hasher.update(data[pos : pos + step])
            pos += step
        assert hasher.digest() == reference_digest(data)


def test_stream_and_file(tmp_path: Path) -> None:
    data = random.Random(1).randbytes(3 * 1024 * 1024 + 5)
    path = tmp_path / "f"
    path.write_bytes(data)
    expected = reference_digest(data)
    assert fsverity.digest_stream(io.BytesIO(data)) == expected
    assert fsverity.digest_file(path) == expected


def test_large_file_mmap_and_parallel(tmp_path: Path) -> None:
    # Above both the mmap threshold and PARALLEL_MIN_SIZE, with a partial last block.
    size = fsverity.PARALLEL_MIN_SIZE + 3 * 4096 + 123
    rng = random.Random(3)
    path = tmp_path / "big"
    with path.open("wb") as f:
        f.write(rng.randbytes(size))
    data = path.read_bytes()
    expected = fsverity.digest(data)
    assert fsverity.digest_file(path) == expected
    assert fsverity.digest_file(path, workers=2) == expected


@pytest.mark.skipif(not have_tool("fsverity"), reason="fsverity (fsverity-utils) not installed")
def test_against_fsverity_tool(tmp_path: Path) -> None:
    rng = random.Random(11)
    sizes = [*BOUNDARY_SIZES, *(rng.randrange(1, 3_000_000) for _ in range(10))]
    paths = []
    for i, size in enumerate(sizes):
        p = tmp_path / f"f{i}"
        p.write_bytes(rng.randbytes(size))
        paths.append(p)
    out = subprocess.run(
        ["fsverity", "digest", "--compact", *map(str, paths)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert [fsverity.digest_file(p).hex() for p in paths] == out


def test_measure_file_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = tmp_path / "a"
    a.write_bytes(b"x" * 10000)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert info.main(["measure-file", str(a), str(empty)]) == 0
    assert capsys.readouterr().out.split() == [VECTORS[4][1], LIBCOMPOSEFS_EMPTY]


def test_measure_file_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert info.main(["measure-file", str(tmp_path / "missing")]) == 1
    assert "Failed to open" in capsys.readouterr().err
    assert info.main(["measure-file"]) == 1
    assert "No files specified" in capsys.readouterr().err


def verity_supported(path: Path) -> bool:
    probe = path / "verity-probe"
    probe.write_bytes(b"probe")
    fd = os.open(probe, os.O_RDONLY)
    try:
        return fsverity.enable_verity(fd)
    finally:
        os.close(fd)


def test_kernel_verity_measure(tmp_path: Path) -> None:
    if not verity_supported(tmp_path):
        pytest.skip(f"fs-verity is not supported on the filesystem of {tmp_path}")
    path = tmp_path / "v"
    path.write_bytes(b"x" * 10000)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert fsverity.enable_verity(fd)
        assert fsverity.measure_verity(fd) == bytes.fromhex(VECTORS[4][1])
    finally:
        os.close(fd)


def test_measure_verity_without_verity_is_none(tmp_path: Path) -> None:
    path = tmp_path / "plain"
    path.write_bytes(b"data")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert fsverity.measure_verity(fd) is None
    finally:
        os.close(fd)
