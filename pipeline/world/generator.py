"""A synthetic fine-grained VQA world with ground-truth boxes (the embedded default's data).

Each image is a square canvas (448 px by default) of noise and grey clutter with 3-6 coloured
frames. Every frame holds one small glyph; the question names a frame by its colour ("what is in
the red box ?") and the answer is its glyph. Frames are plain at the model's base view (224 px:
the colour survives the 2x downscale), the glyph is not. By default a frame's interior is filled
with one of four 1-px-period textures (``rows``, ``columns``, ``checks``, or ``nothing``; grey
stray patches of them lie outside the frames). A texture is the outer product of 1-D profiles
(``texture_profile``) built so that the base view's 2x bicubic downscale maps each profile to
exactly zero at every output pixel, its edges included, and no pixel of a textured region can
clip: all four answers give the base view the same pixels up to the shared noise, while a crop
of the frame resized to 224 px (any crop up to ~250 source px) shows the pattern. That is the
paper's situation, made exact: the detail is not in the base view and is plain in a
high-resolution crop (``tests/test_world_leak.py`` checks that no classifier on the base view's
named frame beats the majority answer). (A spike found that plain small glyphs, even
2.5x3.5 px at the base view, are read by a small CNN: downscaling keeps their information unless
it is cancelled; and 5x7 characters drawn in a checker pattern, the other cancelled style here,
were not learned by a small model in 2,000 GPU steps.)

Frames and glyphs are aligned to the base view's token grid (14x14 cells of 32 source px by
default): a frame covers whole cells; a texture fills its interior (``texture_fill``), a character
glyph sits inside one interior cell.

Everything is pure and seeded: ``generate_sample(params, seed, index)`` always draws the same
sample. Glyphs come from a bitmap font in this file (not a system font), so rendering does not
depend on the Pillow or FreeType version.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.config import STRICT_KEYS, FieldError, check_choice, check_min, check_pair, check_range

# fmt: off
_FONT_ROWS: dict[str, tuple[str, ...]] = {
    "0": (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
    "1": ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "2": (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    "3": ("#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."),
    "4": ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    "5": ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    "6": ("..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."),
    "7": ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    "8": (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    "9": (".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."),
    "A": (".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "B": ("####.", "#...#", "#...#", "####.", "#...#", "#...#", "####."),
    "C": (".###.", "#...#", "#....", "#....", "#....", "#...#", ".###."),
    "D": ("###..", "#..#.", "#...#", "#...#", "#...#", "#..#.", "###.."),
    "E": ("#####", "#....", "#....", "####.", "#....", "#....", "#####"),
    "F": ("#####", "#....", "#....", "####.", "#....", "#....", "#...."),
    "G": (".###.", "#...#", "#....", "#.###", "#...#", "#...#", ".####"),
    "H": ("#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "I": (".###.", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "J": ("..###", "...#.", "...#.", "...#.", "...#.", "#..#.", ".##.."),
    "K": ("#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"),
    "L": ("#....", "#....", "#....", "#....", "#....", "#....", "#####"),
    "M": ("#...#", "##.##", "#.#.#", "#.#.#", "#...#", "#...#", "#...#"),
    "N": ("#...#", "#...#", "##..#", "#.#.#", "#..##", "#...#", "#...#"),
    "O": (".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "P": ("####.", "#...#", "#...#", "####.", "#....", "#....", "#...."),
    "Q": (".###.", "#...#", "#...#", "#...#", "#.#.#", "#..#.", ".##.#"),
    "R": ("####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"),
    "S": (".####", "#....", "#....", ".###.", "....#", "....#", "####."),
    "T": ("#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."),
    "U": ("#...#", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "V": ("#...#", "#...#", "#...#", "#...#", "#...#", ".#.#.", "..#.."),
    "W": ("#...#", "#...#", "#...#", "#.#.#", "#.#.#", "#.#.#", ".#.#."),
    "X": ("#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#"),
    "Y": ("#...#", "#...#", ".#.#.", "..#..", "..#..", "..#..", "..#.."),
    "Z": ("#####", "....#", "...#.", "..#..", ".#...", "#....", "#####"),
}
# fmt: on

GLYPHS: tuple[str, ...] = tuple(_FONT_ROWS)
GLYPH_MASKS: dict[str, np.ndarray] = {
    g: np.array([[c == "#" for c in row] for row in rows], dtype=bool) for g, rows in _FONT_ROWS.items()
}

# Texture glyphs: the 2x2 tile each texture repeats away from its edges (+1 / -1 times the amplitude).
TEXTURE_TILES: dict[str, np.ndarray] = {
    "rows": np.array([[1, 1], [-1, -1]], np.float32),
    "columns": np.array([[1, -1], [1, -1]], np.float32),
    "checks": np.array([[1, -1], [-1, 1]], np.float32),
    "nothing": np.zeros((2, 2), np.float32),
}
TEXTURES: tuple[str, ...] = tuple(TEXTURE_TILES)
_ALTERNATES: dict[str, tuple[bool, bool]] = {  # which axes a texture alternates along: (y, x)
    "rows": (True, False),
    "columns": (False, True),
    "checks": (True, True),
    "nothing": (False, False),
}
NOISE_CLIP = 3.0  # the pixel noise is a normal truncated at this many std, so a texture's headroom is exact

# Named frame colours (distinct hues, all visible after the 2x downscale).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (40, 80, 230),
    "yellow": (235, 205, 20),
    "orange": (250, 130, 0),
    "purple": (140, 50, 200),
    "cyan": (0, 195, 215),
    "pink": (245, 95, 180),
}

GLYPH_STYLES = ("texture", "checker", "solid")

QUESTION_WORDS: tuple[str, ...] = ("what", "is", "in", "the", "box", "?")

Box = tuple[int, int, int, int]


@dataclass
class WorldParams:
    """Knobs of the world; ``params.yaml`` ``world.generator`` may set any of them."""

    __pydantic_config__ = STRICT_KEYS

    canvas: int = 448  # square source image side, px
    grid: int = 14  # token grid of the base view (224 px / patch 16)
    min_frames: int = 3
    max_frames: int = 6
    frame_cells: tuple[int, ...] = (3, 3, 3, 4)  # frame side in cells, drawn uniformly from this list
    border_px: int = 4  # frame border thickness, source px (inside the box)
    paper: int = 190  # grey level of a frame's interior before the tint (leaves headroom for the glyph pattern)
    tint: float = 0.3  # frame interior = paper grey blended with this share of the frame colour
    # "texture" (default): the glyph is one of TEXTURES (rows, columns, checks of 1-px period, or nothing)
    # filling the frame's interior (texture_fill) or a square patch in one cell; a 2x downscale flattens it
    # (unreadable at the base view) and a crop shows it.
    # "checker": a 5x7 font character whose pixels are +-contrast in a 1-px checkerboard (also cancelled
    # at the base view, but hard for a small model to learn to read); "solid": dark ink, readable at base.
    glyph_style: str = "texture"
    glyph_scale: int = 2  # character styles: source px per font pixel (the glyph is 5x7 font pixels)
    texture_px: int = 24  # texture style: side of the square patch, source px (even)
    texture_fill: bool = True  # texture style: a frame's texture fills its whole interior (strays keep texture_px)
    glyph_contrast: tuple[int, int] = (60, 100)  # pattern amplitude / solid ink darkening, drawn uniformly
    glyph_dc: float = 0.0  # checker only: also darken glyph pixels by this share of the amplitude (visible at base)
    distractor_frames: tuple[int, int] = (0, 2)  # grey frames with glyphs, min/max count
    stray_glyphs: tuple[int, int] = (4, 10)  # grey glyphs outside frames, min/max count
    clutter_shapes: tuple[int, int] = (8, 16)  # grey lines / rectangles / ellipses, min/max count
    noise_std: float = 3.0  # per-pixel grey noise, std in 8-bit levels (truncated at NOISE_CLIP std)
    colours: tuple[str, ...] = tuple(COLOURS)

    def __post_init__(self) -> None:
        check_min("canvas", self.canvas)
        check_min("grid", self.grid)
        if self.canvas % self.grid:  # frames and glyphs are laid out on whole cells of the token grid
            raise FieldError("canvas", f"must be a multiple of grid {self.grid} (got {self.canvas})")
        check_min("min_frames", self.min_frames)
        if not self.max_frames >= self.min_frames:
            raise FieldError("max_frames", f"must be >= min_frames {self.min_frames} (got {self.max_frames})")
        if not self.frame_cells or not all(isinstance(c, int) and 1 <= c <= self.grid for c in self.frame_cells):
            raise FieldError(
                "frame_cells", f"must list frame sides in cells, each in [1, {self.grid}] (got {self.frame_cells!r})"
            )
        check_min("border_px", self.border_px, 0)
        check_range("paper", self.paper, 0, 255)
        check_range("tint", self.tint, 0, 1)
        check_choice("glyph_style", self.glyph_style, GLYPH_STYLES)
        check_min("glyph_scale", self.glyph_scale)
        check_min("texture_px", self.texture_px, 10)  # texture_pattern: even sides >= 10 px
        if self.texture_px % 2:
            raise FieldError(
                "texture_px", f"must be even, so 2x2 tiles stay on the base view's pixels (got {self.texture_px})"
            )
        check_pair("glyph_contrast", self.glyph_contrast)
        check_range("glyph_dc", self.glyph_dc, 0, 1)
        check_pair("distractor_frames", self.distractor_frames)
        check_pair("stray_glyphs", self.stray_glyphs)
        check_pair("clutter_shapes", self.clutter_shapes)
        check_min("noise_std", self.noise_std, 0)
        unknown = [c for c in self.colours if c not in COLOURS]
        if not self.colours or unknown or len(set(self.colours)) != len(self.colours):
            raise FieldError(
                "colours", f"must name distinct frame colours of {list(COLOURS)} (got {list(self.colours)!r})"
            )

    @property
    def cell(self) -> int:
        """Source pixels per token cell."""
        return self.canvas // self.grid

    @property
    def glyphs(self) -> tuple[str, ...]:
        """The answer alphabet of this glyph style."""
        return TEXTURES if self.glyph_style == "texture" else GLYPHS


@dataclass
class WorldSection:
    """params.yaml ``world``: where each split goes, its size and seed, and the generator's knobs."""

    train_dir: str = "artifacts/world/train"
    n_train: int = 1500
    seed_train: int = 1001
    eval_dir: str = "artifacts/world/eval"
    n_eval: int = 200
    seed_eval: int = 2002
    generator: WorldParams = field(default_factory=WorldParams)

    def __post_init__(self) -> None:
        check_min("n_train", self.n_train)
        check_min("n_eval", self.n_eval)
        check_min("seed_train", self.seed_train, 0)  # numpy's seeded generators refuse negative seeds
        check_min("seed_eval", self.seed_eval, 0)
        if self.seed_train == self.seed_eval:
            raise FieldError(
                "seed_eval", f"must differ from seed_train (both {self.seed_train}): the splits would overlap"
            )
        if not self.train_dir.strip() or not self.eval_dir.strip() or self.train_dir == self.eval_dir:
            raise FieldError(
                "eval_dir",
                f"train_dir and eval_dir must be two different folders (got {self.train_dir!r}, {self.eval_dir!r})",
            )

    def split(self, name: str) -> tuple[int, int]:
        """(number of samples, seed) of the ``train`` or ``eval`` split."""
        return (self.n_train, self.seed_train) if name == "train" else (self.n_eval, self.seed_eval)


