"""Pull an OCI image into a repository: layers into objects and one composefs image.

For each layer, bottom first: if the repository has a *layer record* for its diff_id
(the layer's headers with files named by digest, kept from an earlier pull) and every
object it names, the layer is replayed from it and not fetched at all.  Otherwise its
blob is streamed: digest checked as it arrives, decompressed (bounded), its uncompressed
digest checked against the config's diff_id, every file's content written to the object
store as it passes, and a new record kept.  Nothing touches the disk outside the
repository, and nothing is extracted.

The image is then written from the tree; the manifest, the config and the records are
stored as objects, and the OCI ref (by default the source reference) names a JSON record
of all of it, which is what keeps it alive through gc.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from composefs.objects import ObjectStore, ObjectWriter
from composefs.oci.compression import CountingReader, open_layer
from composefs.oci.image import Descriptor, OciError, diff_ids, read_verified
from composefs.oci.layer import (
    RecordEntries,
    apply_layer,
    apply_record,
    new_tree,
    parse_record,
    record_objects,
)
from composefs.oci.registry import default_platform
from composefs.oci.sources import Source, open_source
from composefs.repository import Repository

RECORD_FORMAT = "composefs-py oci image record"

# (layer index, layer count, compressed bytes so far, total or None); called often
LayerProgress = Callable[[int, int, int, int | None], None]


@dataclass
class PullResult:
    name: str
    image_id: str
    manifest_digest: str
    config_digest: str
    platform: str
    layers_fetched: int = 0
    layers_reused: int = 0
    bytes_fetched: int = 0
    objects_added: int = 0
    objects_reused: int = 0
    layers: list[dict[str, Any]] = field(default_factory=list)


class _Sha256(io.RawIOBase):
    """The uncompressed layer as it passes, hashed for its diff_id."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.hash = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self.raw.read(len(b))
        b[: len(data)] = data
        self.hash.update(data)
        return len(data)


def pull(
    repo: Repository,
    source: str | Source,
    name: str | None = None,
    *,
    platform: str | None = None,
    creds: tuple[str, str] | None = None,
    tls_verify: bool = True,
    progress: LayerProgress | None = None,
) -> PullResult:
    """Pull ``source`` (a skopeo-style reference, or an open :class:`Source`) into
    ``repo`` under the OCI ref ``name`` (default: the reference as given)."""
    if isinstance(source, str):
        src = open_source(source, creds=creds, tls_verify=tls_verify)
    else:
        src = source
    name = name or src.name
    platform = platform or default_platform()
    with src, repo.lock():
        repo._writable()
        manifest = src.manifest(platform)
        config = read_verified(
            src.blob(manifest.config), manifest.config.digest, manifest.config.size, "config"
        )
        ids = diff_ids(config, f"{src.name}: config {manifest.config.digest}")
        if len(ids) != len(manifest.layers):
            raise OciError(f"{src.name}: {len(manifest.layers)} layers, but the config lists "
                           f"{len(ids)} diff_ids")  # fmt: skip
        result = PullResult(name, "", manifest.digest, manifest.config.digest, platform)
        tree = new_tree()
        writer = ObjectWriter(ObjectStore(repo.objects, create=False), require_verity=repo.secure)
        new_records: list[tuple[str, bytes]] = []  # (diff_id, record) to store after objects
        reused: list[str] = []
        reused_lists: list[str] = []
        try:
            for i, (desc, diff_id) in enumerate(zip(manifest.layers, ids, strict=True)):
                what = f"{src.name}: layer {i + 1}/{len(ids)} {desc.digest}"
                usable = _usable_record(repo, writer, diff_id)
                if usable is not None:
                    record_id, entries, digests = usable
                    apply_record(tree, entries, name=what)
                    reused.append(record_id)
                    reused_lists.append(repo.put_object(b"".join(sorted(digests))))
                    result.layers_reused += 1
                    result.layers.append({"digest": desc.digest, "diff_id": diff_id,
                                          "record": record_id, "fetched": False})  # fmt: skip
                    continue
                record = _fetch_layer(src, desc, diff_id, tree, writer, what, i, len(ids), progress)
                new_records.append((diff_id, record))
                result.layers_fetched += 1
                result.bytes_fetched += desc.size
                result.layers.append({"digest": desc.digest, "diff_id": diff_id,
                                      "fetched": True})  # fmt: skip
            writer.commit()  # objects durable before anything names them
        except BaseException:
            writer.abort()
            raise
        result.objects_added, result.objects_reused = writer.added, writer.reused
        records = {}
        lists = []
        for diff_id, record in new_records:
            records[diff_id] = repo.put_object(_compress(record))
            repo.set_layer_record(diff_id, records[diff_id])
            lists.append(_object_list(repo, record))
        lists += reused_lists
        for entry in result.layers:
            entry.setdefault("record", records.get(entry["diff_id"]))
        manifest_id = repo.put_object(manifest.raw)
        config_id = repo.put_object(config)
        image = repo.commit_tree(tree)
        result.image_id = image.image_id
        doc = {
            "format": RECORD_FORMAT,
            "version": 1,
            "source": src.name,
            "platform": platform,
            "manifest_digest": manifest.digest,
            "config_digest": manifest.config.digest,
            "image": image.image_id,
            "manifest": manifest_id,
            "config": config_id,
            "layers": result.layers,
            "objects": sorted({manifest_id, config_id, *records.values(), *reused}),
            # every file of every layer, hidden ones too, so a later pull can replay them
            "object_lists": sorted(set(lists)),
        }
        record_id = repo.put_object(json.dumps(doc, indent=1, sort_keys=True).encode())
        repo.set_oci_ref(name, record_id)
    return result


