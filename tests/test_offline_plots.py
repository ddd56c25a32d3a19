"""`dvc plots show` draws offline: with the project's .dvc/config the page loads nothing from the network and holds
vega, vega-lite and vega-embed inline, exactly the builds vendor/vega/versions.json pins; without it, DVC's page
loads them from a CDN (so the check below can fail)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

from dvc_project import ROOT, run_dvc
from offline_html import remote_loads

VENDOR = ROOT / "vendor" / "vega"
_INLINE = re.compile(r'<script data-lib="([^"]+)" data-version="([^"]+)">\n(.*?)\n    </script>', re.S)


def _inline_libraries(html: str) -> dict[str, tuple[str, str]]:
    """name -> (version, sha256 of the inline build) of every vendored library inlined in ``html``."""
    return {m[1]: (m[2], hashlib.sha256(m[3].encode()).hexdigest()) for m in _INLINE.finditer(html)}


def _fake_outputs(proj: Path) -> None:
    """The plot files dvc.yaml declares, a few rows each, as the stages write them."""
    (proj / "artifacts" / "plots").mkdir(parents=True)
    (proj / "artifacts" / "train_steps.csv").write_text(
        "step,epoch,loss,lr,grad_norm\n" + "".join(f"{s},0,{1 / s:.4f},{1e-3 * s / 5:.6f},1.0\n" for s in range(1, 6))
    )
    (proj / "artifacts" / "plots" / "label_fig3.tsv").write_text(
        "bin\traw_inside_gt\tdenoised_inside_gt\n"
        + "".join(f"{b / 10:.1f}-{(b + 1) / 10:.1f}\t{b / 10:.2f}\t{b / 9:.2f}\n" for b in range(10))
    )
    (proj / "artifacts" / "plots" / "evaluate.csv").write_text(
        "method,accuracy,n_skipped\nbaseline,0.285,0\nsdrpn_masked,0.705,0\n"
    )


def test_plots_page_loads_nothing_remote(tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, proj / name)
    shutil.copytree(VENDOR, proj / "vendor" / "vega")
    subprocess.run(["git", "init", "-q"], cwd=proj, check=True)
    run_dvc(proj, "init", "-q")
    shutil.copy(ROOT / ".dvc" / "config", proj / ".dvc" / "config")
    shutil.copytree(ROOT / ".dvc" / "plots", proj / ".dvc" / "plots")
    _fake_outputs(proj)

    run_dvc(proj, "plots", "show", "-o", "offline")
    html = (proj / "offline" / "index.html").read_text()
    assert remote_loads(html) == []
    pinned = json.loads((VENDOR / "versions.json").read_text())
    assert _inline_libraries(html) == {name: (v["version"], v["sha256"]) for name, v in pinned.items()}
    # every plot of dvc.yaml is on the page: the top-level ones by title, the stages' by file
    for title in ("paper Fig. 3", "learning rate", "artifacts/train_steps.csv", "artifacts/plots/evaluate.csv"):
        assert title in html
    assert html.count("vegaEmbed('#") == 5

    # the template is what makes it so: DVC's own page fetches the libraries
    run_dvc(proj, "config", "--unset", "plots.html_template")
    run_dvc(proj, "plots", "show", "-o", "default")
    default = remote_loads((proj / "default" / "index.html").read_text())
    assert {url.split("@")[0] for _, url in default} == {
        f"https://cdn.jsdelivr.net/npm/{name}" for name in ("vega", "vega-lite", "vega-embed")
    }


def test_template_is_the_pinned_builds():
    """The committed template holds the builds versions.json records, and each library's licence is beside it."""
    template = (VENDOR / "dvc_plots.html").read_text()
    pinned = json.loads((VENDOR / "versions.json").read_text())
    assert _inline_libraries(template) == {name: (v["version"], v["sha256"]) for name, v in pinned.items()}
    assert "{plot_divs}" in template and "{scripts}" not in template  # DVC fills {scripts} with the CDN tags
    for name, entry in pinned.items():
        licence = (VENDOR / f"LICENSE.{name}").read_text()
        assert entry["license"] == "BSD-3-Clause" and "Redistribution and use in source and binary forms" in licence
        assert licence.strip() in template  # the notice travels with every page DVC writes
    assert remote_loads(template) == []