@dataclass
class Frame:
    """One drawn frame: its box (source px, far edge exclusive), colour name (None: distractor), glyph."""

    box: Box
    colour: str | None
    glyph: str
    glyph_box: Box
    glyph_cell: tuple[int, int]  # (row, col) of the token cell holding the glyph


@dataclass
class WorldSample:
    """One VQA sample: the image, the question about a named frame, its answer and GT box."""

    sample_id: str
    image: Image.Image
    question: str
    answer: str
    box: Box
    colour: str
    frames: list[Frame] = field(default_factory=list)  # every frame drawn, distractors included
    stray: list[tuple[str, Box]] = field(default_factory=list)  # glyphs drawn outside frames

    @property
    def target(self) -> Frame:
        """The frame the question names."""
        return next(f for f in self.frames if f.colour == self.colour)


def world_vocabulary(params: WorldParams | None = None) -> list[str]:
    """Every word the questions and answers use (for the word-level tokenizer)."""
    params = params or WorldParams()
    # both alphabets, characters first: a tokenizer built before the texture style keeps its ids
    return list(QUESTION_WORDS) + list(params.colours) + list(GLYPHS) + list(TEXTURES)


def question_for(colour: str) -> str:
    """The question that names the frame of this colour."""
    return f"what is in the {colour} box ?"


