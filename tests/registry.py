"""A real registry for the OCI tests, and images to put in it.

- :func:`run_registry` starts ``docker-registry`` (the reference distribution registry,
  Debian's package) on 127.0.0.1 at a free port, its configuration and storage in a
  temporary directory, optionally behind HTTP basic auth (bcrypt ``htpasswd`` entries);
  the ``registry`` and ``auth_registry`` fixtures (module scope) wrap it.  Use them with
  tests/conftest.py's ``pytest_plugins``.
- :func:`build_image` makes an OCI image layout with ``umoci``, one layer per
  :class:`Layer` (files written, paths deleted: umoci writes whiteouts for those, or a tar
  of your own added verbatim).
- :meth:`LocalRegistry.push` copies a layout's image into the registry with ``skopeo``;
  :meth:`LocalRegistry.put_blob` and :meth:`LocalRegistry.put_manifest` upload by hand
  (registry API v2, monolithic upload), e.g. for an index of several images.

The tools come from scripts/bootstrap.sh; without them the tests skip, unless we are root
on a Debian machine, where bootstrap would have installed them: then they fail.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from composefs.oci.registry import RegistryClient

PACKAGES = {
    "docker-registry": "docker-registry",
    "skopeo": "skopeo",
    "umoci": "umoci",
    "htpasswd": "apache2-utils",
}
START_TIMEOUT = 20.0
USER = "alice"


def require_tools(*tools: str) -> None:
    """Skip (or, as root on Debian, fail: bootstrap installs them) when a tool is missing."""
    missing = [t for t in tools if shutil.which(t) is None]
    if not missing:
        return
    packages = " ".join(sorted({PACKAGES.get(t, t) for t in missing}))
    them = "them" if len(missing) > 1 else "it"
    why = f"{', '.join(missing)} not installed (Debian: {packages}; scripts/bootstrap.sh installs {them})"
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(why)
    pytest.fail(f"{why}: run scripts/bootstrap.sh", pytrace=False)


def run(*argv: str | os.PathLike[str], **kw: object) -> subprocess.CompletedProcess[str]:
    """A tool, its output captured; a failure shows the command and what it said."""
    args = [os.fspath(a) for a in argv]
    proc = subprocess.run(args, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
        )
    return proc


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------- registry


@dataclass
class LocalRegistry:
    """A running ``docker-registry``; ``creds`` is what it accepts, if it wants any."""

    host: str  # 127.0.0.1:PORT
    root: Path
    creds: tuple[str, str] | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def log(self) -> Path:
        return self.root / "registry.log"

    @property
    def storage(self) -> Path:
        """Where the filesystem driver keeps blobs: ``<storage>/sha256/<2 hex>/<hex>/data``."""
        return self.root / "data" / "docker" / "registry" / "v2" / "blobs"

    def blob_path(self, digest: str) -> Path:
        algorithm, hexdigest = digest.split(":", 1)
        return self.storage / algorithm / hexdigest[:2] / hexdigest / "data"

    def reference(self, repository: str, tag: str = "latest") -> str:
        return f"docker://{self.host}/{repository}:{tag}"

    def client(self, **kw: object) -> RegistryClient:
        """Our client for it (TLS verification off: it speaks plain HTTP)."""
        kw.setdefault("creds", self.creds)
        kw.setdefault("tls_verify", False)
        return RegistryClient(self.host, **kw)

    def push(
        self,
        layout: Path,
        tag: str,
        repository: str,
        dest_tag: str | None = None,
        *,
        format: str | None = None,
    ) -> None:
        """``skopeo copy oci:LAYOUT:TAG docker://HOST/REPO:TAG`` (``format``: ``oci`` or
        ``v2s2`` to have skopeo convert to Docker's media types)."""
        argv = ["skopeo", "copy", "--insecure-policy", "--quiet", "--dest-tls-verify=false"]
        if self.creds:
            argv.append(f"--dest-creds={self.creds[0]}:{self.creds[1]}")
        if format:
            argv.append(f"--format={format}")
        argv += [f"oci:{layout}:{tag}", self.reference(repository, dest_tag or tag)]
        run(*argv, env=_skopeo_env(self.root))

    # -- uploads by hand (registry API v2), for what skopeo cannot make

    def _request(
        self,
        method: str,
        url: str,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, Mapping[str, str]]:
        if not url.startswith("http"):
            url = f"http://{self.host}{url}"
        request = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
        if self.creds:
            raw = f"{self.creds[0]}:{self.creds[1]}".encode()
            request.add_header("Authorization", "Basic " + base64.b64encode(raw).decode())
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, dict(response.headers)
        except urllib.error.HTTPError as err:
            body = err.read().decode(errors="replace")
            raise AssertionError(f"{method} {url}: HTTP {err.code}: {body}") from None

    def put_blob(self, repository: str, data: bytes) -> str:
        """Upload a blob (POST, then one PUT with the whole content); its digest."""
        digest = sha256(data)
        _, headers = self._request("POST", f"/v2/{repository}/blobs/uploads/")
        location = urllib.parse.urljoin(f"http://{self.host}/", headers["Location"])
        location += ("&" if "?" in location else "?") + urllib.parse.urlencode({"digest": digest})
        status, _ = self._request(
            "PUT", location, data, {"Content-Type": "application/octet-stream"}
        )
        assert status == 201, status
        return digest

    def put_manifest(self, repository: str, reference: str, data: bytes, media_type: str) -> str:
        """Upload a manifest (or index) under a tag or its digest; its digest."""
        status, headers = self._request(
            "PUT", f"/v2/{repository}/manifests/{reference}", data, {"Content-Type": media_type}
        )
        assert status == 201, status
        assert headers.get("Docker-Content-Digest") == sha256(data)
        return sha256(data)


