"""`sdrpn report`: the compact summary shows exactly the figures of the metrics files, aligned."""

from __future__ import annotations

import json

from click.testing import CliRunner

from pipeline.report.summary import summary, table
from stages.cli import main

EVALUATE = {
    "baseline": {"accuracy": 0.335, "n": 200},
    "sdrpn_masked": {
        "accuracy": 0.75,
        "n": 200,
        "region_found": 1.0,
        "roi_precision": 0.6612,
        "box_recall": 0.96,
        "iou": 0.4,
        "throughput_vs_baseline": 0.4431,
    },
    "raw_attention": {"accuracy": 0.56, "n": 200, "roi_precision": None, "box_recall": 0.38},
}
LABELS = {
    "n_samples_with_gt": 1500,
    "n_kept": 1498,
    "raw_attention": {"fg_precision": 0.6021, "fg_recall": 0.9, "argmax_in_box": 1.0},
    "labels": {"fg_precision": 0.8133, "fg_recall": 0.88, "argmax_in_box": float("nan")},
    "sinks": {"per_sample": 4.0, "share_inside_gt_box": 0.009},
}
TRAIN = {"holdout_loss": 0.1234, "holdout_fg_acc": 0.9, "holdout_bg_acc": 0.99, "n_train": 1425, "n_holdout": 75}


def test_summary_rows_hold_the_metrics():
    text = summary(EVALUATE, LABELS, TRAIN)
    lines = text.splitlines()
    masked = next(line for line in lines if line.startswith("SD-RPN, masked upscaling"))
    assert masked.split()[-5:] == ["0.750", "0.96", "0.66", "0.44x", "200"]
    base = next(line for line in lines if line.startswith("baseline"))
    assert base.split()[-5:] == ["0.335", "-", "-", "1.00x", "200"]  # no crops: no localisation
    raw = next(line for line in lines if line.startswith("RoI from raw attention"))
    assert raw.split()[-5:] == ["0.560", "0.38", "-", "-", "200"]  # None and missing both show as '-'
    labels = next(line for line in lines if line.startswith("labels (after sink removal)"))
    assert labels.split()[-3:] == ["0.81", "0.88", "-"]  # NaN shows as '-'
    assert "1500 samples with a GT box, 1498 kept" in text and "held-out loss 0.1234" in text
    # columns line up: every row of the method table is as wide as its header
    table_lines = lines[2 : 2 + 2 + len(EVALUATE)]  # header, rule, one row per method
    assert len({len(line) for line in table_lines}) == 1


def test_summary_leaves_out_missing_parts():
    assert summary(EVALUATE).startswith("evaluation (200 samples)")
    assert "label quality" not in summary(EVALUATE) and summary(None, None, None) == ""
    assert table(["a", "b"], [["x", "1"]]).splitlines() == ["a  b", "-  -", "x  1"]


def test_report_command_reads_the_metrics_files(tmp_path):
    ev, lq = tmp_path / "evaluate.json", tmp_path / "label_quality.json"
    ev.write_text(json.dumps(EVALUATE))
    lq.write_text(json.dumps(LABELS))
    args = ["report", "--evaluate", str(ev), "--labels", str(lq), "--train", str(tmp_path / "none.json")]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "SD-RPN, masked upscaling" in res.output and "fg precision" in res.output
    assert "RPN training" not in res.output
    missing = CliRunner().invoke(main, ["report", "--evaluate", "x.json", "--labels", "y.json", "--train", "z.json"])
    assert missing.exit_code == 1 and "run `dvc repro` first" in missing.output
