"""A client for the OCI distribution API (registry HTTP API v2): manifests and blobs.

Only the standard library is used.  Everything fetched is checked against its digest:

- :meth:`RegistryClient.get_manifest` hashes the manifest and compares it with the digest
  it was asked for and with the registry's ``Docker-Content-Digest``;
- :meth:`RegistryClient.open_blob` returns a stream that hashes what is read and fails at
  the end if the content (or its length) is not what the digest (or size) says.

Authentication follows the registry's ``WWW-Authenticate`` challenge: HTTP basic with the
credentials given, or a bearer token from the challenge's realm (fetched with those
credentials, or anonymously), cached per scope.  A request is retried once with what the
challenge asked for.

``tls_verify=False`` tries HTTPS without checking the certificate, then plain HTTP, as
``skopeo --tls-verify=false`` does for local registries.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import platform as _platform
import re
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from email.message import Message
from typing import Any, NamedTuple

from composefs.errors import ComposefsError

MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_DOCKER_SCHEMA1 = frozenset(
    {
        "application/vnd.docker.distribution.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
    }
)
IMAGE_MEDIA_TYPES = frozenset({MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST})
INDEX_MEDIA_TYPES = frozenset({MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST})
MANIFEST_ACCEPT = ", ".join(
    [MEDIA_OCI_MANIFEST, MEDIA_OCI_INDEX, MEDIA_DOCKER_MANIFEST, MEDIA_DOCKER_LIST]
)

DOCKER_HUB = "docker.io"
DOCKER_HUB_ENDPOINT = "registry-1.docker.io"
MAX_MANIFEST_SIZE = 4 << 20  # as containerd
MAX_ERROR_BODY = 64 << 10
MAX_REDIRECTS = 10
USER_AGENT = "composefs-py"

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST_RE = re.compile(r"(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})")
_HOST_RE = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:.]+\])"
    r"(?::[0-9]{1,5})?"
)
_CHUNK = 1 << 16
# Answers that say "try again later" (rate limits, a proxy or backend briefly down); a
# request that got one is sent again after these pauses, or after the Retry-After the
# registry asks for (at most MAX_RETRY_AFTER seconds), then the answer stands.
RETRY_STATUSES = frozenset({429, 502, 503, 504})
RETRY_DELAYS = (0.5, 1.0, 2.0)
MAX_RETRY_AFTER = 30.0


class RegistryError(ComposefsError):
    """A registry request failed, or what came back is not what was asked for.

    ``host``, ``repository`` and ``reference`` say which request (when known), ``status``
    the HTTP status (if the registry answered), ``code`` the registry's error code (from
    its JSON error body: ``MANIFEST_UNKNOWN``, ``UNAUTHORIZED``...) or one of ours:
    ``DIGEST_MISMATCH``, ``SIZE_MISMATCH``, ``TRUNCATED``, ``UNREACHABLE``, ``UNSUPPORTED``,
    ``INVALID``.
    """

    def __init__(
        self,
        message: str,
        *,
        host: str | None = None,
        repository: str | None = None,
        reference: str | None = None,
        status: int | None = None,
        code: str | None = None,
    ) -> None:
        self.message = message
        self.host = host
        self.repository = repository
        self.reference = reference
        self.status = status
        self.code = code
        super().__init__(f"{self.where}: {message}" if self.where else message)

    @property
    def where(self) -> str:
        if self.host is None:
            return ""
        text = self.host
        if self.repository is not None:
            text += f"/{self.repository}"
            if self.reference is not None:
                text += ("@" if ":" in self.reference else ":") + self.reference
        return text


# ---------------------------------------------------------------------------- references


@dataclass(frozen=True)
class ImageReference:
    """A parsed ``docker://`` reference.  ``host`` is the registry as named (``docker.io``
    for Docker Hub; :func:`registry_endpoint` gives the host to contact); ``tag`` is
    ``latest`` when neither tag nor digest was given; with both, the digest decides."""

    host: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def reference(self) -> str:
        """What to ask the registry for: the digest if there is one, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        text = f"docker://{self.host}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def registry_endpoint(host: str) -> str:
    """The host to contact for a registry named ``host`` (Docker Hub's API lives elsewhere)."""
    return DOCKER_HUB_ENDPOINT if host in (DOCKER_HUB, "index.docker.io") else host


