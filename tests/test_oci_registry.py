"""The registry client: references, platforms, and pulls from a real registry.

The real one is ``docker-registry`` (tests/registry.py), with images built by umoci and
pushed by skopeo: anonymous and basic-auth pulls, OCI and Docker media types, an index of
two platforms, blobs tampered with in the registry's storage.  Bearer tokens, redirects to
"object storage" and broken transfers are tested against small http.server *stubs* in this
file: the reference registry does token auth only with TLS certificates.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import tarfile
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from registry import (
    USER,
    Layer,
    LocalRegistry,
    build_image,
    layout_blob,
    manifest_digest,
    run_registry,
    sha256,
)

import composefs.oci.registry as registry_module
from composefs.errors import ComposefsError
from composefs.oci import registry as reg_mod
from composefs.oci.registry import (
    MEDIA_DOCKER_LIST,
    MEDIA_DOCKER_MANIFEST,
    MEDIA_OCI_INDEX,
    MEDIA_OCI_MANIFEST,
    ImageReference,
    RegistryClient,
    RegistryError,
    default_platform,
    parse_challenges,
    parse_platform,
    parse_reference,
    select_platform,
)

DIGEST_A = "sha256:" + "a" * 64

# ---------------------------------------------------------------------------- references


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("docker://alpine", ImageReference("docker.io", "library/alpine", "latest")),
        ("alpine:3.20", ImageReference("docker.io", "library/alpine", "3.20")),
        ("docker://docker.io/alpine", ImageReference("docker.io", "library/alpine", "latest")),
        ("index.docker.io/foo/bar:x", ImageReference("docker.io", "foo/bar", "x")),
        ("docker://foo/bar", ImageReference("docker.io", "foo/bar", "latest")),
        ("docker://localhost/app", ImageReference("localhost", "app", "latest")),
        (
            "docker://127.0.0.1:5000/team/app:v1.2-rc_3",
            ImageReference("127.0.0.1:5000", "team/app", "v1.2-rc_3"),
        ),
        ("docker://quay.io/a/b/c", ImageReference("quay.io", "a/b/c", "latest")),
        ("docker://Registry/app", ImageReference("Registry", "app", "latest")),
        ("docker://[::1]:5000/app:t", ImageReference("[::1]:5000", "app", "t")),
        (f"docker://ghcr.io/o/app@{DIGEST_A}", ImageReference("ghcr.io", "o/app", None, DIGEST_A)),
        (f"ghcr.io/o/app:v1@{DIGEST_A}", ImageReference("ghcr.io", "o/app", "v1", DIGEST_A)),
    ],
)
def test_parse_reference(text: str, expected: ImageReference) -> None:
    ref = parse_reference(text)
    assert ref == expected
    assert ref.reference == (expected.digest or expected.tag)
    assert parse_reference(str(ref)) == ref


@pytest.mark.parametrize(
    "text",
    [
        "oci:/some/layout:tag",
        "docker://",
        "docker://quay.io/",
        "docker://quay.io/Upper/case",
        "docker://quay.io/app:bad/tag",
        "docker://quay.io/app@sha256:abc",
        "docker://quay.io/app@md5:" + "a" * 32,
        "docker://quay.io/../etc",
        "docker://bad_host.io/app",
    ],
)
def test_parse_reference_rejects(text: str) -> None:
    with pytest.raises(RegistryError, match="invalid image reference") as info:
        parse_reference(text)
    assert isinstance(info.value, ComposefsError)


def test_docker_hub_endpoint() -> None:
    assert RegistryClient("docker.io").endpoint == "registry-1.docker.io"
    assert RegistryClient("quay.io").endpoint == "quay.io"
    with pytest.raises(RegistryError, match="not a valid registry host"):
        RegistryClient("a/b")


def test_parse_challenges() -> None:
    values = [
        'Bearer realm="https://auth.example/token",service="registry.example",'
        'scope="repository:library/alpine:pull"',
        'Basic realm="basic \\"realm\\"", Bearer realm=https://x/t',
    ]
    assert parse_challenges(values) == [
        (
            "bearer",
            {
                "realm": "https://auth.example/token",
                "service": "registry.example",
                "scope": "repository:library/alpine:pull",
            },
        ),
        ("basic", {"realm": 'basic "realm"'}),
        ("bearer", {"realm": "https://x/t"}),
    ]


# ----------------------------------------------------------------------------- platforms


def _index(*platforms: dict[str, str]) -> dict[str, Any]:
    return {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": MEDIA_OCI_MANIFEST,
                "digest": f"sha256:{i:064x}",
                "size": 1,
                "platform": p,
            }
            for i, p in enumerate(platforms)
        ],
    }


def test_select_platform() -> None:
    index = _index(
        {"os": "unknown", "architecture": "unknown"},
        {"os": "linux", "architecture": "amd64", "variant": "v3"},
        {"os": "linux", "architecture": "amd64"},
        {"os": "linux", "architecture": "arm", "variant": "v6"},
        {"os": "linux", "architecture": "arm", "variant": "v7"},
        {"os": "linux", "architecture": "arm64", "variant": "v8"},
        {"os": "windows", "architecture": "amd64"},
    )

    def pick(platform: str | None) -> int:
        return int(select_platform(index, platform)["digest"][7:], 16)

    assert pick("linux/amd64") == 2  # the baseline before v3
    assert pick("linux/amd64/v3") == 1
    assert pick("linux/x86_64") == 2
    assert pick("linux/arm64") == 5  # no variant is v8
    assert pick("linux/aarch64") == 5
    assert pick("linux/arm64/v8") == 5
    assert pick("linux/arm") == 4  # v7 is arm's baseline
    assert pick("linux/arm/v6") == 3
    assert pick("windows/amd64") == 6
    assert select_platform(json.dumps(index).encode(), "linux/amd64")["digest"].endswith("2")
    with pytest.raises(RegistryError, match=r"no image for platform linux/s390x .*linux/arm/v7"):
        select_platform(index, "linux/s390x")
    with pytest.raises(RegistryError, match="invalid platform"):
        select_platform(index, "linux")
    with pytest.raises(RegistryError, match="no 'manifests' list"):
        select_platform({"layers": []}, "linux/amd64")


@pytest.mark.parametrize(
    ("machine", "expected"),
    [
        ("x86_64", "linux/amd64"),
        ("aarch64", "linux/arm64"),
        ("armv7l", "linux/arm/v7"),
        ("i686", "linux/386"),
        ("ppc64le", "linux/ppc64le"),
        ("s390x", "linux/s390x"),
        ("riscv64", "linux/riscv64"),
    ],
)
def test_default_platform(monkeypatch: pytest.MonkeyPatch, machine: str, expected: str) -> None:
    monkeypatch.setattr(reg_mod._platform, "machine", lambda: machine)
    monkeypatch.setattr(reg_mod._platform, "system", lambda: "Linux")
    assert default_platform() == expected
    assert str(parse_platform(expected)) == expected


def test_default_platform_selects_this_machine() -> None:
    here = parse_platform(default_platform())
    index = _index(
        {"os": "linux", "architecture": "s390x"},
        {"os": here.os, "architecture": here.architecture, "variant": here.variant},
    )
    assert select_platform(index)["digest"].endswith("1")


# ------------------------------------------------------------------ a real registry


def _layer_names(blob: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as tar:
        return [m.name for m in tar.getmembers()]


def _opaque_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in [("usr/bin/.wh..wh..opq", b""), ("usr/bin/fresh", b"fresh\n")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1700000000
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


BIG = os.urandom(300_000)  # several reads' worth, and unique to this run


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A layout with tag v1: three layers, the second deleting etc/b (a whiteout written
    by umoci), the third a tar of our own making usr/bin opaque."""
    layout = tmp_path_factory.mktemp("image") / "layout"
    build_image(
        layout,
        "v1",
        [
            Layer(
                files={
                    "etc/a": "hello\n",
                    "etc/b": "bye\n",
                    "usr/bin/tool": "tool\n",
                    "var/big": BIG,
                    "empty/": b"",
                }
            ),
            Layer(files={"etc/c": "new\n"}, delete=["etc/b"]),
            Layer(tar=_opaque_tar()),
        ],
    )
    return layout


