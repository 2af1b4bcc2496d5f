"""atheris (libFuzzer) target for the composefs image reader: only FormatError may escape.

Each input is taken as a whole image and goes through the same checks as the seeded
mutation test (``tests/mutate_images.py``): ``Image(data).to_tree()``, ``dumpfile.dumps``
and ``ls`` of the tree, then the lazy API (``lookup``, ``iterdir``, ``inode``,
``raw_xattrs``, ``readlink``, ``read_data``, ``to_inode``).  Any other exception is a
finding; hangs and memory blow-ups are caught by libFuzzer's ``-timeout`` and
``-rss_limit_mb``.  Exceptions of bugs already known (``KNOWN_BUGS`` in
tests/mutate_images.py) are ignored unless ``COMPOSEFS_FUZZ_STRICT=1``.  See fuzz/README.md.

    python fuzz/fuzz_reader.py --make-corpus fuzz/seeds       # no atheris needed
    python fuzz/fuzz_reader.py -timeout=10 -rss_limit_mb=2048 -max_len=131072 \\
        fuzz/corpus fuzz/seeds
    python fuzz/fuzz_reader.py crash-<sha1>                     # replay one input
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for path in (REPO / "tests", REPO / "src"):  # mutate_images; composefs when not installed
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

# Paths of the seed images, looked up lazily in every input.
PATHS = [
    b"/etc/motd",
    b"/etc/hostname",
    b"/usr/bin/hello",
    b"/bin",
    b"/usr/lib/table.bin",
    b"/var/old-file",
    b"/data/small",
    b"/data/ext",
    b"/sym",
    b"/usr/bin/sh",
]
MAX_SEED = 256 << 10  # bigger images make every run slower; leave them out of the seeds


def make_corpus(directory: str) -> int:
    """Write the valid base images, and the hand-made hostile ones, as seeds."""
    from mutate_images import base_images

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for base in base_images():
        if len(base.data) <= MAX_SEED:
            (out / f"valid-{base.name}.img").write_bytes(base.data)
            n += 1
    try:
        import test_hostile_images as hostile  # needs pytest (the test environment)
    except ImportError as e:
        print(f"hostile cases skipped ({e}); run with the test venv to include them")
    else:
        for kind in ("compact", "extended"):
            (out / f"valid-{kind}.img").write_bytes(hostile.base_image(kind))
            n += 1
        for case in hostile.CASES:
            try:
                data = case.build()
            except BaseException as e:  # e.g. pytest.skip when ../shared is absent
                print(f"skipped {case.id}: {e}")
                continue
            if 0 < len(data) <= MAX_SEED:
                (out / f"hostile-{case.id}.img").write_bytes(data)
                n += 1
    print(f"{n} seed images in {out}")
    return 0


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--make-corpus":
        sys.exit(make_corpus(sys.argv[2]))

    import atheris

    with atheris.instrument_imports(include=["composefs"]):
        import composefs.dumpfile
        import composefs.erofs.format
        import composefs.erofs.reader
        import composefs.errors
        import composefs.imageinfo
        import composefs.tree  # noqa: F401
    from mutate_images import exercise, known_bug

    strict = os.environ.get("COMPOSEFS_FUZZ_STRICT") == "1"

    def test_one_input(data: bytes) -> None:
        try:
            exercise(data, PATHS)  # anything but FormatError propagates: a finding
        except Exception as e:
            # bugs already reported (KNOWN_BUGS in tests/mutate_images.py) would stop
            # every run within seconds; report them only when asked to
            if strict or known_bug(e) is None:
                raise

    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
