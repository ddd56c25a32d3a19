"""Train the embedded default model (a small LLaVA) on the synthetic world, from a seed.

Data are generated in-process with a process pool into ``.npy`` memory maps (the base view and
one training crop per image, already resized to the model's 224 px view, plus the frames'
colours, glyphs and token-cell boxes), then moved to the device once; a step only indexes them.

Each step mixes two kinds of sample:
* base view only, ``--turns`` QA turns about different frames of one image;
* base view + a high-resolution crop of the named frame (random margin and jitter) as a second
  image, one QA turn.
Loss is on the answer tokens (glyph and ``</s>``). Training-only extras, never saved: a
per-token auxiliary head on the projector output (glyph and frame colour of every token cell),
and optionally a "point" loss that asks ``--point-heads`` heads of decoder layer
``--point-layer`` to put the answer position's attention on the named frame's tokens.

The saved directory is a plain ``LlavaForConditionalGeneration`` + processor (fp32 safetensors).
The work is done by ``toymodels/embedded/`` (data, losses, loop); this file is its command line.

    python scripts/train_embedded_model.py --out models/sdrpn-toy-llava --time-budget 380
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

try:  # older transformers (the GPU machine's) lack the PIL image processor; the processor is only saved, not used
    from transformers import LlavaImageProcessorPil  # noqa: F401
except ImportError:  # pragma: no cover
    import transformers

    transformers.LlavaImageProcessorPil = transformers.LlavaImageProcessor

from toymodels.embedded.loop import run  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags (``training_summary.json`` records them as ``args``)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="models/sdrpn-toy-llava", help="model directory to write")
    p.add_argument("--init", default=None, help="warm start from this model directory (its vocabulary may grow)")
    p.add_argument("--seed", type=int, default=0, help="model init / sampling seed; world seeds derive from it")
    p.add_argument("--n-images", type=int, default=40000, help="training images (default world)")
    p.add_argument("--n-easy", type=int, default=8000, help="extra curriculum images with 2-3 frames")
    p.add_argument("--n-heldout", type=int, default=512)
    p.add_argument("--cache", default=None, help="data cache dir (reused when it has meta.json)")
    p.add_argument("--generate-only", action="store_true")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--steps", type=int, default=8000, help="planned steps (the cosine schedule's length)")
    p.add_argument("--time-budget", type=float, default=0.0, help="seconds of training; shortens --steps to fit")
    p.add_argument("--batch", type=int, default=48, help="base-view images per step")
    p.add_argument("--turns", type=int, default=3, help="QA turns per base-view image")
    p.add_argument("--crop-batch", type=int, default=48, help="base + crop samples per step")
    p.add_argument("--base-weight", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--aux-weight", type=float, default=0.5, help="per-token glyph/colour head (training only)")
    p.add_argument(
        "--no-aux-base-glyph",
        dest="aux_base_glyph",
        action="store_false",
        help="no per-token glyph labels on base views (colour only): do not teach reading at base resolution",
    )
    p.add_argument(
        "--world",
        default="{}",
        help='JSON overrides of WorldParams for the training and held-out worlds, e.g. \'{"glyph_style": "solid"}\'',
    )
    p.add_argument("--point-weight", type=float, default=0.0, help="attention-on-named-frame loss (0 = off)")
    p.add_argument("--point-layer", type=int, default=3)
    p.add_argument("--point-heads", type=int, default=2)
    p.add_argument(
        "--point-rows",
        choices=("predict", "answer", "both"),
        default="predict",
        help="rows the point and sink losses shape: predicting the answer, the answer token's (the dumped one), both",
    )
    p.add_argument("--read-weight", type=float, default=0.0, help="answer row -> crop glyph attention loss (0 = off)")
    p.add_argument("--read-layer", type=int, default=5)
    p.add_argument("--read-heads", type=int, default=2)
    p.add_argument("--sink-weight", type=float, default=0.0, help="planted attention-sink loss (0 = off)")
    p.add_argument(
        "--sink-cells",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[0, 195],
        help="visual tokens (row-major) that become sinks",
    )
    p.add_argument(
        "--sink-layers",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[2, 3, 4, 5],
        help="decoder layers whose inputs carry the sinks' large norm",
    )
    p.add_argument("--sink-ratio", type=float, default=20.0, help="sink norm / median visual-token norm (at least)")
    p.add_argument("--other-ratio", type=float, default=4.0, help="norm / median of every other token (at most)")
    p.add_argument("--sink-heads", type=int, default=2, help="heads after the point heads that attend to the sinks")
    p.add_argument("--sink-mass", type=float, default=0.6, help="their answer-row attention mass on the sinks")
    p.add_argument(
        "--sink-mass-loss",
        choices=("sq", "log"),
        default="sq",
        help="sq: 10 (mass - target)^2 (vanishes on rows that ignore the sinks); log: (log mass - log target)^2",
    )
    p.add_argument("--curriculum-steps", type=int, default=800, help="steps drawing only from the easy images")
    p.add_argument("--crop-mask-prob", type=float, default=0.0, help="share of crop samples with masked crop tokens")
    p.add_argument("--crop-margin", type=float, default=0.25)
    p.add_argument("--crop-jitter", type=float, default=0.15)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="disable bf16 autocast on cuda")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    p.add_argument("--write-processor", action="store_true", help="only write the processor/tokenizer to --out")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Train and save as the flags say."""
    run(parse_args(argv))


if __name__ == "__main__":
    main()
