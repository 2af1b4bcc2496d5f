"""OCI image layouts and archives written by hand for tests (no tool needed)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"

Entry = tuple[tarfile.TarInfo, bytes | None]


def entry(name: str, data: bytes | None = None, *, kind: bytes = tarfile.REGTYPE,
          mode: int | None = None, linkname: str = "", mtime: int = 1700000000) -> Entry:  # fmt: skip
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mtime = mtime
    info.mode = mode if mode is not None else (0o755 if kind == tarfile.DIRTYPE else 0o644)
    info.linkname = linkname
    if data is not None:
        info.size = len(data)
    return info, data


def layer_tar(entries: list[Entry]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _compress(tar: bytes, media: str) -> bytes:
    if media == LAYER_GZIP:
        return gzip.compress(tar, mtime=0)
    if media == LAYER_ZSTD:
        import zstandard

        return zstandard.ZstdCompressor().compress(tar)
    return tar


def write_layout(root: Path, layers: list[bytes], *, tag: str = "latest",
                 media: str = LAYER_GZIP, arch: str = "amd64") -> str:  # fmt: skip
    """An OCI layout at ``root`` (added to if it exists) holding an image of ``layers``
    (uncompressed tars, bottom first) under ``tag``; returns the manifest digest."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> str:
        d = _digest(data)
        (blobs / d[7:]).write_bytes(data)
        return d

    config = json.dumps({
        "architecture": arch, "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [_digest(t) for t in layers]},
        "config": {},
    }).encode()  # fmt: skip
    descs = []
    for t in layers:
        blob = _compress(t, media)
        descs.append({"mediaType": media, "digest": put(blob), "size": len(blob)})
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": put(config), "size": len(config)},
        "layers": descs,
    }).encode()  # fmt: skip
    mdigest = put(manifest)
    index_path = root / "index.json"
    index = (
        json.loads(index_path.read_text())
        if index_path.exists()
        else {"schemaVersion": 2, "manifests": []}
    )
    index["manifests"].append({
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": mdigest,
        "size": len(manifest), "annotations": {"org.opencontainers.image.ref.name": tag},
        "platform": {"os": "linux", "architecture": arch},
    })  # fmt: skip
    index_path.write_text(json.dumps(index))
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return mdigest


def write_docker_archive(path: Path, layers: list[bytes], repo_tag: str) -> None:
    """``docker save``-style archive (legacy layout: ``<id>/layer.tar``)."""
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [_digest(t) for t in layers]},
    }).encode()  # fmt: skip
    files: dict[str, bytes] = {f"{_digest(config)[7:]}.json": config}
    names = []
    for i, t in enumerate(layers):
        files[f"layer{i}/layer.tar"] = t
        names.append(f"layer{i}/layer.tar")
    files["manifest.json"] = json.dumps(
        [{"Config": f"{_digest(config)[7:]}.json", "RepoTags": [repo_tag], "Layers": names}]
    ).encode()
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def tar_directory(src: Path, out: Path) -> None:
    with tarfile.open(out, "w") as tar:
        for p in sorted(src.rglob("*")):
            tar.add(p, arcname=str(p.relative_to(src)), recursive=False)