def _pull_all(client: RegistryClient, repository: str, reference: str) -> dict[str, bytes]:
    """The manifest, config and layers by digest, each checked as it arrives."""
    manifest = client.get_manifest(repository, reference)
    doc = json.loads(manifest.data)
    out = {manifest.digest: manifest.data}
    out[doc["config"]["digest"]] = client.read_blob(repository, doc["config"]["digest"])
    for layer in doc["layers"]:
        with client.open_blob(repository, layer["digest"], size=layer["size"]) as blob:
            assert blob.size == layer["size"]
            chunks = []
            while chunk := blob.read(1 << 14):
                chunks.append(chunk)
            assert blob.verified
            out[layer["digest"]] = b"".join(chunks)
            assert blob.count == layer["size"]
        assert client.blob_size(repository, layer["digest"]) == layer["size"]
    return out


def test_anonymous_pull(registry: LocalRegistry, image: Path) -> None:
    registry.push(image, "v1", "test/app")
    ref = parse_reference(registry.reference("test/app", "v1"))
    client = registry.client()
    assert client.creds is None
    manifest = client.get_manifest(ref.repository, ref.reference)
    assert manifest.media_type == MEDIA_OCI_MANIFEST
    # skopeo pushes an OCI manifest byte for byte: the digests are the layout's
    assert manifest.digest == manifest_digest(image, "v1")
    assert manifest.data == layout_blob(image, manifest.digest)
    assert client.scheme == "http"  # tls_verify=False: https failed, plain http answered
    by_digest = client.get_manifest("test/app", manifest.digest)
    assert by_digest == manifest

    blobs = _pull_all(client, "test/app", manifest.digest)
    for digest, data in blobs.items():
        assert sha256(data) == digest
        assert data == layout_blob(image, digest)
    layers = json.loads(manifest.data)["layers"]
    assert len(layers) == 3
    first, second, third = (_layer_names(blobs[d["digest"]]) for d in layers)
    assert {"etc/a", "etc/b", "var/big"} <= {n.lstrip("./") for n in first}
    assert "etc/.wh.b" in second and "etc/c" in second
    assert third == ["usr/bin/.wh..wh..opq", "usr/bin/fresh"]
    config = json.loads(blobs[json.loads(manifest.data)["config"]["digest"]])
    assert (config["os"], config["architecture"]) == ("linux", "amd64")
    assert len(config["rootfs"]["diff_ids"]) == 3


