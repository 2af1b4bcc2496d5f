"""Registry credentials from the files podman, skopeo and docker log in to.

The format is containers-auth.json(5), which docker's ``config.json`` shares:
``{"auths": {"KEY": {"auth": base64("USER:PASSWORD")}}}`` where KEY is a registry host, or a
host and a repository path to scope credentials more narrowly.  Files are searched in the
order the containers tools use, and in each the most specific key wins; the first file
holding a matching key decides.  Credential helpers (``credsStore``, ``credHelpers``) run
other programs and are not consulted.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Mapping
from pathlib import Path

from composefs.oci.image import OciError

# Docker Hub appears in auth files under any of these names (docker login writes the first).
_DOCKER_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "registry-1.docker.io")
_MAX_AUTH_FILE = 1 << 20


def auth_files(environ: Mapping[str, str] = os.environ) -> list[Path]:
    """Where credentials are looked for, in order (``REGISTRY_AUTH_FILE`` alone when set)."""
    if environ.get("REGISTRY_AUTH_FILE"):
        return [Path(environ["REGISTRY_AUTH_FILE"])]
    home = Path(environ.get("HOME") or os.path.expanduser("~"))
    files = []
    if environ.get("XDG_RUNTIME_DIR"):
        files.append(Path(environ["XDG_RUNTIME_DIR"]) / "containers/auth.json")
    config = Path(environ.get("XDG_CONFIG_HOME") or home / ".config")
    files.append(config / "containers/auth.json")
    docker = Path(environ["DOCKER_CONFIG"]) if environ.get("DOCKER_CONFIG") else home / ".docker"
    files.append(docker / "config.json")
    return files


def find_credentials(
    host: str,
    repository: str,
    *,
    authfile: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] = os.environ,
) -> tuple[str, str] | None:
    """(user, password) for pulling ``host/repository``, or None when no file has any.

    ``authfile`` replaces the search (as ``--authfile`` does for skopeo) and must exist.
    Raises :class:`OciError` naming the file when a file that exists cannot be used.
    """
    if authfile is not None:
        files, must_exist = [Path(authfile)], True
    else:
        files, must_exist = auth_files(environ), False
    wanted = _keys_for(host, repository)
    for path in files:
        auths = _read_auths(path, must_exist)
        for key in wanted:
            entry = auths.get(key)
            if entry is not None:
                return _decode(path, key, entry)
    return None


def _keys_for(host: str, repository: str) -> list[str]:
    """Keys that would apply, most specific first: host/a/b/c, host/a/b, host/a, host."""
    parts = repository.split("/")
    keys = [f"{host}/{'/'.join(parts[:n])}" for n in range(len(parts), 0, -1)]
    keys.append(host)
    if host == "docker.io":
        keys += _DOCKER_HUB_KEYS
    return keys


def _read_auths(path: Path, must_exist: bool) -> dict[str, object]:
    try:
        with path.open("rb") as f:
            raw = f.read(_MAX_AUTH_FILE + 1)
    except FileNotFoundError:
        if must_exist:
            raise OciError(f"auth file {path}: no such file") from None
        return {}
    except OSError as e:
        raise OciError(f"auth file {path}: {e.strerror}") from None
    if len(raw) > _MAX_AUTH_FILE:
        raise OciError(f"auth file {path}: larger than {_MAX_AUTH_FILE} bytes")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise OciError(f"auth file {path}: not JSON ({e})") from None
    auths = doc.get("auths", {}) if isinstance(doc, dict) else None
    if not isinstance(auths, dict):
        raise OciError(f'auth file {path}: "auths" is not an object')
    # keys may carry a scheme and, docker's legacy form, an API path: https://HOST/v1/
    normalized: dict[str, object] = {}
    for key, entry in auths.items():
        name = key.removeprefix("https://").removeprefix("http://").rstrip("/")
        for api in ("/v1", "/v2"):
            name = name.removesuffix(api)
        normalized.setdefault(name, entry)
        normalized.setdefault(key, entry)
    return normalized


def _decode(path: Path, key: str, entry: object) -> tuple[str, str] | None:
    auth = entry.get("auth") if isinstance(entry, dict) else None
    if not auth:
        return None  # an entry a credential helper answers for, or an identity token
    bad = OciError(f'auth file {path}: "{key}": "auth" is not base64 of USER:PASSWORD')
    if not isinstance(auth, str):
        raise bad
    try:
        user, sep, password = base64.b64decode(auth, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        raise bad from None
    if not sep or not user:
        raise bad
    return user, password