def parse_reference(text: str) -> ImageReference:
    """Parse ``[docker://][HOST[:PORT]/]REPO[:TAG][@sha256:HEX]``.

    The first component is a host when it is ``localhost`` or contains ``.``, ``:`` or an
    upper-case letter (the rule of Docker's reference library); otherwise the registry is
    Docker Hub, where a single-component name is in ``library/``.
    """

    def bad(why: str) -> RegistryError:
        return RegistryError(f"invalid image reference '{text}': {why}", code="INVALID")

    rest = text
    if rest.startswith("docker://"):
        rest = rest[len("docker://") :]
    elif "://" in rest:
        raise bad("only docker:// references name a registry image")
    digest = None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not _DIGEST_RE.fullmatch(digest):
            raise bad(f"'{digest}' is not a sha256:<64 hex> or sha512:<128 hex> digest")
    tag = None
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG_RE.fullmatch(tag):
            raise bad(f"'{tag}' is not a valid tag")
    first, sep, remainder = rest.partition("/")
    if sep and (first == "localhost" or any(c in first for c in ".:") or first.lower() != first):
        host, name = first, remainder
        if not _HOST_RE.fullmatch(host):
            raise bad(f"'{host}' is not a valid registry host")
    else:
        host, name = DOCKER_HUB, rest
    if host in (DOCKER_HUB, "index.docker.io"):
        host = DOCKER_HUB
        if name and "/" not in name:
            name = f"library/{name}"
    if not name:
        raise bad("no repository name")
    if not _REPOSITORY_RE.fullmatch(name) or len(name) > 255:
        raise bad(f"'{name}' is not a valid repository name (lower-case components)")
    if tag is None and digest is None:
        tag = "latest"
    return ImageReference(host, name, tag, digest)


# ------------------------------------------------------------------------------- digests


def _hasher(digest: str) -> Any:
    if not _DIGEST_RE.fullmatch(digest):
        raise RegistryError(f"unsupported or malformed digest '{digest}'", code="INVALID")
    return hashlib.new(digest.split(":", 1)[0])


def _digest_of(data: bytes, like: str = "sha256:") -> str:
    algorithm = like.split(":", 1)[0]
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


# --------------------------------------------------------------------------------- auth


def parse_challenges(values: list[str]) -> list[tuple[str, dict[str, str]]]:
    """``WWW-Authenticate`` header values as ``[(scheme lower-cased, {param: value})]``."""
    param = re.compile(r'[\s,]*([A-Za-z0-9_.-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)')
    scheme = re.compile(r"[\s,]*([A-Za-z][A-Za-z0-9_-]*)(?=\s|,|$)")
    out: list[tuple[str, dict[str, str]]] = []
    for value in values:
        pos = 0
        while pos < len(value):
            m = param.match(value, pos)
            if m and out:
                raw = m.group(2)
                if raw.startswith('"'):
                    raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
                out[-1][1][m.group(1).lower()] = raw
                pos = m.end()
                continue
            m = scheme.match(value, pos)
            if not m:
                break
            out.append((m.group(1).lower(), {}))
            pos = m.end()
    return out


@dataclass
class _Token:
    header: str
    expires: float


# ------------------------------------------------------------------------------ streams


class BlobReader(io.RawIOBase):
    """A blob as it downloads; the digest (and the size, when known) is checked at the end.

    Reading to the end raises :class:`RegistryError` (``DIGEST_MISMATCH``, ``SIZE_MISMATCH``
    or ``TRUNCATED``) if the content is not what was asked for; every read after a failure
    fails again.  A consumer that stops before the end (a tar reader may) must call
    :meth:`verify` to read the rest and have it checked.
    """

    def __init__(
        self,
        response: Any,
        digest: str,
        size: int | None,
        where: tuple[str, str],
    ) -> None:
        super().__init__()
        self._response = response
        self.digest = digest
        self.size = size
        self._where = where  # host, repository
        self._hash = _hasher(digest)
        self.count = 0
        self.verified = False
        self._failure: RegistryError | None = None

    def readable(self) -> bool:
        return True

    def _fail(self, message: str, code: str) -> RegistryError:
        host, repository = self._where
        self._failure = RegistryError(
            message, host=host, repository=repository, reference=self.digest, code=code
        )
        self._response.close()
        return self._failure

    def readinto(self, b: Any) -> int:
        if self._failure is not None:
            raise self._failure
        if self.verified or not memoryview(b).nbytes:  # read(0) is not the end
            return 0
        try:
            n = self._response.readinto(b)
        except (http.client.HTTPException, OSError) as err:
            raise self._fail(
                f"blob download broke off after {self.count} bytes"
                + (f" of {self.size}" if self.size is not None else "")
                + f": {_describe(err)}",
                "TRUNCATED",
            ) from err
        if not n:
            self._finish()
            return 0
        self._hash.update(memoryview(b)[:n])
        self.count += n
        if self.size is not None and self.count > self.size:
            raise self._fail(f"blob is longer than its {self.size} bytes", "SIZE_MISMATCH")
        return int(n)

    def _finish(self) -> None:
        if self.size is not None and self.count != self.size:
            raise self._fail(f"blob ended after {self.count} of its {self.size} bytes", "TRUNCATED")
        algorithm = self.digest.split(":", 1)[0]
        got = f"{algorithm}:{self._hash.hexdigest()}"
        if got != self.digest:
            raise self._fail(
                f"blob content does not match its digest (got {got})", "DIGEST_MISMATCH"
            )
        self.verified = True
        self._response.close()

    def verify(self) -> str:
        """Read whatever is left, check it, and return the digest."""
        buf = bytearray(_CHUNK)
        while self.readinto(buf):
            pass
        return self.digest

    def close(self) -> None:
        self._response.close()
        super().close()


