"""Where OCI images come from: registries, image layouts, OCI and Docker archives.

Every source gives the same two things: the manifest of the image for one platform, and
blobs as streams that check their own digest.  ``SOURCE`` strings follow skopeo's
transports: ``docker://HOST[:PORT]/REPO[:TAG|@DIGEST]``, ``oci:DIR[:TAG]``,
``oci-archive:FILE[:TAG]``, ``docker-archive:FILE[:REPO:TAG]``.
"""

from __future__ import annotations

import json
import os
import tarfile
from abc import ABC, abstractmethod
from typing import IO

from composefs.oci.image import (
    DOCKER_MANIFEST,
    REF_NAME,
    Descriptor,
    Manifest,
    OciError,
    VerifiedReader,
    index_entries,
    is_index,
    load_json,
    read_verified,
    sha256_digest,
)
from composefs.oci.registry import select_platform

LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
CONFIG = "application/vnd.oci.image.config.v1+json"


class Source(ABC):
    """An image source; ``name`` is the reference it was opened with."""

    name: str

    @abstractmethod
    def manifest(self, platform: str) -> Manifest:
        """The image manifest for ``platform`` (``os/arch[/variant]``)."""

    @abstractmethod
    def blob(self, desc: Descriptor) -> IO[bytes]:
        """The blob's bytes, as a stream that fails at its end unless they match."""

    def close(self) -> None:
        return None

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fetch_manifest(self, desc: Descriptor) -> tuple[bytes, str | None]:
        """A manifest or index an index names: (its bytes, checked; its media type if
        known).  Layouts and archives keep them as blobs; registries override this."""
        return read_verified(self.blob(desc), desc.digest, desc.size, desc.digest), None

    def _resolve(
        self, raw: bytes, digest: str, platform: str, media_type: str | None = None
    ) -> Manifest:
        """Follow an index down to the manifest for ``platform``."""
        for _depth in range(4):  # an index of indexes is allowed, a loop is not
            if not is_index(raw, media_type):
                return Manifest.parse(raw, digest)
            index_entries(raw, f"{self.name}: index {digest}")  # checks every descriptor
            chosen = Descriptor.parse(select_platform(raw, platform), f"{self.name}: index")
            raw, media_type = self._fetch_manifest(chosen)
            digest = chosen.digest
        raise OciError(f"{self.name}: indexes nested too deep")


class LayoutSource(Source):
    """An OCI image layout directory (``index.json``, ``blobs/sha256/…``)."""

    def __init__(self, root: str, tag: str | None, name: str) -> None:
        self.root = root
        self.tag = tag
        self.name = name

    def _open(self, rel: str) -> IO[bytes]:
        try:
            return open(os.path.join(self.root, rel), "rb")
        except OSError as e:
            raise OciError(f"{self.name}: {rel}: {e.strerror}") from None

    def blob(self, desc: Descriptor) -> IO[bytes]:
        hexd = desc.digest.removeprefix("sha256:")
        return _buffered(
            VerifiedReader(self._open(f"blobs/sha256/{hexd}"), desc.digest, desc.size, desc.digest)
        )

    def manifest(self, platform: str) -> Manifest:
        with self._open("index.json") as f:
            index = f.read(4 << 20)
        chosen = _by_tag(index_entries(index, f"{self.name}: index.json"), self.tag, self.name)
        raw, _type = self._fetch_manifest(chosen)
        return self._resolve(raw, chosen.digest, platform)


class OciArchiveSource(LayoutSource):
    """A tar of an OCI image layout (``oci-archive:``); read in place, not unpacked."""

    def __init__(self, path: str, tag: str | None, name: str) -> None:
        super().__init__(path, tag, name)
        self.tar, self.members = _open_archive(path, name)

    def _open(self, rel: str) -> IO[bytes]:
        member = self.members.get(rel)
        f = self.tar.extractfile(member) if member is not None else None
        if f is None:
            raise OciError(f"{self.name}: {rel} is not in the archive")
        return f

    def close(self) -> None:
        self.tar.close()


