"""Image loading from local paths or fsspec URLs, with errors that name the sample."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import fsspec
from PIL import Image

# PIL names the file object it was given ("cannot identify image file <...LocalFileOpener object at 0x7f..>");
# the address differs on every run, so it is cut from any text that is written to an artifact.
_OBJECT_REPR = re.compile(r"\s*<[^<>]*\bat 0x[0-9a-fA-F]+>")


class ImageError(ValueError):
    """An image could not be read; the message names the sample and the reference."""


def error_text(exc: BaseException) -> str:
    """``ExceptionClass: message`` with object reprs that carry a memory address removed (same failure, same text)."""
    message = _OBJECT_REPR.sub("", str(exc)).strip()
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _decode(ref: str) -> Image.Image:
    """Open ``ref`` and decode every pixel (PIL's ``open`` reads only the header; ``load`` the data stream)."""
    with fsspec.open(ref, "rb") as fh:
        img = Image.open(fh)
        img.load()
    return img


def load_image(ref: str, sample_id: str = "?") -> Image.Image:
    """Open ``ref`` (path or fsspec URL) as RGB, raising :class:`ImageError` naming ``sample_id``."""
    try:
        return _decode(ref).convert("RGB")
    except FileNotFoundError as exc:
        raise ImageError(f"sample {sample_id}: image not found: {ref}") from exc
    except Exception as exc:  # PIL raises many types for corrupt files
        raise ImageError(f"sample {sample_id}: unreadable image {ref}: {error_text(exc)}") from exc


def load_images(refs: list[str], sample_ids: list[str], workers: int = 4) -> list[Image.Image]:
    """Load several images concurrently (decoding releases the GIL), in order."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(load_image, refs, sample_ids))


def probe_image(ref: str) -> tuple[int, int]:
    """(width, height) of an image after decoding it exactly as :func:`load_image` does; raises like it.

    A checksum check (PIL's ``verify``) passes a PNG whose compressed data is broken, which then fails in
    ``decode``; decoding in full here makes every image that passes ``prepare`` loadable later. One decoded
    image is held at a time per caller thread and dropped on return.
    """
    img = _decode(ref)
    size = img.size
    if img.mode != "RGB":  # the conversion load_image does can fail too (unsupported modes); RGB needs none
        img.convert("RGB")
    return size
