"""The exception family of composefs-py.

Every error the package raises on bad input derives from :class:`ComposefsError`, so a
caller can catch one class; the command-line tools map it to one line on stderr and a
non-zero exit status.  The subclasses say *what* was wrong and carry the data to say
*where* (file and line, image offset, path in the tree).
"""

from __future__ import annotations

import errno as _errno
import os


class ComposefsError(Exception):
    """Root of every error raised by composefs-py for bad input or state."""


class DumpfileError(ComposefsError, ValueError):
    """A composefs-dump(5) file could not be parsed.

    ``message`` is the reference implementation's wording (scripts may match it);
    ``line`` is the 1-based line number, or ``None`` for errors about the whole file.
    """

    def __init__(self, message: str, *, line: int | None = None, source: str | None = None):
        self.message = message
        self.line = line
        self.source = source
        super().__init__(message)

    def __str__(self) -> str:
        where = self.source or "<dump>"
        if self.line is not None:
            return f"{where}:{self.line}: {self.message}"
        return f"{where}: {self.message}"


class TreeError(ComposefsError, ValueError):
    """A tree violates a rule of the model (bad name, bad mode, xattr over budget...).

    ``errno`` is the error number the reference library would report for the same
    condition, so that write-time failures print the same text ("File too large").
    """

    def __init__(self, err: int, detail: str | None = None, path: bytes | None = None):
        self.errno = err
        self.detail = detail
        self.path = path
        super().__init__(self.describe())

    def describe(self) -> str:
        text = os.strerror(self.errno)
        if self.detail:
            text = f"{text} ({self.detail})"
        if self.path is not None:
            text = f"{text}: {self.path.decode('utf-8', 'backslashreplace')}"
        return text


class XattrError(TreeError):
    """An extended attribute name or value is invalid, or a node's xattrs exceed the budget."""

    def __init__(self, detail: str, path: bytes | None = None, err: int = _errno.ERANGE):
        super().__init__(err, detail, path)


class FormatError(ComposefsError, ValueError):
    """An image is not a valid composefs image (bad magic, truncated, corrupt, unsupported).

    ``offset`` is the byte offset in the image where the problem was found, when known.
    """

    def __init__(self, message: str, *, offset: int | None = None):
        self.message = message
        self.offset = offset
        super().__init__(message if offset is None else f"{message} (at offset {offset:#x})")


class UnsupportedVersionError(FormatError):
    """The image uses a format version this implementation does not understand."""
