#!/usr/bin/env python3
"""Benchmark: getting a registry image as a mountable tree.

A multi-layer image is built with umoci from subtrees of /usr (default: /usr/bin,
/usr/share, /usr/include: a few hundred MB) and pushed with skopeo to a docker-registry
on 127.0.0.1.  Then, each from scratch:

- ``cfsctl oci pull docker://…`` into an empty repository (objects + composefs image);
- ``skopeo copy docker://… oci:DIR`` followed by ``umoci unpack`` (the usual way to get a
  tree on disk);
- ``cfsctl oci pull`` of a second tag sharing all but the top layer (layers reused).

Prints wall and CPU times and the ratio.  Needs docker-registry, skopeo and umoci
(``scripts/bootstrap.sh`` installs them).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from measure import REPO, measure

sys.path.insert(0, str(REPO / "tests"))
from registry import Layer, build_image, run_registry


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", nargs="+", default=["/usr/bin", "/usr/share", "/usr/include"],
                    help="directories, one layer each (bottom first)")  # fmt: skip
    ap.add_argument("--dir", default=None, help="scratch directory (default: system temp)")
    args = ap.parse_args()
    cfsctl = str(REPO / ".venv/bin/cfsctl")
    for tool in ("skopeo", "umoci", "docker-registry"):
        if not shutil.which(tool):
            print(f"{tool} is missing (scripts/bootstrap.sh installs it)")
            return 1
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp_name:
        tmp = Path(tmp_name)
        layout = tmp / "layout"
        layers = [Layer(tree=_staged(Path(d), tmp / f"src{i}")) for i, d in enumerate(args.layers)]
        build_image(layout, "big", layers)
        build_image(layout, "next", [*layers[:-1], Layer(files={"extra/file": "new\n"})])
        size = sum(p.stat().st_size for p in (layout / "blobs").rglob("*") if p.is_file())
        print(f"image: {len(layers)} layers from {', '.join(args.layers)}; "
              f"blobs {size / 1e6:.0f} MB (gzip)")  # fmt: skip
        with run_registry(tmp / "registry") as reg:
            for tag in ("big", "next"):
                reg.push(layout, tag, "bench/img")
            src = f"docker://{reg.host}/bench/img"
            repo = tmp / "repo"
            subprocess.run([cfsctl, "--repo", str(repo), "init"], check=True, capture_output=True)
            ours = measure([cfsctl, "--repo", str(repo), "oci", "pull", "--tls-verify=false",
                            f"{src}:big"])  # fmt: skip
            again = measure([cfsctl, "--repo", str(repo), "oci", "pull", "--tls-verify=false",
                             f"{src}:next"])  # fmt: skip
            copy = measure(["skopeo", "copy", "--insecure-policy", "--src-tls-verify=false",
                            f"{src}:big", f"oci:{tmp / 'copied'}:big"])  # fmt: skip
            unpack = measure(["umoci", "unpack", "--image", f"{tmp / 'copied'}:big",
                              str(tmp / "bundle")])  # fmt: skip
    theirs = (copy[0] + unpack[0], copy[1] + unpack[1])
    print(f"  cfsctl oci pull              {ours[0]:7.2f} s (cpu {ours[1]:6.2f})")
    print(f"  skopeo copy + umoci unpack   {theirs[0]:7.2f} s (cpu {theirs[1]:6.2f})"
          f"   [copy {copy[0]:.2f} s, unpack {unpack[0]:.2f} s]")  # fmt: skip
    print(f"  ratio (ours / theirs): {ours[0] / theirs[0]:.2f}x wall")
    print(f"  second tag, base layers reused: {again[0]:7.2f} s (cpu {again[1]:6.2f})")
    return 0


def _staged(src: Path, dest: Path) -> Path:
    """A copy of ``src`` with only regular files, directories and symlinks (what a layer
    built from a directory holds), under ``dest/<src path>``."""
    target = dest / str(src).lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-a", "--no-preserve=xattr", str(src), str(target)], check=True)
    return dest


if __name__ == "__main__":
    sys.exit(main())
