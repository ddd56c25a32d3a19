"""Typed parameters: every params.yaml section parses into a dataclass, or fails naming the key.

Each section's dataclass lives next to the code it configures (``DumpParams`` in
:mod:`pipeline.teacher.params`, ``TrainParams`` in :mod:`pipeline.student.params`, ...); this module
holds the one parser they share and the ``model`` section. Parsing is strict on three counts:

* an unknown key is an error (a typo must not pass silently; nested dataclasses declare
  ``__pydantic_config__ = STRICT_KEYS`` for the same);
* a value of the wrong type or an impossible one is an error naming ``section.key`` (types come from the
  dataclass annotations, checked by pydantic; ranges from the dataclass's own ``__post_init__``, which raises
  :class:`FieldError` through the ``check_*`` helpers below so the message names ``section.key`` and the value);
* with ``complete=True`` (what the DVC stages use) a missing key is an error too: params.yaml states every
  value the pipeline runs with, so deleting a key never falls back to a library default at another scale.
  The dataclass defaults are the paper's / reference code's values, for the Python API.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from typing import Any, TypeVar

from pydantic import ConfigDict, TypeAdapter, ValidationError

T = TypeVar("T")

# What every params dataclass declares so unknown keys are refused (pydantic reads it off stdlib dataclasses).
STRICT_KEYS = ConfigDict(extra="forbid")


class ParamsError(ValueError):
    """A params.yaml section that cannot be used; the message names the section and key."""


class FieldError(ValueError):
    """An impossible value of one key, raised by a params dataclass's ``__post_init__``.

    :func:`parse_section` reports it as ``section.key: message``; built directly (the Python API) it reads
    ``key: message``. ``key`` may be dotted (``resolution.size``, ``roi.tau``) for values inside a mapping.
    """

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


# --- value checks shared by the params dataclasses; each raises FieldError naming the key and the value ---------


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_min(key: str, value: Any, low: float = 1, *, optional: bool = False) -> None:
    """``value >= low`` (a finite number; None too when ``optional``)."""
    if value is None and optional:
        return
    # written as "not >=" so NaN fails too
    if not _is_number(value) or not math.isfinite(value) or not value >= low:
        raise FieldError(key, f"must be >= {low} (got {value!r})")


def check_positive(key: str, value: Any, *, optional: bool = False) -> None:
    """``value > 0`` and finite (None too when ``optional``)."""
    if value is None and optional:
        return
    if not _is_number(value) or not math.isfinite(value) or not value > 0:
        raise FieldError(key, f"must be a finite number > 0 (got {value!r})")


def check_range(
    key: str,
    value: Any,
    low: float,
    high: float,
    *,
    high_open: bool = False,
    low_open: bool = False,
    optional: bool = False,
) -> None:
    """``value`` in the interval from ``low`` to ``high`` (closed unless ``low_open`` / ``high_open``)."""
    if value is None and optional:
        return
    ok = (
        _is_number(value)
        and (low < value if low_open else low <= value)
        and (value < high if high_open else value <= high)
    )
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise FieldError(key, f"must lie in {interval} (got {value!r})")


def check_choice(key: str, value: Any, choices: Iterable[Any]) -> None:
    """``value`` is one of ``choices``."""
    choices = list(choices)
    if value not in choices:
        raise FieldError(key, f"must be one of {choices} (got {value!r})")


def check_indices(key: str, values: Any, *, optional: bool = False, what: str = "indices") -> None:
    """A non-empty list of distinct integers >= 0 (layer or head numbers; None too when ``optional``)."""
    if values is None and optional:
        return
    values = list(values) if isinstance(values, list | tuple) else values
    if not isinstance(values, list) or not values:
        raise FieldError(key, f"must be a non-empty list of {what} (got {values!r})")
    bad = [v for v in values if not _is_int(v) or v < 0]
    if bad:
        raise FieldError(key, f"{what} must be integers >= 0 (got {values!r})")
    dup = sorted({v for v in values if values.count(v) > 1})
    if dup:
        raise FieldError(key, f"{what} must be distinct; {dup} repeated (got {values!r})")


def check_pair(key: str, value: Any, low: float = 0) -> None:
    """A (min, max) pair of numbers with ``low <= min <= max``."""
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(_is_number(v) and math.isfinite(v) for v in value)
        or not low <= value[0] <= value[1]
    ):
        raise FieldError(key, f"must be a pair (min, max) with {low} <= min <= max (got {value!r})")


@cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def _describe(err: dict[str, Any]) -> tuple[str, str]:
    """(dotted key, message) of one pydantic error; union branches (type names in the path) are dropped."""
    loc = [str(p) for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in _TYPE_NAMES))]
    msg = err["msg"].removeprefix("Value error, ")
    error = err.get("ctx", {}).get("error")
    if isinstance(error, FieldError):  # raised by a __post_init__: it knows its key
        return ".".join([*loc, error.key]), error.message
    if err["type"] == "unexpected_keyword_argument":
        msg = "unknown key"
    elif err["type"] == "missing_argument":
        msg = "missing key"
    elif "input" in err and err["type"] not in ("value_error", "assertion_error"):
        msg += f" (got {err['input']!r})"
    return ".".join(loc), msg


_TYPE_NAMES = {"int", "float", "str", "bool", "none", "list", "dict", "tuple", "function-after", "literal"}


def parse_section(cls: type[T], values: dict[str, Any] | None, section: str, *, complete: bool = False) -> T:
    """Build the params dataclass ``cls`` from one params.yaml section.

    Raises :class:`ParamsError` naming ``section.key`` for an unknown key, a value of the wrong type or an
    impossible value, and (``complete=True``) for a key the section does not list.
    """
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ParamsError(f"{section}: expected a mapping of keys to values, got {type(values).__name__}")
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ParamsError(f"{section}: unknown key(s) {unknown}; known: {known}")
    if complete:
        missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in values]
        if missing:
            raise ParamsError(
                f"{section}: missing key(s) {missing}; params.yaml lists every value the pipeline runs with "
                f"(library defaults: { ({k: _default(cls, k) for k in missing}) })"
            )
    try:
        return _adapter(cls).validate_python(values)
    except ValidationError as exc:
        problems = []
        seen = set()
        for err in exc.errors():
            key, msg = _describe(err)
            where = f"{section}.{key}" if key else section
            if (where, msg) not in seen:
                seen.add((where, msg))
                problems.append(f"{where}: {msg}")
        raise ParamsError("; ".join(problems)) from None


def _default(cls: type, name: str) -> Any:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def require_keys(values: dict[str, Any], keys: list[str] | set[str], section: str) -> None:
    """Refuse a section that does not list exactly ``keys`` (for sections resolved by hand, e.g. ``label``)."""
    missing = sorted(set(keys) - set(values))
    unknown = sorted(set(values) - set(keys))
    if unknown:
        raise ParamsError(f"{section}: unknown key(s) {unknown}; known: {sorted(keys)}")
    if missing:
        raise ParamsError(f"{section}: missing key(s) {missing}; params.yaml lists every value the pipeline runs with")


def parse_nested(cls: type[T], values: dict[str, Any] | None, key: str) -> T:
    """Parse a mapping inside a section (e.g. ``evaluate.roi``) into ``cls``; a bad key is a :class:`FieldError`
    naming ``key.<inner key>``, so the enclosing section reports ``section.key.<inner key>``."""
    try:
        return parse_section(cls, values, key)
    except ParamsError as exc:
        where, _, message = str(exc).partition(": ")
        raise FieldError(where, message) from None


DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# what users write for the three dtypes (torch's own short names and the usual abbreviations)
DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
RESOLUTION_KEYS = ("mode", "size", "min_pixels", "max_pixels", "pad")
RESOLUTION_MODES = ("native", "fixed")


def canonical_dtype(name: Any) -> str:
    """The dtype name the pipeline records (``auto``, ``float32``, ``bfloat16``, ``float16``) for a name or alias."""
    key = name.strip().lower() if isinstance(name, str) else name
    key = DTYPE_ALIASES.get(key, key)
    if key not in DTYPES:
        raise FieldError(
            "dtype",
            f"unknown dtype {name!r}; valid: {list(DTYPES)} (aliases: "
            + ", ".join(f"{a}={c}" for a, c in DTYPE_ALIASES.items())
            + ")",
        )
    return key


@dataclass(frozen=True)
class Resolution:
    """Qwen2.5-VL's ``model.resolution``: how images are sized before patching.

    ``None`` budgets fall back to the image processor's own. Whether ``size`` is a multiple of the model's
    patch factor (28 for Qwen2.5-VL) is checked by the adapter, which knows the model.
    """

    mode: str = "native"
    size: int | None = None  # fixed: side in pixels (a multiple of patch * merge, e.g. 672)
    min_pixels: int | None = None  # native: pixel budget passed to smart_resize
    max_pixels: int | None = None
    pad: bool = False  # fixed only: centre the image on a grey square first (the reference's expand2square)

    def __post_init__(self) -> None:
        if self.mode not in RESOLUTION_MODES:
            raise FieldError("resolution.mode", f"must be one of {list(RESOLUTION_MODES)} (got {self.mode!r})")
        for key in ("size", "min_pixels", "max_pixels"):
            value = getattr(self, key)
            if value is not None and (not _is_int(value) or value < 1):
                raise FieldError(f"resolution.{key}", f"must be a whole number of pixels >= 1 (got {value!r})")
        if self.mode == "fixed" and self.size is None:
            raise FieldError("resolution.size", "mode 'fixed' needs a positive size (e.g. 672)")
        if self.mode == "native" and self.size is not None:
            raise FieldError("resolution.size", "mode 'native' takes min_pixels/max_pixels, not size")
        if self.mode == "fixed" and (self.min_pixels is not None or self.max_pixels is not None):
            raise FieldError("resolution.min_pixels", "mode 'fixed' takes size, not min_pixels/max_pixels")
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise FieldError(
                "resolution.min_pixels", f"must be <= max_pixels {self.max_pixels} (got {self.min_pixels})"
            )
        if not isinstance(self.pad, bool):
            raise FieldError("resolution.pad", f"must be true or false (got {self.pad!r})")
        if self.pad and self.mode != "fixed":
            raise FieldError(
                "resolution.pad", "pad: true needs mode 'fixed' (the reference pads, then resizes to the square)"
            )

    @classmethod
    def parse(cls, spec: Resolution | dict[str, Any] | None) -> Resolution:
        """From a params.yaml mapping (unknown keys are an error), an instance, or None (native, processor budget)."""
        if spec is None:
            return cls()
        if isinstance(spec, Resolution):
            return spec
        if not isinstance(spec, dict):
            raise FieldError("resolution", f"must be a mapping of {list(RESOLUTION_KEYS)} or null (got {spec!r})")
        unknown = sorted(set(spec) - set(RESOLUTION_KEYS))
        if unknown:
            raise FieldError("resolution", f"unknown key(s) {unknown}; known: {list(RESOLUTION_KEYS)}")
        return cls(**spec)


@dataclass
class ModelParams:
    """The ``model`` section: a local checkpoint directory and how to run it."""

    path: str  # no default: there is no model without a path
    resolution: dict[str, Any] | None = None  # Qwen2.5-VL only: {mode: fixed, size: 672, pad: true}, ...
    pad_to_square: bool = False  # LLaVA only: the reference view (mean-colour pad to a square, resize, no crop)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (aliases fp32/float, fp16/half, bf16 are recorded so)

    def __post_init__(self) -> None:
        if not self.path.strip():
            raise FieldError("path", "name the local checkpoint directory (got an empty path)")
        base, _, index = self.device.partition(":")
        if base not in DEVICES or (index and (base != "cuda" or not index.isdigit())):
            raise FieldError("device", f"must be one of {list(DEVICES)} or cuda:N (got {self.device!r})")
        self.dtype = canonical_dtype(self.dtype)
        if self.resolution is not None:
            Resolution.parse(self.resolution)  # every key and value checked here, before any model loads
            if self.pad_to_square:
                raise FieldError(
                    "pad_to_square",
                    "pad_to_square is LLaVA's option and resolution Qwen2.5-VL's; a model takes one of them "
                    "(Qwen2.5-VL pads with resolution: {mode: fixed, size: ..., pad: true})",
                )

    def adapter_options(self) -> dict[str, Any]:
        """Keyword arguments for the family's adapter (only the options that are set).

        An option the family does not take is refused when the adapter is built (``load_adapter``):
        ``resolution`` is Qwen2.5-VL's, ``pad_to_square`` LLaVA's.
        """
        out: dict[str, Any] = {}
        if self.resolution is not None:
            out["resolution"] = self.resolution
        if self.pad_to_square:
            out["pad_to_square"] = True
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