def test_docker_media_types(registry: LocalRegistry, image: Path) -> None:
    registry.push(image, "v1", "test/docker", format="v2s2")
    client = registry.client()
    manifest = client.get_manifest("test/docker", "v1")
    assert manifest.media_type == MEDIA_DOCKER_MANIFEST
    doc = json.loads(manifest.data)
    assert doc["config"]["mediaType"] == "application/vnd.docker.container.image.v1+json"
    assert {x["mediaType"] for x in doc["layers"]} == {
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
    }
    _pull_all(client, "test/docker", "v1")


def test_hand_made_image(registry: LocalRegistry) -> None:
    """Blobs and a manifest uploaded by hand (the helpers' monolithic upload), pulled back
    by a reference with a digest."""
    import zstandard

    tar = _opaque_tar()
    layer = zstandard.ZstdCompressor().compress(tar)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [sha256(tar)]},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": registry.put_blob("test/hand", config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+zstd",
                    "digest": registry.put_blob("test/hand", layer),
                    "size": len(layer),
                }
            ],
        }
    ).encode()
    digest = registry.put_manifest("test/hand", "v1", manifest, MEDIA_OCI_MANIFEST)
    ref = parse_reference(f"{registry.host}/test/hand:v1@{digest}")
    assert ref.reference == digest
    client = registry.client()
    assert client.get_manifest(ref.repository, ref.reference) == (
        manifest,
        MEDIA_OCI_MANIFEST,
        digest,
    )
    blobs = _pull_all(client, "test/hand", "v1")
    assert blobs[sha256(layer)] == layer and blobs[sha256(config)] == config


