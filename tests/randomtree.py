"""Random dump files for differential tests: every file type, hardlinks, whiteouts,
shared and unique xattrs, escaped overlay xattrs, long names, inline and external files."""

from __future__ import annotations

import random

from composefs.dumpfile import escape, escape_xattr

NAMES = [b"a", b"b", b"+plus", b"-dash", b".hidden", b".-x", b"00", b"ff", b"zz", b"\xff\xfe"]


def random_dump(seed: int, n_files: int = 60) -> bytes:
    rng = random.Random(seed)
    digests = [rng.randbytes(32) for _ in range(4)]
    xattr_pool = [
        (b"user.foo", b"bar"),
        (b"user.shared", b"same"),
        (b"security.selinux", b"system_u:object_r:usr_t:s0"),
        (b"trusted.overlay.redirect", b"/escaped"),
        (b"trusted.overlay.opaque", b"y"),
        (b"user.overlay.opaque", b"x"),
        (b"system.posix_acl_access", b"\x02\x00\x00\x00"),
        (b"trusted.foo", rng.randbytes(5)),
        (b"user.big", b"v" * rng.randrange(1, 300)),
    ]
    times = [(0, 0), (1700000000, 0), (1700000000, 5), (-5, 0)]

    def xattrs() -> list[bytes]:
        out = []
        for k, v in rng.sample(xattr_pool, rng.randrange(0, 4)):
            out.append(escape_xattr(k) + b"=" + escape_xattr(v))
        return out

    def line(path: bytes, size: int, mode: str, nlink: int, rdev: int, payload: bytes | None,
             content: bytes | None, digest: bytes | None, xs: list[bytes]) -> bytes:  # fmt: skip
        uid = rng.choice([0, 1000, 70000])
        sec, nsec = rng.choice(times)
        fields = [
            escape(path), b"%d" % size, mode.encode(), b"%d" % nlink, b"%d" % uid,
            b"%d" % rng.choice([0, 100000]), b"%d" % rdev, b"%d.%d" % (sec, nsec),
            b"-" if payload is None else escape(payload),
            b"-" if content is None else escape(content),
            b"-" if digest is None else digest.hex().encode(),
        ]  # fmt: skip
        return b" ".join(fields + xs) + b"\n"

    lines = [line(b"/", 4096, "40755", 2, 0, None, None, None, xattrs())]
    dirs = [b""]
    files: list[bytes] = []
    used: set[bytes] = set()
    for i in range(n_files):
        parent = rng.choice(dirs)
        base = rng.choice(NAMES) + (b"%d" % i if rng.random() < 0.8 else b"")
        if rng.random() < 0.03:
            base = b"L" * 255
        path = parent + b"/" + base
        if path in used:
            continue
        used.add(path)
        kind = rng.random()
        if kind < 0.15:
            lines.append(line(path, 4096, "40755", 2, 0, None, None, None, xattrs()))
            dirs.append(path)
        elif kind < 0.45:
            size = rng.choice([1, 4096, 4097, 10000, 1 << 20, 5 << 30])
            digest = rng.choice([*digests, None])
            payload = (
                digest.hex()[:2].encode() + b"/" + digest.hex()[2:].encode() if digest else None
            )
            lines.append(
                line(path, size, "100644", rng.choice([1, 2]), 0, payload, None, digest, xattrs())
            )
            files.append(path)
        elif kind < 0.6:
            size = rng.choice([0, 1, 63, 2048, 2049, 4096, 4097, 5000])
            content = rng.randbytes(size) if size else None
            lines.append(line(path, size, "100755", 1, 0, None, content, None, xattrs()))
            files.append(path)
        elif kind < 0.7:
            target = rng.choice([b"x", b"../" * 20 + b"t", b"T" * rng.randrange(1, 4095)])
            lines.append(line(path, len(target), "120777", 1, 0, target, None, None, xattrs()))
        elif kind < 0.78:
            lines.append(line(path, 0, "20644", 1, 0, None, None, None, xattrs()))  # whiteout
        elif kind < 0.84:
            mode = rng.choice(["20600", "60660"])
            lines.append(
                line(path, 0, mode, 1, rng.choice([259, 66000]), None, None, None, xattrs())
            )
        elif kind < 0.9:
            mode = rng.choice(["10644", "140755"])
            lines.append(line(path, 0, mode, 1, 0, None, None, None, xattrs()))
        elif files:
            target = rng.choice(files)
            lines.append(line(path, 0, "@100644", 1, 0, target, None, None, []))
    return b"".join(lines)
