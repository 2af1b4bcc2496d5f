"""OCI image documents: manifests, indexes, configs, descriptors; platforms; verified blobs.

Docker's v2 schema 2 documents are read as their OCI equivalents (the fields we use are
the same).  Every blob is read through :class:`VerifiedReader`, which fails at its end if
the bytes do not have the digest they were asked for, so nothing unverified is kept.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass
from typing import IO, Any

from composefs.errors import ComposefsError

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
REF_NAME = "org.opencontainers.image.ref.name"
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
MAX_DOCUMENT = 4 << 20  # manifests, indexes and configs are small; refuse anything huge


class OciError(ComposefsError):
    """A bad or unusable OCI document, blob or source; the message names it."""


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: str | None = None  # os/arch[/variant], for index entries
    annotations: dict[str, str] | None = None

    @classmethod
    def parse(cls, d: Any, where: str) -> Descriptor:
        if not isinstance(d, dict):
            raise OciError(f"{where}: a descriptor is not an object")
        digest, size = d.get("digest"), d.get("size")
        if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
            raise OciError(f"{where}: unsupported or malformed digest {digest!r}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise OciError(f"{where}: bad size {size!r} for {digest}")
        p = d.get("platform")
        plat = None
        if isinstance(p, dict):
            plat = "/".join(
                str(x) for x in (p.get("os"), p.get("architecture"), p.get("variant")) if x
            )
        annotations = d.get("annotations")
        return cls(
            str(d.get("mediaType", "")),
            digest,
            size,
            plat,
            annotations if isinstance(annotations, dict) else None,
        )


@dataclass(frozen=True)
class Manifest:
    """A single-platform image manifest: its config and its layers, bottom first."""

    raw: bytes
    digest: str
    config: Descriptor
    layers: tuple[Descriptor, ...]

    @classmethod
    def parse(cls, raw: bytes, digest: str) -> Manifest:
        doc = load_json(raw, f"manifest {digest}")
        media = doc.get("mediaType")
        if media in INDEX_TYPES or "manifests" in doc:
            raise OciError(f"manifest {digest}: is an index, not an image manifest")
        if doc.get("schemaVersion") != 2:
            raise OciError(f"manifest {digest}: unsupported schemaVersion")
        layers = doc.get("layers")
        if not isinstance(layers, list):
            raise OciError(f"manifest {digest}: no layers")
        return cls(
            raw,
            digest,
            Descriptor.parse(doc.get("config"), f"manifest {digest}"),
            tuple(Descriptor.parse(x, f"manifest {digest}") for x in layers),
        )


def load_json(raw: bytes, what: str) -> dict[str, Any]:
    if len(raw) > MAX_DOCUMENT:
        raise OciError(f"{what}: {len(raw)} bytes, too large for an OCI document")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise OciError(f"{what}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise OciError(f"{what}: not a JSON object")
    return doc


def is_index(raw: bytes, media_type: str | None = None) -> bool:
    if media_type in INDEX_TYPES:
        return True
    if media_type in MANIFEST_TYPES:
        return False
    try:
        doc = json.loads(raw)
    except ValueError:
        return False
    return isinstance(doc, dict) and (
        doc.get("mediaType") in INDEX_TYPES or isinstance(doc.get("manifests"), list)
    )


def index_entries(raw: bytes, what: str) -> list[Descriptor]:
    doc = load_json(raw, what)
    entries = doc.get("manifests")
    if not isinstance(entries, list):
        raise OciError(f"{what}: an index without manifests")
    return [Descriptor.parse(e, what) for e in entries]


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class VerifiedReader(io.RawIOBase):
    """Reads ``raw`` through, and fails at its end unless exactly ``size`` bytes (when
    known) with the expected sha256 ``digest`` came."""

    def __init__(self, raw: IO[bytes], digest: str, size: int | None, what: str) -> None:
        if not _DIGEST.fullmatch(digest):
            raise OciError(f"{what}: unsupported digest {digest}")
        self.raw = raw
        self.expected = digest
        self.size = size
        self.what = what
        self.hash = hashlib.sha256()
        self.count = 0
        self.checked = False

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self.raw.read(len(b))
        if data:
            self.count += len(data)
            if self.size is not None and self.count > self.size:
                raise OciError(f"{self.what}: more than the {self.size} bytes announced")
            self.hash.update(data)
            b[: len(data)] = data
            return len(data)
        if not self.checked:
            self.checked = True
            if self.size is not None and self.count != self.size:
                raise OciError(f"{self.what}: {self.count} bytes, {self.size} announced")
            got = "sha256:" + self.hash.hexdigest()
            if got != self.expected:
                raise OciError(f"{self.what}: content has digest {got}, expected {self.expected}")
        return 0

    def close(self) -> None:
        self.raw.close()
        super().close()


def read_verified(raw: IO[bytes], digest: str, size: int | None, what: str) -> bytes:
    """A whole small blob (a manifest, a config), checked; bounded by MAX_DOCUMENT."""
    if size is not None and size > MAX_DOCUMENT:
        raise OciError(f"{what}: {size} bytes, too large for an OCI document")
    reader = VerifiedReader(raw, digest, size, what)
    chunks: list[bytes] = []
    total = 0
    while chunk := reader.read(1 << 16):  # the empty read at the end checks the digest
        total += len(chunk)
        if total > MAX_DOCUMENT:
            raise OciError(f"{what}: too large for an OCI document")
        chunks.append(chunk)
    return b"".join(chunks)


def diff_ids(config: bytes, what: str) -> list[str]:
    doc = load_json(config, what)
    rootfs = doc.get("rootfs")
    ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(ids, list) or not all(
        isinstance(i, str) and _DIGEST.fullmatch(i) for i in ids
    ):
        raise OciError(f"{what}: rootfs.diff_ids missing or malformed")
    return list(ids)