def test_not_found_errors(registry: LocalRegistry, image: Path) -> None:
    registry.push(image, "v1", "test/app")
    client = registry.client()
    with pytest.raises(RegistryError) as info:
        client.get_manifest("test/app", "nope")
    err = info.value
    assert (err.status, err.code) == (404, "MANIFEST_UNKNOWN")
    assert str(err) == f"{registry.host}/test/app:nope: HTTP 404 Not Found: manifest unknown (MANIFEST_UNKNOWN)"  # fmt: skip
    with pytest.raises(RegistryError, match=r"/test/app@sha256:a{64}: HTTP 404 .*BLOB_UNKNOWN"):
        client.open_blob("test/app", DIGEST_A)
    with pytest.raises(RegistryError, match=r"test/none:v1: HTTP 404"):
        client.get_manifest("test/none", "v1")
    with pytest.raises(RegistryError, match=r"HTTP 404 Not Found"):
        client.blob_size("test/app", DIGEST_A)
    with pytest.raises(RegistryError, match="invalid repository name"):
        client.get_manifest("../x", "v1")
    with pytest.raises(RegistryError, match="invalid tag or unsupported digest"):
        client.open_blob("test/app", "md5:" + "a" * 32)


def test_tls(registry: LocalRegistry, image: Path) -> None:
    registry.push(image, "v1", "test/app")
    strict = RegistryClient(registry.host)
    with pytest.raises(RegistryError, match=r"cannot reach the registry \(https: .*turn TLS verification off") as info:  # fmt: skip
        strict.get_manifest("test/app", "v1")
    assert info.value.code == "UNREACHABLE"
    plain = RegistryClient(registry.host, insecure_http=True)
    assert plain.scheme == "http"
    assert plain.get_manifest("test/app", "v1").media_type == MEDIA_OCI_MANIFEST
    never = RegistryClient(registry.host, tls_verify=False, insecure_http=False)
    with pytest.raises(RegistryError, match="cannot reach"):
        never.get_manifest("test/app", "v1")


def test_basic_auth(auth_registry: LocalRegistry, image: Path) -> None:
    auth_registry.push(image, "v1", "private/app")  # skopeo with --dest-creds
    assert auth_registry.creds is not None and auth_registry.creds[0] == USER

    anonymous = auth_registry.client(creds=None)
    with pytest.raises(RegistryError) as info:
        anonymous.get_manifest("private/app", "v1")
    err = info.value
    assert err.status == 401 and err.code == "UNAUTHORIZED"
    assert str(err) == (
        f"{auth_registry.host}/private/app:v1: HTTP 401 Unauthorized: authentication required"
        " (UNAUTHORIZED) (the registry wants credentials; none were given)"
    )
    with pytest.raises(RegistryError, match=r"401.*none were given"):
        anonymous.open_blob("private/app", DIGEST_A)

    wrong = auth_registry.client(creds=(USER, "wrong"))
    with pytest.raises(RegistryError, match=r"private/app:v1: HTTP 401 .*credentials were rejected"):  # fmt: skip
        wrong.get_manifest("private/app", "v1")

    client = auth_registry.client()
    blobs = _pull_all(client, "private/app", "v1")
    assert manifest_digest(image, "v1") in blobs


def _two_platform_image(
    registry: LocalRegistry, workdir: Path, repository: str, fmt: str
) -> dict[str, str]:
    """Two images, amd64 and arm64, pushed by tag; their manifest digests by platform."""
    layout = workdir / "layout"
    digests = {}
    for arch in ("amd64", "arm64"):
        build_image(layout, arch, [Layer(files={"arch": arch})], platform=f"linux/{arch}")
        registry.push(layout, arch, repository, format=fmt)
        digests[arch] = registry.client().get_manifest(repository, arch).digest
    return digests


