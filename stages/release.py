"""release: the trained RPN as a checkpoint that carries the settings evaluate ran it with (and its scores).

``SDRPN.from_pretrained`` and ``sdrpn inspect`` read the recorded settings, so a released RPN answers as the
evaluate stage did without the user copying ``params.yaml: evaluate`` by hand. No model is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from pipeline.inference.params import InferenceSettings
from pipeline.student.checkpoint import write_release
from stages.common import params_option, writes
from stages.evaluate_params import eval_params

# evaluate's methods that describe the released RPN itself (plus the baseline it is measured against)
RELEASED_METHODS = ("baseline", "sdrpn_masked", "sdrpn_box")


@click.command("release")
@click.argument("rpn_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option(
    "--metrics",
    "metrics_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="evaluate's metrics JSON: its baseline and sdrpn_* figures go into the release's config",
)
@params_option
@writes("out_dir")
def release(rpn_dir: Path, out_dir: Path, metrics_path: Path | None, params_path: Path) -> None:
    """Copy RPN_DIR to OUT_DIR with evaluate's two-stage settings recorded in its rpn_config.json."""
    settings = InferenceSettings.from_eval(eval_params(params_path))
    extra = {}
    if metrics_path is not None:
        metrics = json.loads(metrics_path.read_text())
        # scores only: timings change from run to run and would make the release's bytes do so too
        extra["evaluation"] = {
            m: {k: v for k, v in metrics[m].items() if not k.startswith("throughput")}
            for m in RELEASED_METHODS
            if m in metrics
        }
    write_release(rpn_dir, out_dir, settings.to_dict(), extra)
    click.echo(f"{out_dir}: {json.dumps(settings.to_dict())}")
