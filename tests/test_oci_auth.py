"""Registry credentials from containers-auth.json(5) / docker config.json files."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from composefs.oci.auth import auth_files, find_credentials
from composefs.oci.image import OciError


def _auth(user: str, password: str) -> dict[str, str]:
    return {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}


def _write(path: Path, auths: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"auths": auths}))
    return path


def test_search_order(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path / "home"), "XDG_RUNTIME_DIR": str(tmp_path / "run")}
    assert auth_files(env) == [
        tmp_path / "run/containers/auth.json",
        tmp_path / "home/.config/containers/auth.json",
        tmp_path / "home/.docker/config.json",
    ]
    env2 = {**env, "XDG_CONFIG_HOME": str(tmp_path / "cfg"), "DOCKER_CONFIG": str(tmp_path / "d")}
    assert auth_files(env2)[1:] == [
        tmp_path / "cfg/containers/auth.json",
        tmp_path / "d/config.json",
    ]
    assert auth_files({**env, "REGISTRY_AUTH_FILE": "/x.json"}) == [Path("/x.json")]

    # nothing anywhere: no credentials, no error
    assert find_credentials("reg.example", "a/b", environ=env) is None
    # the first file with a matching key decides, even over a more specific key later
    _write(tmp_path / "home/.docker/config.json", {"reg.example/a/b": _auth("docker", "1")})
    assert find_credentials("reg.example", "a/b", environ=env) == ("docker", "1")
    _write(tmp_path / "run/containers/auth.json", {"reg.example": _auth("podman", "2")})
    assert find_credentials("reg.example", "a/b", environ=env) == ("podman", "2")
    assert find_credentials("other.example", "a/b", environ=env) is None


def test_most_specific_key_wins(tmp_path: Path) -> None:
    f = _write(tmp_path / "auth.json", {
        "reg.example:5000": _auth("host", "h"),
        "reg.example:5000/team": _auth("team", "t"),
        "reg.example:5000/team/app": _auth("app", "a:with:colons"),
    })  # fmt: skip
    assert find_credentials("reg.example:5000", "team/app", authfile=f) == ("app", "a:with:colons")
    assert find_credentials("reg.example:5000", "team/other", authfile=f) == ("team", "t")
    assert find_credentials("reg.example:5000", "teammate/x", authfile=f) == ("host", "h")
    assert find_credentials("reg.example", "team/app", authfile=f) is None  # another port


def test_docker_hub_and_legacy_keys(tmp_path: Path) -> None:
    f = _write(tmp_path / "config.json", {"https://index.docker.io/v1/": _auth("hub", "x")})
    assert find_credentials("docker.io", "library/alpine", authfile=f) == ("hub", "x")
    g = _write(tmp_path / "g.json", {"https://quay.io": _auth("q", "y")})
    assert find_credentials("quay.io", "org/img", authfile=g) == ("q", "y")


def test_entries_without_auth_and_helpers(tmp_path: Path) -> None:
    # docker with a credential store writes empty entries: nothing to use, no error
    f = tmp_path / "config.json"
    f.write_text(json.dumps({"auths": {"reg.example": {}}, "credsStore": "desktop"}))
    assert find_credentials("reg.example", "a", authfile=f) is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not JSON"),
        ('{"auths": []}', '"auths" is not an object'),
        ('{"auths": {"reg.example": {"auth": 5}}}', '"auth" is not base64 of USER:PASSWORD'),
        ('{"auths": {"reg.example": {"auth": "%%%"}}}', '"auth" is not base64 of USER:PASSWORD'),
        (json.dumps({"auths": {"reg.example": {"auth": base64.b64encode(b"nocolon").decode()}}}),
         '"auth" is not base64 of USER:PASSWORD'),
    ],
)  # fmt: skip
def test_unusable_files_are_named(tmp_path: Path, content: str, message: str) -> None:
    f = tmp_path / "auth.json"
    f.write_text(content)
    with pytest.raises(OciError, match=f"auth file {f}: .*{message}"):
        find_credentials("reg.example", "a", authfile=f)
    # found by the search too: a broken file is reported, not skipped silently
    with pytest.raises(OciError, match=f"auth file {f}"):
        find_credentials("reg.example", "a", environ={"REGISTRY_AUTH_FILE": str(f)})


def test_named_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(OciError, match="no such file"):
        find_credentials("reg.example", "a", authfile=tmp_path / "missing.json")
    assert (
        find_credentials("reg.example", "a", environ={"REGISTRY_AUTH_FILE": str(tmp_path / "m")})
        is None
    )
