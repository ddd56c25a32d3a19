"""`sdrpn report --html`: one self-contained page (nothing to load but data: images) with the text summary's figures,
the plots as inline SVG and the inspect pictures; the text output stays what `sdrpn report` prints without it."""

from __future__ import annotations

import base64
import io
import json
import re

import pytest
from click.testing import CliRunner
from offline_html import resource_refs
from PIL import Image
from test_report import EVALUATE, LABELS, TRAIN

from pipeline.report.html_page import Picture, page
from pipeline.report.svg_charts import line_chart, nice_ticks, tick_labels
from stages.cli import main

STEPS = [{"step": float(s), "epoch": 0.0, "loss": 1 / s, "lr": 1e-3 * s / 4} for s in range(1, 5)]
FIG3 = [
    {"bin": f"{b / 10:.1f}-{(b + 1) / 10:.1f}", "raw_inside_gt": b / 10, "denoised_inside_gt": b / 9} for b in range(10)
]


def _png(colour: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), colour).save(buf, format="PNG")
    return buf.getvalue()


def _cells(html: str) -> list[list[str]]:
    return [re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", html)]


def test_page_is_self_contained_with_the_figures():
    pictures = [Picture("world-1-000000", _png("red")), Picture("world-1-000001", _png("blue"))]
    html = page(EVALUATE, LABELS, TRAIN, train_steps=STEPS, fig3=FIG3, pictures=pictures)
    refs = resource_refs(html)
    assert refs and all(url.startswith("data:image/png;base64,") for _, url in refs)  # no file, no remote
    assert "default-src 'none'" in html  # and the browser is told to load nothing else
    assert "<script" not in html and "<link" not in html
    # the tables are the text summary's rows, cell for cell
    rows = _cells(html)
    assert ["SD-RPN, masked upscaling", "0.750", "0.96", "0.66", "0.44x", "200"] in rows
    assert ["baseline (base view only)", "0.335", "-", "-", "1.00x", "200"] in rows
    assert ["labels (after sink removal)", "0.81", "0.88", "-"] in rows
    assert "1500 samples with a GT box, 1498 kept" in html and "held-out loss 0.1234" in html
    # loss, lr, Fig. 3 and accuracy per method, drawn inline
    assert html.count("<svg") == 4
    for title in ("RPN training loss", "learning rate", "paper Fig. 3", "accuracy per method"):
        assert title in html
    assert "0.0-0.1" in html and "0.9-1.0" in html  # Fig. 3's bins as its x labels
    # each picture is the PNG given, byte for byte
    images = [base64.b64decode(url.split(",", 1)[1]) for _, url in refs]
    assert images == [p.png for p in pictures]
    assert "world-1-000001" in html


def test_page_leaves_out_what_is_missing():
    html = page(EVALUATE, None, None, notes=["no artifacts/train_metrics.json: that part is left out"])
    assert html.count("<svg") == 1  # only accuracy per method: no loss table, no Fig. 3 table
    assert "Label quality" not in html and "RPN training" not in html
    assert "No inspect pictures" in html and "no artifacts/train_metrics.json" in html
    assert resource_refs(html) == []
    with pytest.raises(ValueError, match="not a PNG"):
        page(EVALUATE, pictures=[Picture("x", b"GIF89a")])


def test_charts_scale_and_gaps():
    assert nice_ticks(0.02, 0.98) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(0, 135, 6) == [0, 50, 100, 150]  # steps of 1, 2 or 5 times a power of ten
    assert tick_labels([0.0, 2e-4, 4e-4]) == ["0", "2.0e-04", "4.0e-04"]  # one format per axis
    assert tick_labels([0.0, 0.5, 1.0]) == ["0.0", "0.5", "1.0"]
    # a missing value breaks the line into two, it is not drawn as zero
    svg = line_chart([1, 2, 3, 4], {"loss": [0.5, None, 0.3, 0.2]}, title="t", x_label="x", y_label="y")
    lines = re.findall(r'<polyline points="([^"]+)" fill="none" stroke="#4c78a8"', svg)
    assert [len(p.split()) for p in lines] == [1, 2]


def test_report_html_option(tmp_path):
    ev, lq, tr = tmp_path / "evaluate.json", tmp_path / "label_quality.json", tmp_path / "train.json"
    for path, value in ((ev, EVALUATE), (lq, LABELS), (tr, TRAIN)):
        path.write_text(json.dumps(value))
    steps, fig3 = tmp_path / "train_steps.csv", tmp_path / "label_fig3.tsv"
    steps.write_text("step,epoch,loss,lr,grad_norm\n" + "".join(f"{s},0,{1 / s},{s * 1e-4},1.0\n" for s in (1, 2, 3)))
    fig3.write_text("bin\traw_inside_gt\tdenoised_inside_gt\n0.0-0.1\t0.02\t0.02\n0.1-0.2\t0.4\t0.45\n")
    inspect = tmp_path / "inspect"
    inspect.mkdir()
    for i, colour in enumerate(("red", "green", "blue", "white")):
        (inspect / f"world-1-00000{i}.png").write_bytes(_png(colour))
    base = ["report", "--evaluate", str(ev), "--labels", str(lq), "--train", str(tr)]
    plain = CliRunner().invoke(main, base)
    out = tmp_path / "out" / "report.html"
    extra = ["--html", str(out), "--train-steps", str(steps), "--fig3", str(fig3), "--inspect-dir", str(inspect)]
    with_html = CliRunner().invoke(main, [*base, *extra])
    assert plain.exit_code == 0 and with_html.exit_code == 0, with_html.output
    assert with_html.stdout == plain.stdout  # the text table is unchanged
    html = out.read_text()
    assert html.count("<svg") == 4
    assert len(resource_refs(html)) == 3  # the first three pictures by name
    assert "world-1-000002" in html and "world-1-000003" not in html
    # a run with no plot tables and no pictures still writes the page, saying what it left out
    bare = tmp_path / "bare.html"
    args = ["--html", str(bare), "--train-steps", str(tmp_path / "none.csv"), "--fig3", str(tmp_path / "none.tsv")]
    args += ["--inspect-dir", str(tmp_path / "none")]
    assert CliRunner().invoke(main, [*base, *args]).exit_code == 0
    text = bare.read_text()
    assert "none.csv: its plot is left out" in text and "none.tsv: its plot is left out" in text
    assert text.count("<svg") == 1 and "No inspect pictures" in text