def _usable_record(
    repo: Repository, writer: ObjectWriter, diff_id: str
) -> tuple[str, RecordEntries, set[bytes]] | None:
    """A cached record for ``diff_id`` whose objects are all present, else None."""
    record_id = repo.layer_record(diff_id)
    if record_id is None:
        return None
    try:
        entries = parse_record(_record_bytes(repo, record_id))
        digests = record_objects(entries)
    except Exception:  # a damaged cache entry of any kind (zstd, JSON, object): refetch
        return None
    if not all(writer.contains(d) for d in digests):
        return None
    return record_id, entries, digests


def _object_list(repo: Repository, record: bytes) -> str:
    """Store the digests a layer record names, concatenated, as an object gc can read."""
    return repo.put_object(b"".join(sorted(record_objects(record))))


def _record_bytes(repo: Repository, record_id: str) -> bytes:
    import zstandard

    data = repo.read_object(record_id)
    return zstandard.ZstdDecompressor().decompress(data, max_output_size=1 << 30)


def _compress(record: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor(level=10).compress(record)


def _fetch_layer(
    src: Source,
    desc: Descriptor,
    diff_id: str,
    tree: Any,
    writer: ObjectWriter,
    what: str,
    index: int,
    count: int,
    progress: LayerProgress | None,
) -> bytes:
    size = desc.size or None

    def report(n: int) -> None:
        if progress is not None:
            progress(index, count, n, size)

    raw = io.BufferedReader(CountingReader(src.blob(desc), report=report), 1 << 18)
    hashed = _Sha256(open_layer(raw, name=what))
    stream = io.BufferedReader(hashed, 1 << 18)
    out = io.BytesIO()
    apply_layer(tree, stream, writer, name=what, record=out)
    while stream.read(1 << 18):  # the tar's end padding, for the diff_id
        pass
    while raw.read(1 << 18):  # anything after the compressed stream, for the digest check
        pass
    got = "sha256:" + hashed.hash.hexdigest()
    if got != diff_id:
        raise OciError(f"{what}: uncompressed content has digest {got}, the config says {diff_id}")
    return out.getvalue()