class DockerArchiveSource(Source):
    """``docker save`` output: ``manifest.json``, a config and layer tars.  There is no
    registry manifest, so one is made (its ``layers`` are the tars, named by their own
    digests; the pull checks each one's uncompressed digest against the config)."""

    def __init__(self, path: str, ref: str | None, name: str) -> None:
        self.name = name
        self.ref = ref
        self.tar, self.members = _open_archive(path, name)
        self.paths: dict[str, str] = {}  # blob digest -> member name

    def _read(self, rel: str, limit: int = 4 << 20) -> bytes:
        member = self.members.get(rel)
        f = self.tar.extractfile(member) if member is not None else None
        if f is None:
            raise OciError(f"{self.name}: {rel} is not in the archive")
        data = f.read(limit + 1)
        if len(data) > limit:
            raise OciError(f"{self.name}: {rel} is too large")
        return data

    def manifest(self, platform: str) -> Manifest:
        try:
            entries = json.loads(self._read("manifest.json"))
        except ValueError as err:
            raise OciError(f"{self.name}: manifest.json is not JSON ({err})") from None
        if not isinstance(entries, list) or not entries:
            raise OciError(f"{self.name}: manifest.json lists no image")
        chosen = None
        for e in entries:
            tags = e.get("RepoTags") or [] if isinstance(e, dict) else []
            if self.ref is None or self.ref in tags:
                chosen = e
                break
        if chosen is None or (self.ref is None and len(entries) > 1):
            raise OciError(f"{self.name}: say which image (the archive has several, or not "
                           f"{self.ref})")  # fmt: skip
        config_path, layer_paths = chosen.get("Config"), chosen.get("Layers")
        if not isinstance(config_path, str) or not isinstance(layer_paths, list):
            raise OciError(f"{self.name}: manifest.json entry without Config or Layers")
        config = self._read(config_path)
        load_json(config, f"{self.name}: {config_path}")
        config_desc = Descriptor(CONFIG, sha256_digest(config), len(config))
        self.paths[config_desc.digest] = config_path
        layers = []
        for p in layer_paths:
            member = self.members.get(str(p))
            if member is None:
                raise OciError(f"{self.name}: layer {p} is not in the archive")
            digest = _digest_of_path(str(p)) or self._hash_member(member)
            self.paths[digest] = str(p)
            layers.append(Descriptor(LAYER_TAR, digest, member.size))
        doc = {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": {"mediaType": CONFIG, "digest": config_desc.digest, "size": len(config)},
            "layers": [{"mediaType": d.media_type, "digest": d.digest, "size": d.size}
                       for d in layers],
        }  # fmt: skip
        raw = json.dumps(doc, indent=2).encode()
        return Manifest(raw, sha256_digest(raw), config_desc, tuple(layers))

    def _hash_member(self, member: tarfile.TarInfo) -> str:
        import hashlib

        f = self.tar.extractfile(member)
        assert f is not None
        h = hashlib.sha256()
        while chunk := f.read(1 << 20):
            h.update(chunk)
        return "sha256:" + h.hexdigest()

    def blob(self, desc: Descriptor) -> IO[bytes]:
        path = self.paths.get(desc.digest)
        member = self.members.get(path) if path is not None else None
        f = self.tar.extractfile(member) if member is not None else None
        if f is None:
            raise OciError(f"{self.name}: no blob {desc.digest} in the archive")
        return _buffered(VerifiedReader(f, desc.digest, desc.size, desc.digest))

    def close(self) -> None:
        self.tar.close()


def _open_archive(path: str, name: str) -> tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]:
    """An archive opened for the source's life, and its files by name (``./`` dropped)."""
    try:
        tar = tarfile.open(path, "r:*")  # noqa: SIM115 (closed by the source)
        return tar, {m.name.removeprefix("./"): m for m in tar.getmembers() if m.isreg()}
    except (OSError, tarfile.TarError) as e:
        raise OciError(f"{name}: cannot read the archive: {e}") from None


def _digest_of_path(path: str) -> str | None:
    """Newer ``docker save`` names blobs ``blobs/sha256/<hex>``: the name is the digest."""
    if path.startswith("blobs/sha256/") and len(path) == 13 + 64:
        return "sha256:" + path[13:]
    return None


def _by_tag(entries: list[Descriptor], tag: str | None, name: str) -> Descriptor:
    if tag is None:
        if len(entries) == 1:
            return entries[0]
        raise OciError(f"{name}: the layout holds {len(entries)} images; give a tag")
    for e in entries:
        if (e.annotations or {}).get(REF_NAME) == tag:
            return e
    tags = sorted((e.annotations or {}).get(REF_NAME, "?") for e in entries)
    raise OciError(f"{name}: no image tagged '{tag}' (tags: {', '.join(tags)})")


def _buffered(raw: VerifiedReader) -> IO[bytes]:
    import io

    return io.BufferedReader(raw, 1 << 18)


def _split_path(rest: str) -> tuple[str, str | None]:
    """``PATH[:REF]`` where PATH may itself hold colons: the longest existing prefix."""
    if os.path.exists(rest):
        return rest, None
    cut = len(rest)
    while (cut := rest.rfind(":", 0, cut)) > 0:
        if os.path.exists(rest[:cut]):
            return rest[:cut], rest[cut + 1 :] or None
    return rest, None


def open_source(
    spec: str,
    *,
    creds: tuple[str, str] | None = None,
    tls_verify: bool = True,
) -> Source:
    """Open an image source named the way skopeo names them."""
    transport, sep, rest = spec.partition(":")
    if not sep:
        raise OciError(f"'{spec}': say where the image is (docker://, oci:, oci-archive:, "
                       "docker-archive:)")  # fmt: skip
    if transport == "docker":
        from composefs.oci.remote import RegistrySource

        return RegistrySource(rest.removeprefix("//"), spec, creds=creds, tls_verify=tls_verify)
    if transport not in ("oci", "oci-archive", "docker-archive"):
        raise OciError(f"'{spec}': unknown transport '{transport}'")
    path, ref = _split_path(rest)
    if not os.path.exists(path):
        raise OciError(f"{spec}: {path}: no such file or directory")
    if transport == "oci":
        return LayoutSource(path, ref, spec)
    if transport == "oci-archive":
        return OciArchiveSource(path, ref, spec)
    return DockerArchiveSource(path, ref, spec)
