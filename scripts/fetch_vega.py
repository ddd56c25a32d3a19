"""Vendor vega, vega-lite and vega-embed so that `dvc plots show` draws its plots without a network.

DVC's own page loads the three libraries from a public CDN, so offline it stays blank. This script downloads
the pinned npm tarballs once, checks each against the integrity the registry publishes for it, and writes
``vendor/vega/``:

* ``dvc_plots.html``: DVC's HTML template with the three minified UMD builds inline, byte for byte as the
  tarballs hold them (``.dvc/config`` ``plots.html_template`` points at it). Inline, because DVC writes the page
  into its output folder (``dvc_plots/`` or ``-o``), where a relative ``<script src>`` would not resolve;
* ``LICENSE.<name>``: each library's licence (their notices are also repeated in the template, so every page
  DVC writes carries them);
* ``versions.json``: version, tarball, registry integrity and the sha256 of each inlined build
  (``tests/test_offline_plots.py`` checks the template against it).

The files are committed; run this only to change the pins (it needs the npm registry):

    python scripts/fetch_vega.py
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import tarfile
import urllib.request
from pathlib import Path

REGISTRY = "https://registry.npmjs.org"
# DVC writes vega-lite v5 specs and its page loads vega 5, vega-lite 5 and vega-embed 6 (dvc_render/vega.py):
# the newest release of each of those majors keeps that contract and has the fixes since.
PINNED = {"vega": "5.33.1", "vega-lite": "5.23.0", "vega-embed": "6.29.0"}
ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "vendor" / "vega"
TEMPLATE_NAME = "dvc_plots.html"
# What DVC's HTML template fill replaces (dvc_render/html.py); the scripts one is left out on purpose, since DVC
# fills it with the CDN <script> tags.
PLACEHOLDERS = ("{plot_divs}", "{refresh_tag}", "{scripts}")

PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {{refresh_tag}}
    <title>DVC Plot</title>
    <!--
    {versions} are inline (written by scripts/fetch_vega.py) so that this page draws its plots offline.
{notices}
    -->
{scripts}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=120) as response:
        return response.read()


def _check_integrity(data: bytes, integrity: str, what: str) -> None:
    """Compare ``data`` with an npm ``dist.integrity`` value (Subresource Integrity: ``sha512-<base64>``)."""
    algo, _, expected = integrity.partition("-")
    actual = base64.b64encode(hashlib.new(algo, data).digest()).decode()
    if actual != expected:
        raise SystemExit(f"{what}: {algo} of the download is {actual}, the registry says {expected}")


def fetch(name: str, version: str) -> tuple[dict, bytes, str | None]:
    """Download one pinned package; returns its versions.json entry, its minified build and its LICENSE text."""
    meta = json.loads(_get(f"{REGISTRY}/{name}/{version}"))
    dist = meta["dist"]
    tarball = _get(dist["tarball"])
    _check_integrity(tarball, dist["integrity"], f"{name}@{version}")
    member = f"package/build/{name}.min.js"
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as tar:
        names = tar.getnames()
        if member not in names:
            raise SystemExit(f"{name}@{version}: the tarball has no {member}")
        build = tar.extractfile(member).read()
        licence = tar.extractfile("package/LICENSE").read().decode() if "package/LICENSE" in names else None
    code = build.decode()
    # inline it must stay one <script> element and survive DVC's placeholder replacement untouched
    for bad in ("</script", *PLACEHOLDERS):
        if bad in code.lower():
            raise SystemExit(f"{name}@{version}: {member} contains {bad!r}; it cannot be inlined as it is")
    entry = {
        "version": version,
        "license": meta.get("license"),
        "tarball": dist["tarball"],
        "integrity": dist["integrity"],
        "file": member.removeprefix("package/"),
        "sha256": hashlib.sha256(build).hexdigest(),
    }
    return entry, build, licence


def main() -> None:
    """Fetch the pinned libraries and write the template, the licences and versions.json under vendor/vega/."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    versions, scripts, notices = {}, [], []
    for name, version in PINNED.items():
        entry, build, licence = fetch(name, version)
        licence_path = args.out / f"LICENSE.{name}"
        if licence is not None:
            licence_path.write_text(licence)
        elif not licence_path.is_file():
            # vega's tarball ships none: its licence is kept in the repository, taken from vega's own repository
            raise SystemExit(f"{name}@{version} ships no LICENSE: put its licence text in {licence_path}")
        text = licence_path.read_text()
        for bad in ("--", *PLACEHOLDERS):
            if bad in text:
                raise SystemExit(f"{licence_path} contains {bad!r}, which the template's HTML comment cannot hold")
        versions[name] = entry
        notices.append(f"    {name} {version} ({entry['license']}):\n{text.rstrip()}\n")
        scripts.append(f'    <script data-lib="{name}" data-version="{version}">\n{build.decode()}\n    </script>')
        print(f"{name}@{version}: integrity ok, {entry['file']} {len(build)} bytes, sha256 {entry['sha256'][:12]}")
    listed = ", ".join(f"{n} {v['version']}" for n, v in versions.items())
    page = PAGE.format(versions=listed, notices="\n".join(notices), scripts="\n".join(scripts))
    (args.out / TEMPLATE_NAME).write_text(page)
    (args.out / "versions.json").write_text(json.dumps(versions, indent=2) + "\n")
    print(f"wrote {args.out / TEMPLATE_NAME} ({len(page.encode())} bytes)")


if __name__ == "__main__":
    main()