@pytest.mark.parametrize(
    ("fmt", "index_type", "image_type"),
    [
        ("oci", MEDIA_OCI_INDEX, MEDIA_OCI_MANIFEST),
        ("v2s2", MEDIA_DOCKER_LIST, MEDIA_DOCKER_MANIFEST),
    ],
)
def test_index_platforms(
    registry: LocalRegistry, tmp_path: Path, fmt: str, index_type: str, image_type: str
) -> None:
    repository = f"test/multi-{fmt}"
    digests = _two_platform_image(registry, tmp_path, repository, fmt)
    client = registry.client()
    entries = []
    for arch, digest in digests.items():
        manifest = client.get_manifest(repository, digest)
        platform = {"architecture": arch, "os": "linux"}
        if arch == "arm64":
            platform["variant"] = "v8"
        entries.append(
            {
                "mediaType": image_type,
                "digest": digest,
                "size": len(manifest.data),
                "platform": platform,
            }
        )
    index = json.dumps({"schemaVersion": 2, "mediaType": index_type, "manifests": entries}).encode()
    index_digest = registry.put_manifest(repository, "latest", index, index_type)

    pulled = client.get_manifest(repository, "latest")
    assert pulled == (index, index_type, index_digest)
    for platform, arch in [
        ("linux/amd64", "amd64"),
        ("linux/arm64", "arm64"),
        ("linux/arm64/v8", "arm64"),
        ("linux/aarch64", "arm64"),
    ]:
        descriptor = select_platform(pulled.data, platform)
        assert descriptor["digest"] == digests[arch]
        manifest = client.get_manifest(repository, descriptor["digest"])
        assert manifest.media_type == image_type
        config_digest = json.loads(manifest.data)["config"]["digest"]
        config = json.loads(client.read_blob(repository, config_digest))
        assert config["architecture"] == arch
        layer = json.loads(manifest.data)["layers"][0]
        with client.open_blob(repository, layer["digest"]) as blob:
            names = _layer_names(blob.read())
        assert "arch" in {n.lstrip("./") for n in names}
    with pytest.raises(RegistryError, match=r"no image for platform linux/s390x .*\(it has: linux/amd64, linux/arm64/v8\)"):  # fmt: skip
        select_platform(pulled.data, "linux/s390x")


def test_tampered_storage(tmp_path: Path) -> None:
    """Bytes flipped in the registry's own storage: it serves them; we refuse them."""
    with run_registry(tmp_path / "registry") as reg:
        layout = tmp_path / "layout"
        build_image(layout, "v1", [Layer(files={"data": os.urandom(100_000)})])
        reg.push(layout, "v1", "test/tampered")
        client = reg.client()
        manifest = client.get_manifest("test/tampered", "v1")
        doc = json.loads(manifest.data)
        layer = doc["layers"][0]

        path = reg.blob_path(layer["digest"])
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(data)
        blob = client.open_blob("test/tampered", layer["digest"], size=layer["size"])
        first = blob.read(1000)
        assert len(first) == 1000  # nothing to tell yet
        with pytest.raises(RegistryError, match=r"test/tampered@sha256:\w+: blob content does not match its digest \(got sha256:\w+\)") as info:  # fmt: skip
            blob.verify()
        assert info.value.code == "DIGEST_MISMATCH"
        with pytest.raises(RegistryError):  # and it stays failed
            blob.read()
        with pytest.raises(RegistryError, match="does not match its digest"):
            client.read_blob("test/tampered", layer["digest"])

        # the manifest: one hex digit of its config digest changed, still valid JSON
        path = reg.blob_path(manifest.digest)
        text = path.read_text()
        config_hex = doc["config"]["digest"][7:]
        flipped = ("0" if config_hex[0] != "0" else "1") + config_hex[1:]
        path.write_text(text.replace(config_hex, flipped))
        with pytest.raises(RegistryError, match=r"test/tampered:v1: manifest content does not match the registry's digest") as info:  # fmt: skip
            client.get_manifest("test/tampered", "v1")
        assert info.value.code == "DIGEST_MISMATCH"
        with pytest.raises(RegistryError, match="does not match the digest asked for"):
            client.get_manifest("test/tampered", manifest.digest)


# ------------------------------------------------------------------------------ stubs


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    server: str

    @property
    def query(self) -> dict[str, list[str]]:
        return urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)


@dataclass
class Stub:
    """A stub HTTP server on 127.0.0.1: ``handle(request, seen)`` answers each request."""

    name: str
    handle: Callable[[BaseHTTPRequestHandler, Seen], None]
    log: list[Seen] = field(default_factory=list)
    url: str = ""


def reply(
    req: BaseHTTPRequestHandler,
    status: int,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    length: int | None = None,
) -> None:
    req.send_response(status)
    for k, v in (headers or {}).items():
        req.send_header(k, v)
    req.send_header("Content-Length", str(len(body) if length is None else length))
    req.end_headers()
    if req.command != "HEAD":
        req.wfile.write(body)