def sample_rng(seed: int, index: int) -> np.random.Generator:
    """The generator that draws sample ``index`` of world ``seed``."""
    return np.random.default_rng([int(seed), int(index)])


def _place_boxes(
    rng: np.random.Generator, sizes: list[tuple[int, int]], grid: int, tries: int = 200
) -> list[tuple[int, int, int, int] | None]:
    """Place non-overlapping cell rectangles (r0, c0, h, w); None where no place was found."""
    occupied = np.zeros((grid, grid), dtype=bool)
    out: list[tuple[int, int, int, int] | None] = []
    for h, w in sizes:
        placed = None
        for _ in range(tries):
            r0 = int(rng.integers(0, grid - h + 1))
            c0 = int(rng.integers(0, grid - w + 1))
            if not occupied[r0 : r0 + h, c0 : c0 + w].any():
                occupied[r0 : r0 + h, c0 : c0 + w] = True
                placed = (r0, c0, h, w)
                break
        out.append(placed)
    return out


def _draw_glyph(
    arr: np.ndarray, layer: np.ndarray, glyph: str, x: int, y: int, params: WorldParams, contrast: float
) -> Box:
    """Draw a glyph with its top-left at (x, y) onto ``arr`` (uint8 HWC; a texture goes to the float ``layer``)."""
    if params.glyph_style == "texture":
        return _draw_texture(arr, layer, glyph, x, y, params, contrast)
    mask = GLYPH_MASKS[glyph]
    if params.glyph_scale != 1:
        mask = np.kron(mask, np.ones((params.glyph_scale, params.glyph_scale), dtype=bool))
    h, w = mask.shape
    region = arr[y : y + h, x : x + w].astype(np.float32)
    if params.glyph_style == "checker":
        # amplitude capped so that neither sign clips: the pattern then averages to the background exactly
        amp = min(contrast, float(region.min()), 255.0 - float(region.max()))
        yy, xx = np.mgrid[y : y + h, x : x + w]
        delta = np.where((yy + xx) % 2 == 0, amp, -amp)[..., None] - params.glyph_dc * amp
    elif params.glyph_style == "solid":
        delta = np.full((h, w, 1), -min(contrast, float(region.min())), np.float32)
    else:
        raise ValueError(f"unknown glyph_style {params.glyph_style!r}")
    region = np.where(mask[..., None], region + delta, region)
    arr[y : y + h, x : x + w] = np.clip(np.round(region), 0, 255).astype(np.uint8)
    return (x, y, x + w, y + h)


