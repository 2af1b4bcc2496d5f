"""What composefs-info prints about images: listings, dumps and object lists.

Kept apart from the CLI so scripts can call the same functions; every function returns or
yields ``bytes`` lines exactly as the reference tool prints them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator

from composefs.dumpfile import escape, escape_match, iter_lines
from composefs.erofs.dumptext import dump_text
from composefs.erofs.reader import Image
from composefs.tree import S_IFDIR, S_IFLNK, S_IFMT, S_IFREG, Tree

# `ls` escapes like the dump format, but leaves spaces alone (printable, not graphic).
_LS_PATH = re.compile(rb"[^\x20-\x5b\x5d-\x7e]")


def ls_lines(tree: Tree) -> Iterator[bytes]:
    """``composefs-info ls``: every entry below the root, depth-first in name order.

    Directories end in ``/`` and a tab, symlinks show ``-> target``, files backed by an
    object ``@ path``; a further name of a hardlinked inode shows the name alone.
    """
    seen: set[int] = set()
    sub_path = _LS_PATH.sub
    for path, node in tree.walk():
        if node is tree.root and path == b"/":
            continue
        name = sub_path(escape_match, path)
        if id(node) in seen:
            yield name + b"\n"
            continue
        seen.add(id(node))
        ftype = node.mode & S_IFMT
        if ftype == S_IFDIR:
            yield name + b"/\t\n"
        elif ftype == S_IFLNK:
            yield name + b"\t-> " + escape(node.payload or b"") + b"\n"
        elif ftype == S_IFREG and node.payload is not None:
            yield name + b"\t@ " + escape(node.payload) + b"\n"
        else:
            yield name + b"\n"


def dump_lines(tree: Tree) -> Iterator[bytes]:
    """``composefs-info dump``: the composefs-dump(5) text of the tree."""
    return iter_lines(tree)


def dump_image(image: Image, filter: Iterable[bytes] | None = None) -> Iterable[bytes]:
    """``composefs-info dump`` of an image: ``dump_lines(image.to_tree(filter=filter))``,
    read straight from the image when it can (:func:`dumptext.dump_text`)."""
    return dump_text(image, filter=filter)


def object_paths(tree: Tree) -> set[bytes]:
    """Backing-file paths (payloads of regular files) referenced by a tree."""
    return {
        node.payload
        for _path, node in tree.walk()
        if node.payload is not None and node.mode & S_IFMT == S_IFREG
    }


def missing_objects(objects: Iterable[bytes], basedir: str | os.PathLike[str]) -> set[bytes]:
    """The object paths that do not exist below ``basedir``."""
    fd = os.open(basedir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_PATH)
    try:
        missing = set()
        for obj in objects:
            rel = obj.lstrip(b"/") or b"."
            try:
                os.stat(rel, dir_fd=fd)
            except OSError:
                missing.add(obj)
        return missing
    finally:
        os.close(fd)


def object_lines(objects: Iterable[bytes]) -> Iterator[bytes]:
    """Sorted byte-wise, one per line, unescaped (as the reference prints them)."""
    for obj in sorted(objects):
        yield obj + b"\n"