def _skopeo_env(root: Path) -> dict[str, str]:
    # a private home and auth file: no credentials of the machine's user are picked up
    home = root / "skopeo-home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
    return {**env, "HOME": str(home), "REGISTRY_AUTH_FILE": str(home / "auth.json")}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


CONFIG = """\
version: 0.1
log:
  level: info
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {root}/data
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
  secret: composefs-py-test-secret
"""

AUTH = """\
auth:
  htpasswd:
    realm: composefs-test
    path: {root}/htpasswd
"""


def _wait_ready(reg: LocalRegistry) -> str | None:
    """None once the registry answers /v2/ (200, or 401 when it wants auth); else why not."""
    assert reg.process is not None
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if reg.process.poll() is not None:
            return f"exited with status {reg.process.returncode}"
        try:
            with urllib.request.urlopen(f"http://{reg.host}/v2/", timeout=2) as response:
                if response.status == 200:
                    return None
        except urllib.error.HTTPError as err:
            if err.code == 401:
                return None
        except OSError:
            pass
        time.sleep(0.05)
    return f"did not answer within {START_TIMEOUT} s"


@contextmanager
def run_registry(
    workdir: Path, *, users: Mapping[str, str] | None = None
) -> Iterator[LocalRegistry]:
    """``docker-registry`` serving from ``workdir`` on 127.0.0.1, stopped on exit.

    With ``users`` ({name: password}) it wants HTTP basic auth; ``creds`` is the first user.
    """
    require_tools("docker-registry", *(["htpasswd"] if users else []))
    workdir.mkdir(parents=True, exist_ok=True)
    extra = ""
    creds = None
    if users:
        lines = [run("htpasswd", "-Bbn", u, p).stdout.strip() for u, p in users.items()]
        (workdir / "htpasswd").write_text("\n".join(lines) + "\n")
        extra = AUTH.format(root=workdir)
        creds = next(iter(users.items()))
    failures = []
    for _ in range(3):  # the port may be taken between choosing and binding it
        port = _free_port()
        config = workdir / "config.yml"
        config.write_text(CONFIG.format(root=workdir, port=port) + extra)
        reg = LocalRegistry(f"127.0.0.1:{port}", workdir, creds)
        with reg.log.open("ab") as log:
            reg.process = subprocess.Popen(
                ["docker-registry", "serve", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        why = _wait_ready(reg)
        if why is None:
            break
        _stop(reg.process)
        failures.append(f"port {port}: {why}")
    else:
        tail = reg.log.read_text(errors="replace")[-3000:]
        raise AssertionError(f"docker-registry did not start: {failures}\n{tail}")
    try:
        yield reg
    finally:
        _stop(reg.process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    """An anonymous registry (anyone may pull and push)."""
    with run_registry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


@pytest.fixture(scope="module")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    """A registry behind HTTP basic auth; ``creds`` is ``("alice", <random password>)``."""
    users = {USER: "pw-" + secrets.token_hex(8)}
    with run_registry(tmp_path_factory.mktemp("auth-registry"), users=users) as reg:
        yield reg


# ------------------------------------------------------------------------------ images


@dataclass
class Layer:
    """One layer: ``delete`` first (paths of the layers below: umoci writes whiteouts),
    then ``files`` ({path: content}; a path ending in ``/`` is a directory; a ``str`` is
    UTF-8), then ``tree`` copied over the top.  Or ``tar``: an uncompressed tar of your own,
    added verbatim (``umoci raw add-layer``; for opaque whiteouts, hard links...)."""

    files: Mapping[str, bytes | str] = field(default_factory=dict)
    delete: Sequence[str] = ()
    tree: Path | None = None
    tar: bytes | None = None


LAYER_MTIME = 1_700_000_000


def _change(rootfs: Path, layer: Layer) -> None:
    for name in layer.delete:
        path = rootfs / name.strip("/")
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    for name, content in layer.files.items():
        path = rootfs / name.strip("/")
        if name.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    if layer.tree is not None:
        shutil.copytree(layer.tree, rootfs, symlinks=True, dirs_exist_ok=True)
    # One fixed time on everything, so the same layer built twice is the same blob: with
    # the clock's, a build that crossed a second boundary gave a different digest.
    for top, dirs, files in os.walk(rootfs):
        for name in [*dirs, *files]:
            os.utime(os.path.join(top, name), (LAYER_MTIME, LAYER_MTIME), follow_symlinks=False)
    os.utime(rootfs, (LAYER_MTIME, LAYER_MTIME))


def build_image(
    layout: Path, tag: str, layers: Sequence[Layer], *, platform: str = "linux/amd64"
) -> str:
    """An image ``layout:tag`` (the layout is created if need be) of ``layers``, bottom
    first; the config's os and architecture from ``platform``.  Returns the manifest's
    digest (skopeo pushes an OCI manifest unchanged, so the registry's is the same)."""
    require_tools("umoci")
    os_name, arch = platform.split("/")[:2]
    if not (layout / "index.json").exists():
        run("umoci", "init", "--layout", layout)
    image = f"{layout}:{tag}"
    run("umoci", "new", "--image", image)
    run("umoci", "config", "--no-history", "--image", image, "--os", os_name,
        "--architecture", arch)  # fmt: skip
    rootless = [] if os.geteuid() == 0 else ["--rootless"]
    with tempfile.TemporaryDirectory(dir=layout.parent) as tmp:
        bundle = Path(tmp) / "bundle"
        for layer in layers:
            if layer.tar is not None:
                tar = Path(tmp) / "layer.tar"
                tar.write_bytes(layer.tar)
                run("umoci", "raw", "add-layer", "--image", image, tar)
                shutil.rmtree(bundle, ignore_errors=True)  # now behind the image
                continue
            if not bundle.exists():
                run("umoci", "unpack", *rootless, "--image", image, bundle)
            _change(bundle / "rootfs", layer)
            # umoci 0.4's "insert" writes tars without their end blocks: repack does not;
            # --refresh-bundle makes the next repack diff against this layer
            run("umoci", "repack", "--refresh-bundle", "--image", image, bundle)
    return manifest_digest(layout, tag)


def manifest_digest(layout: Path, tag: str) -> str:
    index = json.loads((layout / "index.json").read_text())
    for descriptor in index["manifests"]:
        if descriptor.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            return str(descriptor["digest"])
    raise KeyError(f"{layout}: no tag {tag}")


def layout_blob(layout: Path, digest: str) -> bytes:
    algorithm, hexdigest = digest.split(":", 1)
    return (layout / "blobs" / algorithm / hexdigest).read_bytes()