def _bicubic_half_taps() -> np.ndarray:
    """Weights of a 2x bicubic downscale (Keys a = -0.5, PIL's antialiased kernel) for one output pixel.

    The output pixel sits between source pixels 2i and 2i+1; the weights cover source pixels 2i-3 .. 2i+4.
    """

    def cubic(x: float, a: float = -0.5) -> float:
        x = abs(x)
        if x < 1:
            return (a + 2) * x**3 - (a + 3) * x**2 + 1
        return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a if x < 2 else 0.0

    taps = np.array([cubic((j - 0.5) / 2) for j in range(-3, 5)])  # j: source offset from 2i
    return taps / taps.sum()


def texture_profile(pairs: int) -> np.ndarray:
    """1-D texture profile over ``2 * pairs + 8`` px: +1 / -1 alternating in the middle, zero sum, and zero
    at every output pixel of a 2x bicubic downscale that samples between pixel pairs (the first px is even).

    Write the profile's even and odd pixels as sequences A_e, A_o and the downscale's even and odd taps as
    filters e, o (o is e reversed): the output is the correlation e * A_e + o * A_o. With A_e = e convolved
    with a box and A_o = -(o convolved with the box) both terms are the same product with opposite signs, so
    the output vanishes identically, at the ends as in the middle. Away from its ends the profile is exactly
    +1 (even px) / -1 (odd px); within 3 px of an end it rises from 0 and overshoots by at most 0.07.
    """
    if pairs < 1:
        raise ValueError(f"a texture profile needs >= 1 pair, got {pairs}")
    taps = _bicubic_half_taps()
    even, odd = taps[1::2], taps[0::2]  # even source px 2i-2, 2i, 2i+2, 2i+4; odd 2i-3, 2i-1, 2i+1, 2i+3
    box = np.ones(pairs)
    a_even = np.convolve(even, box)  # pairs -1 .. pairs+1
    a_odd = -np.convolve(odd, box)  # pairs -2 .. pairs
    out = np.zeros(2 * (pairs + 4))
    out[2 : 2 + 2 * a_even.size : 2] = a_even  # the profile starts at pair -2: pair -1's even px is index 2
    out[1 : 1 + 2 * a_odd.size : 2] = a_odd
    return 2.0 * out


