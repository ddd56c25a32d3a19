"""Post-processing of an RoI probability map on the visual token grid (SPEC 3.2-3.4).

smooth (Gaussian) -> binarise at ``tau`` -> 8-connected components -> the reference filters
(drop area-1 components, grow tiny ones to at least 3x3, drop components over ``max_area``
tokens). The result holds the kept mask, one inclusive grid box per kept component and the box
enclosing them all; :mod:`pipeline.inference.two_stage` turns it into crops.

Smoothing is the reference's operation: it blurs with ``torchvision`` ``gaussian_blur`` (3x3, sigma 1,
'reflect' padding), which is the same as ``cv2.GaussianBlur`` with its default ``BORDER_REFLECT_101``: a
normalised separable kernel ``exp(-x^2 / 2 sigma^2)`` over ``x = -(k-1)/2 .. (k-1)/2``, borders mirrored
without repeating the edge (``d c b | a b c d``). Here that is ``scipy.ndimage.gaussian_filter`` in float64
with ``mode='mirror'`` (scipy's name for reflect-101; a length-1 axis mirrors onto itself) and
``radius=(k-1)/2``; it agrees with a direct convolution to within float64 rounding (``tests/test_roi.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy.ndimage import find_objects, gaussian_filter
from skimage.measure import label

from pipeline.config import FieldError, check_choice, check_min, check_range

GridBox = tuple[int, int, int, int]  # (y0, x0, y1, x1) on the token grid, all inclusive

UpscaleMode = Literal["masked", "box"]


@dataclass
class RoIParams:
    """Post-processing settings; defaults are the reference code's (SPEC 3.2-3.4)."""

    smooth_size: int = 3
    smooth_sigma: float = 1.0  # 0 disables smoothing
    tau: float = 0.15  # keep tokens whose smoothed probability is strictly above tau (reference: >)
    drop_area_1: bool = True
    grow_below: int = 4  # components with fewer tokens grow to at least 3x3 (clipped to the grid)
    max_area: int | None = 225  # drop components with more tokens; None keeps all
    mode: UpscaleMode = "masked"

    def __post_init__(self) -> None:
        check_min("smooth_size", self.smooth_size)
        if self.smooth_size % 2 == 0:
            raise FieldError("smooth_size", f"must be a positive odd number (got {self.smooth_size!r})")
        check_min("smooth_sigma", self.smooth_sigma, 0)
        check_range("tau", self.tau, 0, 1)  # a probability threshold
        check_min("grow_below", self.grow_below, 0)
        check_min("max_area", self.max_area, optional=True)
        check_choice("mode", self.mode, ("masked", "box"))


@dataclass
class RoI:
    """What post-processing found on one grid.

    ``mask`` is the union of the kept components (a grown component contributes its whole grown
    box); ``boxes`` holds one inclusive box per kept component in raster order of the components'
    first token; ``enclosing`` is the box around all of them (None when nothing was kept).
    """

    smoothed: np.ndarray
    mask: np.ndarray
    boxes: list[GridBox] = field(default_factory=list)
    enclosing: GridBox | None = None

    @property
    def found(self) -> bool:
        return bool(self.boxes)


def smooth(prob: np.ndarray, size: int = 3, sigma: float = 1.0) -> np.ndarray:
    """Gaussian blur, ``size`` taps per axis, reflect-101 borders; ``sigma <= 0`` or ``size == 1`` returns a copy."""
    prob = np.asarray(prob, dtype=np.float64)
    if sigma <= 0 or size == 1:
        return prob.copy()
    # radius pins the kernel to `size` taps (scipy's default truncates at 4 sigma instead).
    return gaussian_filter(prob, sigma, mode="mirror", radius=size // 2)


def _grow(lo: int, hi: int, limit: int, min_len: int = 3) -> tuple[int, int]:
    """Widen the inclusive span [lo, hi] to ``min_len`` around its centre, then clip to [0, limit - 1].

    An even shortfall splits evenly; an odd one takes the extra token on the low side, which is
    where the reference's rounding puts it (a 2-token span [y, y+1] becomes [y-1, y+1]).
    """
    need = min_len - (hi - lo + 1)
    if need > 0:
        lo -= (need + 1) // 2
        hi += need // 2
    return max(lo, 0), min(hi, limit - 1)


def components(binary: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components (scikit-image, connectivity=2): (labels, count), labels 1..count."""
    labels, n = label(binary, connectivity=2, return_num=True)
    return labels, int(n)


def postprocess(prob: np.ndarray, params: RoIParams | None = None) -> RoI:
    """Turn an (H, W) RoI probability map into kept components, their boxes and the enclosing box."""
    params = params or RoIParams()
    prob = np.asarray(prob, dtype=np.float64)
    if prob.ndim != 2:
        raise ValueError(f"expected an (H, W) map, got shape {prob.shape}")
    h, w = prob.shape
    smoothed = smooth(prob, params.smooth_size, params.smooth_sigma)
    labels, n = components(smoothed > params.tau)
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    mask = np.zeros((h, w), dtype=bool)
    boxes: list[GridBox] = []
    # find_objects: each label's bounding box as (row slice, column slice), labels 1..n in order (none is
    # missing: skimage numbers components consecutively, in raster order of their first token).
    for i, (rows, cols) in enumerate(find_objects(labels, max_label=n), start=1):
        area = int(areas[i])
        if params.drop_area_1 and area == 1:
            continue  # single tokens are mostly sinks or noise (reference)
        if params.max_area is not None and area > params.max_area:
            continue  # a huge region gains nothing from a crop (reference: 15 x 15 on a 24 x 24 grid)
        y0, y1, x0, x1 = rows.start, rows.stop - 1, cols.start, cols.stop - 1
        if area < params.grow_below:
            y0, y1 = _grow(y0, y1, h)
            x0, x1 = _grow(x0, x1, w)
            mask[y0 : y1 + 1, x0 : x1 + 1] = True
        else:
            mask[rows, cols] |= labels[rows, cols] == i
        boxes.append((y0, x0, y1, x1))
    enclosing = None
    if boxes:
        arr = np.array(boxes)
        enclosing = (int(arr[:, 0].min()), int(arr[:, 1].min()), int(arr[:, 2].max()), int(arr[:, 3].max()))
    return RoI(smoothed=smoothed, mask=mask, boxes=boxes, enclosing=enclosing)
