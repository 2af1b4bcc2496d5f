"""Images from a registry (``docker://``): the registry client behind the Source interface."""

from __future__ import annotations

import io
from typing import IO

from composefs.oci.image import Descriptor, Manifest, OciError, index_entries, is_index
from composefs.oci.registry import RegistryClient, parse_reference, select_platform
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
        for _depth in range(4):  # an index of indexes is allowed, a loop is not
            if not is_index(got.data, got.media_type):
                return Manifest.parse(got.data, got.digest)
            index_entries(got.data, f"{self.name}: index {got.digest}")  # checks descriptors
            chosen = Descriptor.parse(select_platform(got.data, platform), self.name)
            got = self.client.get_manifest(self.ref.repository, chosen.digest)
        raise OciError(f"{self.name}: indexes nested too deep")

    def blob(self, desc: Descriptor) -> IO[bytes]:
        reader = self.client.open_blob(self.ref.repository, desc.digest, size=desc.size)
        return io.BufferedReader(reader, 1 << 18)