def texture_pattern(name: str, height: int, width: int) -> np.ndarray:
    """[height, width] float pattern of texture ``name`` (even sides >= 10 px): the profile along each axis
    it alternates on, a flat window over the profile's span along the other; its 2x downscale is zero."""
    if height % 2 or width % 2 or min(height, width) < 10:
        raise ValueError(f"a texture patch needs even sides >= 10 px, got {width}x{height}")
    along_y, along_x = _ALTERNATES[name]
    if not (along_y or along_x):
        return np.zeros((height, width), np.float32)
    ys, xs = texture_profile(height // 2 - 4), texture_profile(width // 2 - 4)
    col = ys if along_y else (ys != 0).astype(np.float64)
    row = xs if along_x else (xs != 0).astype(np.float64)
    return (col[:, None] * row[None, :]).astype(np.float32)


PATTERN_PEAK = float(np.abs(texture_profile(8)).max() ** 2)  # the largest |value| any pattern takes


def _draw_texture(
    arr: np.ndarray,
    layer: np.ndarray,
    name: str,
    x: int,
    y: int,
    params: WorldParams,
    contrast: float,
    size: tuple[int, int] | None = None,
) -> Box:
    """Add texture ``name`` as a (w, h) = ``size`` patch (default ``texture_px`` square) at (x, y) to the float
    ``layer``; ``arr`` (uint8 HWC, what lies under it) sets the headroom. Returns the patch's box.

    The amplitude is capped so that no pixel of the patch can leave [0, 255] even with the truncated noise
    on top: a clipped pixel would break the pattern's exact cancellation in the base view.
    """
    w, h = size or (params.texture_px, params.texture_px)
    region = arr[y : y + h, x : x + w]
    margin = NOISE_CLIP * params.noise_std
    headroom = min(float(region.min()) - margin, 255.0 - float(region.max()) - margin)
    amp = max(0.0, min(contrast, headroom / PATTERN_PEAK))
    layer[y : y + h, x : x + w] += amp * texture_pattern(name, h, w)
    return (x, y, x + w, y + h)


def _glyph_size(params: WorldParams) -> tuple[int, int]:
    if params.glyph_style == "texture":
        return params.texture_px, params.texture_px
    return 5 * params.glyph_scale, 7 * params.glyph_scale


def _glyph_in_cell(rng: np.random.Generator, params: WorldParams, row: int, col: int) -> tuple[int, int]:
    """Top-left of a glyph placed at random inside cell (row, col), >= 4 px (textures: 2 px) from the cell edges.

    Coordinates are even, so each 2x2 pattern tile falls on one pixel of a 2x downscale and cancels there.
    """
    gw, gh = _glyph_size(params)
    cell, pad = params.cell, (2 if params.glyph_style == "texture" else 4)
    x = col * cell + 2 * int(rng.integers(pad // 2, max(pad // 2 + 1, (cell - gw - pad) // 2 + 1)))
    y = row * cell + 2 * int(rng.integers(pad // 2, max(pad // 2 + 1, (cell - gh - pad) // 2 + 1)))
    return x, y


def _background(rng: np.random.Generator, params: WorldParams) -> np.ndarray:
    """Grey background with a smooth low-frequency variation and a slight colour cast."""
    size = params.canvas
    base = rng.uniform(110, 200)
    low = rng.normal(0.0, 18.0, size=(5, 5))
    low_img = Image.fromarray(low.astype(np.float32)).resize((size, size), Image.BICUBIC)
    cast = rng.normal(0.0, 6.0, size=3).astype(np.float32)
    arr = np.float32(base) + np.asarray(low_img)[..., None] + cast[None, None, :]
    return np.clip(arr, 0, 255).astype(np.uint8)


def _clutter(rng: np.random.Generator, img: Image.Image, params: WorldParams) -> None:
    """Grey lines, rectangle outlines and ellipses all over the canvas (never in a named colour)."""
    draw = ImageDraw.Draw(img)
    size = params.canvas
    for _ in range(int(rng.integers(params.clutter_shapes[0], params.clutter_shapes[1] + 1))):
        g = int(rng.integers(40, 230))
        colour = (g, g, g)
        kind = int(rng.integers(0, 3))
        x0, y0 = (int(v) for v in rng.integers(0, size, size=2))
        x1, y1 = x0 + int(rng.integers(10, 90)), y0 + int(rng.integers(10, 90))
        width = int(rng.integers(1, 4))
        if kind == 0:
            draw.line([(x0, y0), (x1, y1)], fill=colour, width=width)
        elif kind == 1:
            draw.rectangle([x0, y0, x1, y1], outline=colour, width=width)
        else:
            draw.ellipse([x0, y0, x1, y1], outline=colour, width=width)


def generate_sample(params: WorldParams, seed: int, index: int) -> WorldSample:
    """Draw sample ``index`` of world ``seed`` (pure: the same arguments give the same sample)."""
    rng = sample_rng(seed, index)
    grid, cell = params.grid, params.cell
    n_named = int(rng.integers(params.min_frames, params.max_frames + 1))
    n_named = min(n_named, len(params.colours))
    n_distract = int(rng.integers(params.distractor_frames[0], params.distractor_frames[1] + 1))
    colours = [params.colours[i] for i in rng.permutation(len(params.colours))[:n_named]]
    for attempt in range(10):  # redraw sizes and places until every named frame fits (distractors may drop)
        cells = params.frame_cells if attempt < 9 else (min(params.frame_cells),)
        sides = [(int(rng.choice(cells)), int(rng.choice(cells))) for _ in range(n_named + n_distract)]
        places = _place_boxes(rng, sides, grid)
        if all(p is not None for p in places[:n_named]):
            break
    else:
        raise RuntimeError(f"could not place {n_named} frames on a {grid}x{grid} grid; lower max_frames")

    arr = _background(rng, params)
    img = Image.fromarray(arr)
    _clutter(rng, img, params)
    arr = np.array(img)

    occupied = np.zeros((grid, grid), dtype=bool)
    for p in places:
        if p is not None:
            r0, c0, h, w = p
            occupied[r0 : r0 + h, c0 : c0 + w] = True
    free = np.argwhere(~occupied)
    stray: list[tuple[str, Box]] = []
    layer = np.zeros(arr.shape[:2], np.float32)  # textures and noise, added and rounded once at the end
    n_stray = min(len(free), int(rng.integers(params.stray_glyphs[0], params.stray_glyphs[1] + 1)))
    for k in rng.permutation(len(free))[:n_stray]:
        r, c = (int(v) for v in free[k])
        x, y = _glyph_in_cell(rng, params, r, c)
        g = params.glyphs[int(rng.integers(len(params.glyphs)))]
        stray.append((g, _draw_glyph(arr, layer, g, x, y, params, float(rng.uniform(*params.glyph_contrast)))))

    frames: list[Frame] = []
    img = Image.fromarray(arr)
    draw = ImageDraw.Draw(img)
    glyph_spots = []
    for i, p in enumerate(places):
        if p is None:
            continue
        r0, c0, h, w = p
        box = (c0 * cell, r0 * cell, (c0 + w) * cell, (r0 + h) * cell)
        if i < n_named:
            name: str | None = colours[i]
            rgb = COLOURS[name]
        else:
            name = None
            g = int(rng.integers(20, 100))
            rgb = (g, g, g)
        fill = tuple(int(round(params.paper * (1 - params.tint) + c * params.tint)) for c in rgb)
        draw.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=fill, outline=rgb, width=params.border_px)
        inner_r = int(rng.integers(r0 + 1, r0 + h - 1)) if h > 2 else r0
        inner_c = int(rng.integers(c0 + 1, c0 + w - 1)) if w > 2 else c0
        glyph = params.glyphs[int(rng.integers(len(params.glyphs)))]
        glyph_spots.append((len(frames), inner_r, inner_c))
        frames.append(Frame(box=box, colour=name, glyph=glyph, glyph_box=(0, 0, 0, 0), glyph_cell=(inner_r, inner_c)))
    arr = np.array(img)
    for k, r, c in glyph_spots:
        x, y = _glyph_in_cell(rng, params, r, c)
        contrast = float(rng.uniform(*params.glyph_contrast))
        if params.glyph_style == "texture" and params.texture_fill:
            bx0, by0, bx1, by1 = frames[k].box
            inset = params.border_px + 2 + (params.border_px % 2)  # even, so the 2x2 tiles stay aligned
            size = ((bx1 - bx0 - 2 * inset) // 2 * 2, (by1 - by0 - 2 * inset) // 2 * 2)
            frames[k].glyph_box = _draw_texture(
                arr, layer, frames[k].glyph, bx0 + inset, by0 + inset, params, contrast, size
            )
        else:
            frames[k].glyph_box = _draw_glyph(arr, layer, frames[k].glyph, x, y, params, contrast)

    if params.noise_std > 0:
        noise = np.clip(rng.standard_normal(size=arr.shape[:2], dtype=np.float32), -NOISE_CLIP, NOISE_CLIP)
        layer += noise * np.float32(params.noise_std)
    arr = np.clip(np.round(arr + layer[..., None]), 0, 255).astype(np.uint8)

    target = frames[int(rng.integers(n_named))]
    assert target.colour is not None
    return WorldSample(
        sample_id=f"world-{seed}-{index:06d}",
        image=Image.fromarray(arr),
        question=question_for(target.colour),
        answer=target.glyph,
        box=target.box,
        colour=target.colour,
        frames=frames,
        stray=stray,
    )


def crop_box(
    box: Box,
    margin: float = 0.25,
    rng: np.random.Generator | None = None,
    size: tuple[int, int] = (448, 448),
    jitter: float = 0.15,
) -> Box:
    """The crop around ``box`` used to train and evaluate reading: the box grown by ``margin``.

    ``margin`` is a share of the box's side added on every side. With ``rng`` (training), the
    margin is drawn from [0.4, 1.6] x ``margin`` per side pair and the crop is shifted by up to
    ``jitter`` x its side, never so far that the box's centre leaves the crop. Clipped to the
    image of ``size`` (width, height). Far edges are exclusive.
    """
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    mx, my = margin * w, margin * h
    dx = dy = 0.0
    if rng is not None:
        mx *= float(rng.uniform(0.4, 1.6))
        my *= float(rng.uniform(0.4, 1.6))
        dx = float(rng.uniform(-jitter, jitter)) * (w + 2 * mx)
        dy = float(rng.uniform(-jitter, jitter)) * (h + 2 * my)
    cx0, cx1 = x0 - mx + dx, x1 + mx + dx
    cy0, cy1 = y0 - my + dy, y1 + my + dy
    cx0, cx1 = min(cx0, (x0 + x1) / 2 - 1), max(cx1, (x0 + x1) / 2 + 1)
    cy0, cy1 = min(cy0, (y0 + y1) / 2 - 1), max(cy1, (y0 + y1) / 2 + 1)
    W, H = size
    out = (
        max(0, int(round(cx0))),
        max(0, int(round(cy0))),
        min(W, int(round(cx1))),
        min(H, int(round(cy1))),
    )
    return out


def write_world(out_dir: str | Path, n: int, seed: int, params: WorldParams | None = None) -> Path:
    """Write ``n`` samples of world ``seed`` as PNGs plus one JSONL manifest; return the JSONL's path.

    Each line: {"sample_id", "image" (relative to the JSONL), "question", "answer",
    "box": [x0, y0, x1, y1] (source px, far edge exclusive), "width", "height", "source": "world"}.
    """
    params = params or WorldParams()
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    path = out_dir / "world.jsonl"
    with path.open("w") as fh:
        for i in range(n):
            s = generate_sample(params, seed, i)
            rel = f"images/{s.sample_id}.png"
            s.image.save(out_dir / rel, optimize=False, compress_level=6)
            row = {
                "sample_id": s.sample_id,
                "image": rel,
                "question": s.question,
                "answer": s.answer,
                "box": list(s.box),
                "width": s.image.width,
                "height": s.image.height,
                "source": "world",
            }
            fh.write(json.dumps(row) + "\n")
    (out_dir / "world_params.json").write_text(json.dumps({"seed": seed, "n": n, **asdict(params)}, indent=1))
    return path
