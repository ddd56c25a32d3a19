"""Training of the embedded default model (a small LLaVA) on the synthetic world.

``data`` makes the samples (world images into ``.npy`` memory maps, token layouts, batches), ``losses`` the
training objectives (answer, per-token auxiliary head, point / sink / read attention losses) and ``loop``
the training run itself; ``scripts/train_embedded_model.py`` is the command line.
"""

from __future__ import annotations

import time

from toymodels.llava import ToyLlavaSizes

# The embedded model's architecture (models/sdrpn-toy-llava): 224 px views, 14 x 14 visual tokens.
SIZES = ToyLlavaSizes(
    image_size=224,
    patch_size=16,
    vision_hidden=128,
    vision_layers=4,
    vision_heads=4,
    text_hidden=192,
    text_layers=8,
    text_heads=6,
    text_intermediate=384,
    max_position_embeddings=1024,
)
MAX_FRAMES = 8  # named frames stored per image (WorldParams.max_frames must not exceed it)


def log(msg: str) -> None:
    """One timestamped progress line on stdout."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)
