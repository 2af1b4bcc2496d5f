"""Optional native build: COMPOSEFS_MYPYC=1 compiles the hot modules with mypyc.

The package is pure Python and complete without this; compiling the dump parser, the
model and the image writer with mypyc (the compiler mypy and black ship with) makes
``mkcomposefs --from-file`` about 1.5x faster, and compiling the directory scan and the
fs-verity hashing makes ``mkcomposefs SOURCEDIR`` without a store about 1.15x faster.
Build it with ``scripts/build-compiled.sh`` (or ``COMPOSEFS_MYPYC=1 pip install
--no-build-isolation .`` in an environment that has mypy).
"""

import os

from setuptools import setup

COMPILED_MODULES = [
    "src/composefs/tree.py",
    "src/composefs/errors.py",
    "src/composefs/dumpfile.py",
    "src/composefs/erofs/format.py",
    "src/composefs/erofs/writer.py",
    "src/composefs/erofs/reader.py",
    "src/composefs/erofs/dumptext.py",
    "src/composefs/imageinfo.py",
    "src/composefs/fsverity.py",
    "src/composefs/scan.py",
]

ext_modules = []
if os.environ.get("COMPOSEFS_MYPYC") == "1":
    from mypyc.build import mypycify

    ext_modules = mypycify(COMPILED_MODULES, opt_level="3")

setup(ext_modules=ext_modules)