@contextmanager
def stubs(*servers: Stub) -> Iterator[None]:
    running = []
    for stub in servers:

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            owner = stub

            def _any(self) -> None:
                seen = Seen(self.command, self.path, dict(self.headers), self.owner.name)
                self.owner.log.append(seen)
                self.owner.handle(self, seen)

            do_GET = do_HEAD = _any

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        stub.url = f"http://127.0.0.1:{server.server_address[1]}"
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        running.append((server, thread))
    try:
        yield
    finally:
        for server, thread in running:
            server.shutdown()
            server.server_close()
            thread.join()


def _host(stub: Stub) -> str:
    return stub.url.removeprefix("http://")


MANIFEST = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": MEDIA_OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": DIGEST_A,
            "size": 2,
        },
        "layers": [],
    }
).encode()
BLOB = b"layer bytes " * 1000


class TokenRegistry:
    """Stub of a registry with a token service (``Bearer realm=...``), blobs redirected to a
    second stub standing for object storage, tokens revocable."""

    def __init__(self, *, creds: tuple[str, str] | None, field: str = "token") -> None:
        self.creds = creds
        self.field = field
        self.valid: set[str] = set()
        self.issued = 0
        self.registry = Stub("registry", self.serve)
        self.auth = Stub("auth", self.token)
        self.storage = Stub("storage", self.blob)

    def token(self, req: BaseHTTPRequestHandler, seen: Seen) -> None:
        if self.creds is not None:
            raw = base64.b64encode(f"{self.creds[0]}:{self.creds[1]}".encode()).decode()
            if seen.headers.get("Authorization") != f"Basic {raw}":
                reply(req, 401, b'{"details": "incorrect username or password"}')
                return
        self.issued += 1
        token = f"tok-{self.issued}"
        self.valid.add(token)
        body = {self.field: token, "expires_in": 300}
        reply(req, 200, json.dumps(body).encode(), {"Content-Type": "application/json"})

    def serve(self, req: BaseHTTPRequestHandler, seen: Seen) -> None:
        auth = seen.headers.get("Authorization", "")
        if auth.removeprefix("Bearer ") not in self.valid:
            repo = seen.path.split("/")[2] + "/" + seen.path.split("/")[3]
            challenge = (
                f'Bearer realm="{self.auth.url}/token",service="stub-registry",'
                f'scope="repository:{repo}:pull"'
            )
            body = b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}'
            reply(
                req, 401, body, {"WWW-Authenticate": challenge, "Content-Type": "application/json"}
            )
            return
        if "/manifests/" in seen.path:
            headers = {
                "Content-Type": MEDIA_OCI_MANIFEST,
                "Docker-Content-Digest": sha256(MANIFEST),
            }
            reply(req, 200, MANIFEST, headers)
        elif seen.path == f"/v2/team/app/blobs/{sha256(BLOB)}":
            reply(
                req, 307, b"", {"Location": f"{self.storage.url}/bucket/{sha256(BLOB)[7:]}?sig=x"}
            )
        elif "/blobs/" in seen.path:
            # a same-host redirect first: the registry's credentials go along
            reply(req, 307, b"", {"Location": f"/v2/team/app/blobs/{sha256(BLOB)}"})
        else:
            reply(req, 404, b'{"errors":[{"code":"NAME_UNKNOWN","message":"no such repo"}]}')

    def blob(self, req: BaseHTTPRequestHandler, seen: Seen) -> None:
        reply(req, 200, BLOB, {"Content-Type": "application/octet-stream"})


