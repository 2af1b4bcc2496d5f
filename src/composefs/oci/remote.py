"""Images from a registry (``docker://``): the registry client behind the Source interface."""

from __future__ import annotations

import io
from typing import IO

from composefs.oci.image import Descriptor, Manifest
from composefs.oci.registry import RegistryClient, parse_reference
from composefs.oci.sources import Source


class RegistrySource(Source):
    def __init__(
        self,
        reference: str,
        name: str,
        *,
        creds: tuple[str, str] | None = None,
        tls_verify: bool = True,
    ) -> None:
        self.name = name
        self.ref = parse_reference(reference)
        self.client = RegistryClient(self.ref.host, tls_verify=tls_verify, creds=creds)

    def manifest(self, platform: str) -> Manifest:
        got = self.client.get_manifest(self.ref.repository, self.ref.reference)
        return self._resolve(got.data, got.digest, platform, got.media_type)

    def _fetch_manifest(self, desc: Descriptor) -> tuple[bytes, str | None]:
        got = self.client.get_manifest(self.ref.repository, desc.digest)  # checked
        return got.data, got.media_type

    def blob(self, desc: Descriptor) -> IO[bytes]:
        reader = self.client.open_blob(self.ref.repository, desc.digest, size=desc.size)
        return io.BufferedReader(reader, 1 << 18)
