"""Image loading from local paths or fsspec URLs, with errors that name the sample."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import fsspec
from PIL import Image


class ImageError(ValueError):
    """An image could not be read; the message names the sample and the reference."""


def load_image(ref: str, sample_id: str = "?") -> Image.Image:
    """Open ``ref`` (path or fsspec URL) as RGB, raising :class:`ImageError` naming ``sample_id``."""
    try:
        with fsspec.open(ref, "rb") as fh:
            img = Image.open(fh)
            img.load()
        return img.convert("RGB")
    except FileNotFoundError as exc:
        raise ImageError(f"sample {sample_id}: image not found: {ref}") from exc
    except Exception as exc:  # PIL raises many types for corrupt files
        raise ImageError(f"sample {sample_id}: unreadable image {ref}: {exc}") from exc


def load_images(refs: list[str], sample_ids: list[str], workers: int = 4) -> list[Image.Image]:
    """Load several images concurrently (decoding releases the GIL), in order."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(load_image, refs, sample_ids))


def probe_image(ref: str) -> tuple[int, int]:
    """(width, height) of an image, reading as little as possible; raises like :func:`load_image`."""
    with fsspec.open(ref, "rb") as fh:
        img = Image.open(fh)
        img.verify()
        return img.size