@pytest.mark.parametrize(("creds", "field"), [((USER, "secret"), "token"), (None, "access_token")])
def test_bearer_token_stub(creds: tuple[str, str] | None, field: str) -> None:
    """Against a stub (not a real registry): the 401 challenge, the token fetched from the
    realm with the credentials, the request retried with it, the token cached."""
    stub = TokenRegistry(creds=creds, field=field)
    with stubs(stub.registry, stub.auth, stub.storage):
        client = RegistryClient(_host(stub.registry), tls_verify=False, creds=creds)
        manifest = client.get_manifest("team/app", "v1")
        assert manifest == (MANIFEST, MEDIA_OCI_MANIFEST, sha256(MANIFEST))
        [token_request] = stub.auth.log
        assert token_request.query == {
            "service": ["stub-registry"],
            "scope": ["repository:team/app:pull"],
        }
        assert ("Authorization" in token_request.headers) == (creds is not None)
        first, retried = stub.registry.log
        assert "Authorization" not in first.headers
        assert retried.headers["Authorization"] == "Bearer tok-1"

        # the token is sent from the start now, and not fetched again
        assert client.get_manifest("team/app", manifest.digest) == manifest
        # a blob: redirected within the registry (token kept), then to storage (token not sent)
        with client.open_blob("team/app", "sha256:" + "b" * 64):
            pass
        with pytest.raises(RegistryError, match="does not match its digest"):
            client.open_blob("team/app", "sha256:" + "b" * 64).verify()  # served BLOB
        assert client.read_blob("team/app", sha256(BLOB)) == BLOB
        assert len(stub.auth.log) == 1
        assert all(s.headers.get("Authorization") == "Bearer tok-1" for s in stub.registry.log[2:])
        assert stub.storage.log and all("Authorization" not in s.headers for s in stub.storage.log)
        assert stub.storage.log[0].path == f"/bucket/{sha256(BLOB)[7:]}?sig=x"
        assert client.blob_size("team/app", sha256(BLOB)) == len(BLOB)
        assert stub.storage.log[-1].method == "HEAD"  # a HEAD stays a HEAD when redirected

        # revoked: a 401 for the cached token gets a new one, once
        stub.valid.clear()
        assert client.get_manifest("team/app", "v1") == manifest
        assert len(stub.auth.log) == 2
        assert stub.registry.log[-1].headers["Authorization"] == "Bearer tok-2"


def test_bearer_token_denied_stub() -> None:
    """Stub: wrong credentials at the token realm; a token that is never good enough."""
    stub = TokenRegistry(creds=(USER, "secret"))
    with stubs(stub.registry, stub.auth, stub.storage):
        client = RegistryClient(_host(stub.registry), tls_verify=False, creds=(USER, "nope"))
        with pytest.raises(RegistryError) as info:
            client.get_manifest("team/app", "v1")
        assert str(info.value) == (
            f"{_host(stub.registry)}/team/app:v1: token request to {stub.auth.url}/token failed:"
            " HTTP 401 Unauthorized: incorrect username or password (check the credentials)"
        )
        client = RegistryClient(_host(stub.registry), tls_verify=False)
        with pytest.raises(RegistryError, match=r"token request .*\(no credentials were given\)"):
            client.get_manifest("team/app", "v1")

    stub = TokenRegistry(creds=None)
    stub.auth.handle = lambda req, seen: reply(req, 200, b'{"token": "useless"}')
    with stubs(stub.registry, stub.auth, stub.storage):
        client = RegistryClient(_host(stub.registry), tls_verify=False)
        with pytest.raises(RegistryError, match=r"HTTP 401 .*authentication required \(UNAUTHORIZED\) \(access denied with the token: no credentials were given\)"):  # fmt: skip
            client.get_manifest("team/app", "v1")
        assert len(stub.registry.log) == 2  # retried once, no more


