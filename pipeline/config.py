"""Typed parameters: every params.yaml section parses into a dataclass, or fails naming the key.

Each section's dataclass lives next to the code it configures (``DumpParams`` in
:mod:`pipeline.teacher.params`, ``TrainParams`` in :mod:`pipeline.student.params`, ...); this module
holds the one parser they share and the ``model`` section. Parsing is strict on three counts:

* an unknown key is an error (a typo must not pass silently; nested dataclasses declare
  ``__pydantic_config__ = STRICT_KEYS`` for the same);
* a value of the wrong type or an impossible one is an error naming ``section.key`` (types come from the
  dataclass annotations, checked by pydantic; ranges from the dataclass's own ``__post_init__``);
* with ``complete=True`` (what the DVC stages use) a missing key is an error too: params.yaml states every
  value the pipeline runs with, so deleting a key never falls back to a library default at another scale.
  The dataclass defaults are the paper's / reference code's values, for the Python API.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal, TypeVar

from pydantic import ConfigDict, TypeAdapter, ValidationError

T = TypeVar("T")

# What every params dataclass declares so unknown keys are refused (pydantic reads it off stdlib dataclasses).
STRICT_KEYS = ConfigDict(extra="forbid")


class ParamsError(ValueError):
    """A params.yaml section that cannot be used; the message names the section and key."""


@cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def _describe(err: dict[str, Any]) -> tuple[str, str]:
    """(dotted key, message) of one pydantic error; union branches (type names in the path) are dropped."""
    loc = [str(p) for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in _TYPE_NAMES))]
    msg = err["msg"].removeprefix("Value error, ")
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


DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")
RESOLUTION_KEYS = ("mode", "size", "min_pixels", "max_pixels", "pad")


@dataclass
class ModelParams:
    """The ``model`` section: a local checkpoint directory and how to run it."""

    path: str  # no default: there is no model without a path
    resolution: dict[str, Any] | None = None  # Qwen2.5-VL only: {mode: fixed, size: 672, pad: true}, ...
    pad_to_square: bool = False  # LLaVA only: the reference view (mean-colour pad to a square, resize, no crop)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    def __post_init__(self) -> None:
        base, _, index = self.device.partition(":")
        if base not in DEVICES or (index and (base != "cuda" or not index.isdigit())):
            raise ValueError(f"device must be one of {list(DEVICES)} or cuda:N, got {self.device!r}")
        if self.resolution is not None:
            unknown = sorted(set(self.resolution) - set(RESOLUTION_KEYS))
            if unknown:
                raise ValueError(f"resolution: unknown key(s) {unknown}; known: {list(RESOLUTION_KEYS)}")
            if self.pad_to_square:
                raise ValueError(
                    "pad_to_square is LLaVA's option and resolution Qwen2.5-VL's; a model takes one of them "
                    "(Qwen2.5-VL pads with resolution: {mode: fixed, size: ..., pad: true})"
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
