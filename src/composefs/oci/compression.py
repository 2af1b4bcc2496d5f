"""Layer blobs decompressed as they stream: gzip, zstd or plain tar, told by their magic.

The media type is not trusted to say which (registries and archives get it wrong); the
first bytes are.  Output is bounded against decompression bombs: a layer may expand at
most ``max_ratio`` times its compressed size once past ``floor`` bytes, and never beyond
``max_size``; past that the stream fails, naming the layer, before anything is stored
under a name.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable
from typing import IO, Any

from composefs.errors import ComposefsError

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
MAX_RATIO = 1000  # ordinary layers compress 2-10x; sparse images may reach a few hundred
FLOOR = 256 << 20  # small layers may expand as much as they like below this
MAX_SIZE = 1 << 40
_CHUNK = 1 << 18


class DecompressionError(ComposefsError):
    """A layer could not be decompressed, or expands beyond the limits."""


class CountingReader(io.RawIOBase):
    """A stream counting what is read through it (and telling ``report`` the total);
    ``first``, bytes already taken from ``raw`` to look at, are put back in front."""

    def __init__(
        self, raw: IO[bytes], first: bytes = b"", report: Callable[[int], None] | None = None
    ) -> None:
        self.raw = raw
        self.first = first
        self.count = 0
        self.report = report

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self.first:
            data, self.first = self.first[: len(b)], self.first[len(b) :]
        else:
            data = self.raw.read(len(b))
        b[: len(data)] = data
        self.count += len(data)
        if self.report is not None:
            self.report(self.count)
        return len(data)


class _Decompressed(io.RawIOBase):
    def __init__(
        self, raw: IO[bytes], name: str, kind: str, first: bytes, max_ratio: int, max_size: int
    ) -> None:
        self.input = CountingReader(raw, first)
        self.name = name
        self.kind = kind
        self.max_ratio = max_ratio
        self.max_size = max_size
        self.produced = 0
        self.tail = b""  # gzip input not yet consumed
        self.done = False
        self.zlib = zlib.decompressobj(wbits=31)
        self.zstd: Any = None
        if kind == "zstd":
            import zstandard

            source: Any = self.input  # a readable stream, as stream_reader wants
            self.zstd = zstandard.ZstdDecompressor().stream_reader(source, read_across_frames=True)

    def readable(self) -> bool:
        return True

    def _gzip(self, want: int) -> bytes:
        while not self.done:
            data = self.tail or self.input.read(_CHUNK)
            if not data:
                if not self.zlib.eof:
                    raise DecompressionError(f"{self.name}: gzip stream ends early")
                return b""
            try:
                out = self.zlib.decompress(data, want)
            except zlib.error as e:
                raise DecompressionError(f"{self.name}: corrupt gzip data: {e}") from None
            self.tail = self.zlib.unconsumed_tail
            if self.zlib.eof:
                # concatenated members (multistream gzip) go on; other trailing bytes
                # (zero padding) are not data
                rest = self.zlib.unused_data + self.tail or self.input.read(_CHUNK)
                if not rest.startswith(GZIP_MAGIC):
                    self.done = True
                    return out
                self.tail = rest
                self.zlib = zlib.decompressobj(wbits=31)
            if out:
                return out
        return b""

    def _zstd(self, want: int) -> bytes:
        try:
            out: bytes = self.zstd.read(want)
        except Exception as e:  # zstandard.ZstdError
            raise DecompressionError(f"{self.name}: corrupt zstd data: {e}") from None
        return out

    def readinto(self, b: Any) -> int:
        want = len(b)
        if self.kind == "gzip":
            out = self._gzip(want)
        elif self.kind == "zstd":
            out = self._zstd(want)
        else:
            return self.input.readinto(b)
        n = len(out)
        b[:n] = out
        self.produced += n
        limit = min(max(FLOOR, self.input.count * self.max_ratio), self.max_size)
        if self.produced > limit:
            raise DecompressionError(
                f"{self.name}: expands to over {self.produced} bytes from {self.input.count} "
                f"(more than {self.max_ratio}x: a decompression bomb?)"
            )
        return n


def open_layer(
    raw: IO[bytes], *, name: str, max_ratio: int = MAX_RATIO, max_size: int = MAX_SIZE
) -> IO[bytes]:
    """The uncompressed tar stream of a layer blob read from ``raw``."""
    first = raw.read(4)
    if first.startswith(GZIP_MAGIC):
        kind = "gzip"
    elif first.startswith(ZSTD_MAGIC):
        kind = "zstd"
    else:
        kind = "tar"
    return io.BufferedReader(_Decompressed(raw, name, kind, first, max_ratio, max_size), _CHUNK)