def test_broken_transfers_stub() -> None:
    """Stub: a blob cut short, longer than its size, a manifest not matching its digest."""
    good = sha256(BLOB)
    short = "sha256:" + "5" * 64

    def serve(req: BaseHTTPRequestHandler, seen: Seen) -> None:
        if seen.path.endswith(short):
            reply(req, 200, BLOB[:5000], length=len(BLOB))  # then the connection closes
            req.close_connection = True
        elif "/blobs/" in seen.path:
            reply(req, 200, BLOB)
        elif seen.path.endswith(f"/manifests/{DIGEST_A}"):
            reply(req, 200, MANIFEST, {"Content-Type": MEDIA_OCI_MANIFEST})
        elif seen.path.endswith("/manifests/liar"):
            reply(req, 200, MANIFEST, {"Content-Type": MEDIA_OCI_MANIFEST, "Docker-Content-Digest": DIGEST_A})  # fmt: skip
        elif seen.path.endswith("/manifests/schema1"):
            reply(req, 200, b'{"schemaVersion": 1}', {"Content-Type": "application/json"})
        elif seen.path.endswith("/manifests/cut"):
            reply(
                req, 200, MANIFEST[:100], {"Content-Type": MEDIA_OCI_MANIFEST}, length=len(MANIFEST)
            )
            req.close_connection = True
        elif seen.path.endswith("/manifests/generic"):
            reply(req, 200, MANIFEST, {"Content-Type": "application/json"})
        else:
            reply(req, 500, b"<html>oops</html>")

    stub = Stub("registry", serve)
    with stubs(stub):
        client = RegistryClient(_host(stub), insecure_http=True)
        with client.open_blob("a/b", good) as blob:
            assert blob.read(0) == b"" and not blob.verified
            assert blob.read() == BLOB and blob.verified
            assert blob.read() == b""
        with pytest.raises(RegistryError, match="registry sends 12000 bytes for a blob of 11999") as info:  # fmt: skip
            client.open_blob("a/b", good, size=len(BLOB) - 1)
        assert info.value.code == "SIZE_MISMATCH"

        # a size the Content-Length does not give: too long is caught as it streams
        real_open = client._open_url

        def no_length(request: Any) -> Any:
            response = real_open(request)
            del response.headers["Content-Length"]
            return response

        client._open_url = no_length  # type: ignore[method-assign]
        blob = client.open_blob("a/b", good, size=100)
        with pytest.raises(RegistryError, match="longer than its 100 bytes") as info:
            blob.read(1000)
        assert info.value.code == "SIZE_MISMATCH"
        client._open_url = real_open  # type: ignore[method-assign]

        blob = client.open_blob("a/b", short)
        assert blob.size == len(BLOB)
        with pytest.raises(RegistryError, match="blob ended after 5000 of its 12000 bytes") as info:
            blob.verify()
        assert info.value.code == "TRUNCATED"

        with pytest.raises(RegistryError, match="does not match the digest asked for") as info:
            client.get_manifest("a/b", DIGEST_A)
        assert info.value.code == "DIGEST_MISMATCH"
        with pytest.raises(RegistryError, match="liar: manifest content does not match the registry's digest"):  # fmt: skip
            client.get_manifest("a/b", "liar")
        with pytest.raises(RegistryError, match=r"cut: manifest download broke off after 100 of"):
            client.get_manifest("a/b", "cut")
        with pytest.raises(RegistryError, match=r"schema 1 manifests .* are not supported"):
            client.get_manifest("a/b", "schema1")
        assert client.get_manifest("a/b", "generic").media_type == MEDIA_OCI_MANIFEST
        with pytest.raises(RegistryError, match=r"a/b:other: HTTP 500 Internal Server Error: <html>oops</html>"):  # fmt: skip
            client.get_manifest("a/b", "other")


def test_try_again_later_is_retried_stub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stub: 429/503 answers are retried after a pause (Retry-After when given, bounded),
    then the answer stands; other errors are not retried."""
    pauses: list[float] = []
    monkeypatch.setattr(registry_module.time, "sleep", pauses.append)
    answers: dict[str, list[tuple[int, dict[str, str]]]] = {
        "flaky": [(503, {}), (429, {"Retry-After": "7"}), (502, {"Retry-After": "nan"})],
        "down": [(503, {"Retry-After": "3600"})] * 10,
        "gone": [(404, {})],
    }

    def serve(req: BaseHTTPRequestHandler, seen: Seen) -> None:
        tag = seen.path.rsplit("/", 1)[1]
        queue = answers[tag]
        if queue:
            status, headers = queue.pop(0)
            reply(req, status, b'{"errors":[{"code":"UNAVAILABLE","message":"busy"}]}', headers)
        else:
            reply(req, 200, MANIFEST, {"Content-Type": MEDIA_OCI_MANIFEST})

    stub = Stub("registry", serve)
    with stubs(stub):
        client = RegistryClient(_host(stub), insecure_http=True)
        assert client.get_manifest("a/b", "flaky").media_type == MEDIA_OCI_MANIFEST
        assert pauses == [0.5, 7.0, 2.0]  # the default, as asked, the default for nonsense
        pauses.clear()
        with pytest.raises(RegistryError, match=r"a/b:down: HTTP 503 .*busy") as info:
            client.get_manifest("a/b", "down")
        assert info.value.status == 503 and pauses == [30.0] * 3  # bounded; then it stands
        assert len(answers["down"]) == 10 - 4
        pauses.clear()
        with pytest.raises(RegistryError, match="HTTP 404"):
            client.get_manifest("a/b", "gone")
        assert pauses == []
