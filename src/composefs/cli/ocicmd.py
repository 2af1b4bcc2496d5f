"""``cfsctl oci …``: the OCI subcommands (kept apart: they pull in the OCI modules)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from typing import Any

from composefs.cli import fail, print_json
from composefs.cli.args import UsageError
from composefs.oci.image import OciError
from composefs.progress import Progress
from composefs.repository import Repository

PROG = "cfsctl"


def run(repo: Repository, a: argparse.Namespace) -> int:
    try:
        return int(_COMMANDS[a.oci_command](repo, a))
    except OciError as e:
        return fail(PROG, str(e))


def _pull(repo: Repository, a: argparse.Namespace) -> int:
    from composefs.oci.pull import pull

    creds = None
    if a.creds is not None:
        user, _, password = a.creds.partition(":")
        if not user:
            raise UsageError(f"{PROG}: --creds: USER[:PASSWORD]")
        creds = (user, password)
    elif a.source.startswith("docker:"):
        creds = _logged_in_creds(a.source, a.authfile)
    elif a.authfile is not None:
        raise UsageError(f"{PROG}: --authfile goes with docker:// sources")
    bars: dict[int, Progress] = {}

    def progress(index: int, count: int, done: int, total: int | None) -> None:
        bar = bars.get(index)
        if bar is None:
            for old in bars.values():
                old.done()
            bar = bars[index] = Progress(f"layer {index + 1}/{count}", unit="layers")
        bar.update(index + 1, count, done, total or 0)

    try:
        result = pull(
            repo, a.source, a.name, platform=a.platform, creds=creds,
            tls_verify=a.tls_verify == "true", progress=progress,
        )  # fmt: skip
    finally:
        for bar in bars.values():
            bar.done()
    if a.json:
        print_json(asdict(result))
    else:
        print(result.image_id)
    return 0


def _logged_in_creds(source: str, authfile: str | None) -> tuple[str, str] | None:
    """Credentials ``podman login``/``docker login`` saved for the source's registry."""
    from composefs.oci.auth import find_credentials
    from composefs.oci.registry import RegistryError, parse_reference

    try:
        ref = parse_reference(source.removeprefix("docker:").removeprefix("//"))
    except RegistryError:
        return None  # pull names what is wrong with it
    return find_credentials(ref.host, ref.repository, authfile=authfile)


def _images(repo: Repository, a: argparse.Namespace) -> int:
    rows = []
    for name in repo.oci_refs():
        _id, record = repo.oci_record(name)
        rows.append({
            "name": name,
            "image": record.get("image"),
            "manifest_digest": record.get("manifest_digest"),
            "platform": record.get("platform"),
            "layers": len(record.get("layers", [])),
        })  # fmt: skip
    if a.json:
        print_json(rows)
        return 0
    for r in rows:
        print(f"{r['name']}  {str(r['image'])[:16]}  {r['platform']}  {r['layers']} layers")
    return 0


def _record(repo: Repository, name: str) -> dict[str, Any]:
    """An OCI image by ref name, or by ``@sha256:…`` manifest digest."""
    if name.startswith("@"):
        for ref in repo.oci_refs():
            _id, record = repo.oci_record(ref)
            if record.get("manifest_digest") == name[1:]:
                return record
        raise OciError(f"no OCI image with manifest {name[1:]} in {repo.path}")
    return repo.oci_record(name)[1]


def _inspect(repo: Repository, a: argparse.Namespace) -> int:
    record = _record(repo, a.name)
    if a.manifest or a.config:
        data = repo.read_object(str(record["manifest" if a.manifest else "config"]))
        sys.stdout.buffer.write(data)
        return 0
    print_json(record)
    return 0


def _mount(repo: Repository, a: argparse.Namespace) -> int:
    from composefs.fuse import FuseError
    from composefs.mount import MountError

    record = _record(repo, a.name)
    try:
        repo.mount(str(record.get("image")), a.mountpoint, fuse=a.fuse, foreground=a.foreground)
    except (MountError, FuseError) as e:
        return fail(PROG, str(e))
    return 0


def _rm(repo: Repository, a: argparse.Namespace) -> int:
    for name in a.names:
        repo.remove_oci_ref(name)
    return 0


_COMMANDS = {
    "pull": _pull,
    "images": _images,
    "inspect": _inspect,
    "mount": _mount,
    "rm": _rm,
}