class Manifest(NamedTuple):
    """A manifest as the registry sent it, checked against ``digest``."""

    data: bytes
    media_type: str
    digest: str


# ------------------------------------------------------------------------------ client


class _Redirect(urllib.request.HTTPRedirectHandler):
    """Follows registry redirects (blobs live in object storage): keeps HEAD a HEAD, and
    sends the registry's Authorization only to the same scheme, host and port."""

    max_redirections = MAX_REDIRECTS

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: Any,
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is None:
            return None
        if req.get_method() == "HEAD":
            new.method = "HEAD"
        old, dest = urllib.parse.urlsplit(req.full_url), urllib.parse.urlsplit(new.full_url)
        auth = req.get_header("Authorization")
        if auth and (old.scheme, old.netloc) == (dest.scheme, dest.netloc):
            new.add_unredirected_header("Authorization", auth)
        return new


def _describe(err: BaseException) -> str:
    if isinstance(err, urllib.error.URLError) and not isinstance(err, urllib.error.HTTPError):
        reason = err.reason
        return str(reason) if not isinstance(reason, str) else reason
    return str(err) or type(err).__name__


def _error_detail(body: bytes) -> tuple[str, str | None]:
    """The registry's ``errors[]`` as text, and the first error's code."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("errors"), list):
        parts, code = [], None
        for item in doc["errors"]:
            if not isinstance(item, dict):
                continue
            c, m = item.get("code"), item.get("message")
            code = code or (c if isinstance(c, str) else None)
            text = str(m) if m else str(c or "")
            if c and m:
                text = f"{m} ({c})"
            if text:
                parts.append(text)
        return "; ".join(parts), code
    if isinstance(doc, dict) and isinstance(doc.get("details"), str):  # token servers
        return doc["details"], None
    lines = body.decode("utf-8", "replace").strip().splitlines()
    return (lines[0][:200] if lines else ""), None


class RegistryClient:
    """One registry, by host name (``docker.io`` or ``HOST[:PORT]``).

    ``tls_verify=False`` skips certificate checks; ``insecure_http`` says whether plain HTTP
    is used: ``None`` (the default) falls back to it when HTTPS cannot be spoken and
    ``tls_verify`` is false, ``True`` uses only plain HTTP, ``False`` never.  ``creds`` is
    ``(user, password)`` for HTTP basic auth or for fetching bearer tokens.
    """

    def __init__(
        self,
        host: str,
        *,
        tls_verify: bool = True,
        creds: tuple[str, str] | None = None,
        insecure_http: bool | None = None,
        timeout: float = 60.0,
    ) -> None:
        if not _HOST_RE.fullmatch(host):
            raise RegistryError(f"'{host}' is not a valid registry host", code="INVALID")
        self.host = host
        self.endpoint = registry_endpoint(host)
        self.tls_verify = tls_verify
        self.creds = creds
        self.timeout = timeout
        self.retry_delays: tuple[float, ...] = RETRY_DELAYS
        if insecure_http:
            self._schemes = ["http"]
        elif insecure_http is None and not tls_verify:
            self._schemes = ["https", "http"]
        else:
            self._schemes = ["https"]
        self.scheme: str | None = self._schemes[0] if len(self._schemes) == 1 else None
        context = ssl.create_default_context()
        if not tls_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        self._opener = urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=context), _Redirect()
        )
        self._tokens: dict[tuple[str, str, str], _Token] = {}
        self._auth: dict[str, str] = {}  # repository -> Authorization that was accepted
        self._basic_wanted = False

    # ------------------------------------------------------------------ requests

    def _basic(self) -> str | None:
        if self.creds is None:
            return None
        raw = f"{self.creds[0]}:{self.creds[1]}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")

    def _error(
        self, message: str, repository: str | None, reference: str | None, **kw: Any
    ) -> RegistryError:
        return RegistryError(
            message, host=self.host, repository=repository, reference=reference, **kw
        )

    def _http_error(
        self,
        err: urllib.error.HTTPError,
        repository: str | None,
        reference: str | None,
        hint: str = "",
        prefix: str = "",
    ) -> RegistryError:
        try:
            body = err.read(MAX_ERROR_BODY) if err.fp is not None else b""
        except (http.client.HTTPException, OSError):
            body = b""
        finally:
            err.close()
        detail, code = _error_detail(body)
        text = f"{prefix}HTTP {err.code} {err.reason}"
        if detail:
            text += f": {detail}"
        if hint:
            text += f" ({hint})"
        return self._error(text, repository, reference, status=err.code, code=code)

    def _open_url(self, request: urllib.request.Request) -> Any:
        return self._opener.open(request, timeout=self.timeout)

    def _open_retrying(self, request: urllib.request.Request) -> Any:
        """``_open_url``, sent again while the registry answers "try again later"."""
        for delay in self.retry_delays:
            try:
                return self._open_url(request)
            except urllib.error.HTTPError as err:
                if err.code not in RETRY_STATUSES:
                    raise
                time.sleep(_retry_after(err.headers, delay))
                err.close()
        return self._open_url(request)

    def _send(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        auth: str | None,
        repository: str | None,
        reference: str | None,
    ) -> Any:
        """One request; raises HTTPError for HTTP errors, RegistryError if unreachable."""
        tried: list[str] = []
        for scheme in [self.scheme] if self.scheme else self._schemes:
            request = urllib.request.Request(
                f"{scheme}://{self.endpoint}{path}", headers=headers, method=method
            )
            if auth:
                request.add_unredirected_header("Authorization", auth)
            try:
                response = self._open_retrying(request)
            except urllib.error.HTTPError:
                self.scheme = scheme
                raise
            except (OSError, http.client.HTTPException) as err:  # URLError is an OSError
                tried.append(f"{scheme}: {_describe(err)}")
                continue
            self.scheme = scheme
            return response
        hint = ""
        if "http" not in self._schemes and any("SSL" in t for t in tried):
            hint = "; if it speaks plain HTTP, turn TLS verification off"
        raise self._error(
            f"cannot reach the registry ({'; '.join(tried)}){hint}",
            repository,
            reference,
            code="UNREACHABLE",
        )

    def _token(
        self, params: dict[str, str], repository: str, reference: str | None, stale: str | None
    ) -> str:
        realm = params.get("realm", "")
        split = urllib.parse.urlsplit(realm)
        if split.scheme not in ("http", "https") or not split.netloc:
            raise self._error(
                f"bearer challenge has no usable realm ({realm!r})", repository, reference
            )
        service = params.get("service", "")
        scope = params.get("scope") or f"repository:{repository}:pull"
        key = (realm, service, scope)
        cached = self._tokens.get(key)
        if cached and cached.header != stale and cached.expires > time.monotonic():
            return cached.header
        query = [("service", service)] if service else []
        query += [("scope", s) for s in scope.split()]
        url = realm + ("&" if split.query else "?") + urllib.parse.urlencode(query)
        request = urllib.request.Request(
            url, headers={"User-Agent": USER_AGENT, "Accept": "application/json"}
        )
        basic = self._basic()
        if basic:
            if split.scheme == "http" and self.scheme == "https":
                raise self._error(
                    f"token realm {realm} is plain HTTP: not sending credentials there",
                    repository,
                    reference,
                )
            request.add_unredirected_header("Authorization", basic)
        try:
            with self._open_retrying(request) as response:
                body = response.read(MAX_MANIFEST_SIZE)
        except urllib.error.HTTPError as err:
            hint = "check the credentials" if basic else "no credentials were given"
            prefix = f"token request to {realm} failed: "
            raise self._http_error(err, repository, reference, hint, prefix) from None
        except (OSError, http.client.HTTPException) as err:
            raise self._error(
                f"cannot reach the token service {realm}: {_describe(err)}",
                repository,
                reference,
                code="UNREACHABLE",
            ) from err
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            doc = None
        token = None
        if isinstance(doc, dict):
            token = doc.get("token") or doc.get("access_token")
        if not isinstance(token, str) or not token:
            raise self._error(
                f"token service {realm} sent no token", repository, reference, code="INVALID"
            )
        expires_in = doc.get("expires_in") if isinstance(doc, dict) else None
        lifetime = float(expires_in) if isinstance(expires_in, int | float) else 60.0
        header = f"Bearer {token}"
        # a little early, so that a token is not sent as it expires
        self._tokens[key] = _Token(header, time.monotonic() + max(lifetime - 10.0, 1.0))
        return header

    def _request(
        self,
        method: str,
        path: str,
        repository: str,
        reference: str | None,
        accept: str | None = None,
    ) -> Any:
        """A request with authentication as the registry asks for it; an open response."""
        headers = {"User-Agent": USER_AGENT}
        if accept:
            headers["Accept"] = accept
        sent = self._auth.get(repository) or (self._basic() if self._basic_wanted else None)
        try:
            return self._send(method, path, headers, sent, repository, reference)
        except urllib.error.HTTPError as err:
            if err.code != 401:
                raise self._http_error(err, repository, reference) from None
            challenges = parse_challenges(err.headers.get_all("WWW-Authenticate") or [])
            auth = None
            hint = "the registry sent no usable WWW-Authenticate challenge"
            for scheme, params in challenges:
                if scheme == "bearer":
                    auth = self._token(params, repository, reference, sent)
                    break
                if scheme == "basic":
                    self._basic_wanted = True
                    basic = self._basic()
                    if basic is None:
                        hint = "the registry wants credentials; none were given"
                    elif basic == sent:
                        hint = "the credentials were rejected"
                    else:
                        auth = basic
                    break
            if auth is None:
                raise self._http_error(err, repository, reference, hint) from None
            err.close()
        try:
            response = self._send(method, path, headers, auth, repository, reference)
        except urllib.error.HTTPError as err:
            hint = "the credentials were rejected" if err.code in (401, 403) else ""
            if err.code in (401, 403) and auth.startswith("Bearer"):
                hint = "access denied with the token" + (
                    "" if self.creds else ": no credentials were given"
                )
            raise self._http_error(err, repository, reference, hint) from None
        self._auth[repository] = auth
        return response

    # ------------------------------------------------------------------- the API

    def _check(self, repository: str, reference: str) -> None:
        if not _REPOSITORY_RE.fullmatch(repository):
            raise self._error("invalid repository name", repository, None, code="INVALID")
        if not (_TAG_RE.fullmatch(reference) or _DIGEST_RE.fullmatch(reference)):
            raise self._error(
                "invalid tag or unsupported digest", repository, reference, code="INVALID"
            )

    def get_manifest(self, repository: str, reference: str) -> Manifest:
        """The manifest (image manifest or index, OCI or Docker v2) named by a tag or digest.

        Fails if its content does not hash to the digest asked for, or to the registry's
        ``Docker-Content-Digest``; the digest returned is the content's.
        """
        self._check(repository, reference)
        where = (repository, reference)
        response = self._request(
            "GET", f"/v2/{repository}/manifests/{reference}", *where, accept=MANIFEST_ACCEPT
        )
        with response:
            try:
                data = response.read(MAX_MANIFEST_SIZE + 1)
            except (http.client.HTTPException, OSError) as err:
                raise self._error(
                    f"manifest download broke off: {_describe(err)}", *where, code="TRUNCATED"
                ) from err
            headers = response.headers
        length = _content_length(headers)
        if length is not None and len(data) != length and len(data) <= MAX_MANIFEST_SIZE:
            raise self._error(
                f"manifest download broke off after {len(data)} of {length} bytes",
                *where,
                code="TRUNCATED",
            )
        if len(data) > MAX_MANIFEST_SIZE:
            raise self._error(
                f"manifest larger than {MAX_MANIFEST_SIZE} bytes", *where, code="INVALID"
            )
        media_type = _media_type(headers.get_content_type(), data)
        if media_type in MEDIA_DOCKER_SCHEMA1:
            raise self._error(
                f"Docker schema 1 manifests ({media_type}) are not supported",
                *where,
                code="UNSUPPORTED",
            )
        if _DIGEST_RE.fullmatch(reference):
            digest = _digest_of(data, reference)
            if digest != reference:
                raise self._error(
                    f"manifest content does not match the digest asked for (got {digest})",
                    *where,
                    code="DIGEST_MISMATCH",
                )
        else:
            digest = _digest_of(data)
        claimed = headers.get("Docker-Content-Digest")
        if claimed:
            claimed = claimed.strip()
            if not _DIGEST_RE.fullmatch(claimed):
                raise self._error(
                    f"registry sent an unsupported Docker-Content-Digest '{claimed}'",
                    *where,
                    code="UNSUPPORTED",
                )
            if _digest_of(data, claimed) != claimed:
                raise self._error(
                    f"manifest content does not match the registry's digest {claimed}",
                    *where,
                    code="DIGEST_MISMATCH",
                )
        return Manifest(data, media_type, digest)

    def open_blob(self, repository: str, digest: str, *, size: int | None = None) -> BlobReader:
        """A stream of the blob, checked against ``digest`` as it is read (and against
        ``size``, the descriptor's, when given; else the Content-Length, when sent)."""
        self._check(repository, digest)
        if not _DIGEST_RE.fullmatch(digest):
            raise self._error("a blob is named by its digest", repository, digest)
        response = self._request("GET", f"/v2/{repository}/blobs/{digest}", repository, digest)
        length = _content_length(response.headers)
        if size is not None and length is not None and size != length:
            response.close()
            raise self._error(
                f"registry sends {length} bytes for a blob of {size}",
                repository,
                digest,
                code="SIZE_MISMATCH",
            )
        where = (self.host, repository)
        return BlobReader(response, digest, size if size is not None else length, where)

    def read_blob(self, repository: str, digest: str, *, max_size: int = 16 << 20) -> bytes:
        """A small blob (an image config) whole, checked; at most ``max_size`` bytes."""
        with self.open_blob(repository, digest) as blob:
            if blob.size is not None and blob.size > max_size:
                raise self._error(
                    f"blob of {blob.size} bytes is over the limit of {max_size}",
                    repository,
                    digest,
                    code="INVALID",
                )
            data = bytearray()
            while chunk := blob.read(_CHUNK):
                data += chunk
                if len(data) > max_size:
                    raise self._error(
                        f"blob is over the limit of {max_size} bytes",
                        repository,
                        digest,
                        code="INVALID",
                    )
            return bytes(data)

    def blob_size(self, repository: str, digest: str) -> int | None:
        """The blob's size from a HEAD request (``None`` if the registry does not say)."""
        self._check(repository, digest)
        response = self._request("HEAD", f"/v2/{repository}/blobs/{digest}", repository, digest)
        with response:
            return _content_length(response.headers)


def _retry_after(headers: Message | None, default: float) -> float:
    """The pause a Retry-After header asks for (seconds; dates are not honoured), bounded."""
    value = headers.get("Retry-After", "") if headers is not None else ""
    try:
        asked = float(value)
    except ValueError:
        return default
    if not asked >= 0.0:  # NaN
        return default
    return min(asked, MAX_RETRY_AFTER)


def _content_length(headers: Message) -> int | None:
    value = headers.get("Content-Length")
    if value is None or not value.strip().isdigit():
        return None
    return int(value)


def _media_type(content_type: str, data: bytes) -> str:
    """The manifest's media type: the Content-Type, unless that is generic; then the
    document's own ``mediaType``, or what its shape says."""
    if content_type not in ("application/json", "text/plain", "application/octet-stream"):
        return content_type
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return content_type
    if isinstance(doc, dict):
        declared = doc.get("mediaType")
        if isinstance(declared, str) and declared:
            return declared
        if doc.get("schemaVersion") == 1:
            return "application/vnd.docker.distribution.manifest.v1+json"
        if isinstance(doc.get("manifests"), list):
            return MEDIA_OCI_INDEX
        if isinstance(doc.get("layers"), list):
            return MEDIA_OCI_MANIFEST
    return content_type


# ---------------------------------------------------------------------------- platforms

_GOARCH = {
    "x86_64": ("amd64", ""),
    "x86-64": ("amd64", ""),
    "amd64": ("amd64", ""),
    "aarch64": ("arm64", ""),
    "arm64": ("arm64", ""),
    "armv8l": ("arm", "v8"),
    "armv7l": ("arm", "v7"),
    "armv7": ("arm", "v7"),
    "armhf": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "armel": ("arm", "v6"),
    "armv5tel": ("arm", "v5"),
    "i386": ("386", ""),
    "i486": ("386", ""),
    "i586": ("386", ""),
    "i686": ("386", ""),
    "ppc64le": ("ppc64le", ""),
    "ppc64": ("ppc64", ""),
    "s390x": ("s390x", ""),
    "riscv64": ("riscv64", ""),
    "mips64": ("mips64", ""),
    "mips64el": ("mips64le", ""),
    "loongarch64": ("loong64", ""),
}
_DEFAULT_VARIANT = {"arm64": "v8", "arm": "v7", "amd64": "v1"}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        text = f"{self.os}/{self.architecture}"
        return f"{text}/{self.variant}" if self.variant else text


def _normalize(os_name: str, arch: str, variant: str) -> Platform:
    arch, implied = _GOARCH.get(arch.lower(), (arch.lower(), ""))
    variant = variant.lower() or implied
    if variant and variant[0].isdigit():
        variant = f"v{variant}"
    return Platform(os_name.lower(), arch, variant)


def parse_platform(text: str) -> Platform:
    """``OS/ARCH[/VARIANT]``, normalized to Go's names (``linux/aarch64`` is ``linux/arm64``)."""
    parts = text.strip().split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise RegistryError(f"invalid platform '{text}': expected OS/ARCH[/VARIANT]")
    return _normalize(parts[0], parts[1], parts[2] if len(parts) == 3 else "")


def default_platform() -> str:
    """This machine's platform as OCI names it (``linux/amd64``, ``linux/arm/v7``...)."""
    machine = _platform.machine().lower()
    arch, variant = _GOARCH.get(machine, (machine, ""))
    text = f"{_platform.system().lower() or 'linux'}/{arch}"
    return f"{text}/{variant}" if variant else text


def _variant_or_default(p: Platform) -> str:
    return p.variant or _DEFAULT_VARIANT.get(p.architecture, "")


def select_platform(
    index: bytes | str | Mapping[str, Any], platform: str | None = None
) -> dict[str, Any]:
    """The descriptor of ``index`` (an OCI index or Docker manifest list, as JSON or parsed)
    for ``platform`` (``OS/ARCH[/VARIANT]``; this machine's by default).

    Without a variant any variant matches, the architecture's baseline first (``v8`` for
    arm64, ``v7`` for arm, ``v1`` for amd64), then the index's order; an absent variant
    counts as the baseline (``linux/arm64`` is ``linux/arm64/v8``).
    """
    doc: Any = index
    if isinstance(index, bytes | str):
        try:
            doc = json.loads(index)
        except (ValueError, UnicodeDecodeError) as err:
            raise RegistryError(f"index is not valid JSON: {err}", code="INVALID") from err
    manifests = doc.get("manifests") if isinstance(doc, Mapping) else None
    if not isinstance(manifests, list):
        raise RegistryError("index has no 'manifests' list", code="INVALID")
    want = parse_platform(platform or default_platform())
    explicit_variant = platform is not None and platform.strip().count("/") == 2
    matches: list[tuple[int, int, dict[str, Any]]] = []
    seen: list[str] = []
    for position, descriptor in enumerate(manifests):
        if not isinstance(descriptor, dict) or not isinstance(descriptor.get("digest"), str):
            raise RegistryError(f"index entry {position} is not a descriptor", code="INVALID")
        p = descriptor.get("platform")
        if not isinstance(p, dict):
            continue
        have = _normalize(
            str(p.get("os", "")), str(p.get("architecture", "")), str(p.get("variant", ""))
        )
        seen.append(str(have))
        if (have.os, have.architecture) != (want.os, want.architecture):
            continue
        if explicit_variant and _variant_or_default(have) != _variant_or_default(want):
            continue
        baseline = _variant_or_default(have) == _variant_or_default(want)
        matches.append((0 if baseline else 1, position, descriptor))
    if not matches:
        available = ", ".join(dict.fromkeys(seen)) or "none with a platform"
        raise RegistryError(
            f"no image for platform {want} in the index (it has: {available})",
            code="UNSUPPORTED",
        )
    return min(matches, key=lambda m: (m[0], m[1]))[2]
