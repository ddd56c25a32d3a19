"""Named label-parameter presets: the reference code's per-model settings (SPEC section 4) by one name.

``label: {preset: qwen2_5_vl_7b}`` in params.yaml fills every field the preset sets; ``preset_file`` (a YAML file of
label keys, e.g. what ``sdrpn select-heads`` proposes) overrides the preset; explicit keys next to them override
both, and a key left ``null`` counts as unset (it keeps the preset's value), so
params.yaml may keep listing every key for documentation. ``paper`` is the plain :class:`LabelParams`
defaults (paper eq. 1-2, norm-based sinks). Layers and heads are 0-indexed model indices; the dump
must store them (``per_head: true`` and the layers of :func:`dump_requirements`).

Each reference preset reproduces the authors' label function (``create_pseudo_labels`` in the reference's
``LLaVA/llava/mm_utils.py`` / ``Qwen2.5-VL/qwen_src/mm_utils.py``, fed by its label scripts) token for token
on the same per-head maps (``tests/test_authors_labels.py`` restates it and compares): one flat mean over the
selected heads, LLaVA-7B in float16 arithmetic (``map_dtype``), strict inequalities, sinks zeroed, the big-box
rule, Qwen's ``min_a_max`` and its fg box taken on the 3x3 Gaussian blur of the fg-masked map (``box_blur``).
Qwen's reference also makes the tokens over the grey padding of its square view (``expand2square``) sinks and
background (``mask_known_bg = fix_res``): the Qwen presets set ``mask_known_bg``, so the ``label`` stage passes
the store's ``known_bg`` array (written by ``dump`` from the adapter's ``padding_tokens``) to
:func:`~pipeline.teacher.labels.assign_labels`; a store without it (a view without padding) has no such tokens.
LLaVA's ``create_pseudo_labels`` has no padding rule (its padding tokens are ordinary tokens), so its presets
leave it off.

The reference presets are made for the reference views: ``model: {pad_to_square: true}`` for LLaVA-1.5 (the
image centred on a square of the image-mean colour, resized with no centre crop) and ``model: {resolution:
{mode: fixed, size: 672, pad: true}}`` for Qwen2.5-VL (a grey square, 24 x 24 merged tokens); with another
view the same heads see another image.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from pipeline.config import ParamsError, parse_section, require_keys
from pipeline.teacher.labels import LabelParams

# Reference-code extras shared by every model (SPEC 1.4): strict inequalities, drop big fg boxes.
_REFERENCE = {"strict": True, "max_box_frac": 0.5}
_LLAVA = {**_REFERENCE, "sink_method": "attention", "sink_attn_threshold": 1e-3}
_QWEN = {**_REFERENCE, "min_a_max": 5e-3, "box_blur": True, "mask_known_bg": True}
_QWEN_NATURAL = {**_QWEN, "sink_method": "attention", "sink_attn_threshold": 1e-2}
_QWEN_TEXT = {**_QWEN, "sink_method": "none"}

PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    # the 7B label script sums its float16 head maps in float16; the 13B one accumulates in float64
    "llava_1_5_7b": {
        **_LLAVA,
        "heads": {14: [13, 24, 26]},
        "sink_attn_layer": 2,
        "sink_attn_heads": None,
        "map_dtype": "float16",
    },
    "llava_1_5_13b": {
        **_LLAVA,
        "heads": {16: [2, 21, 30], 15: [2], 13: [21, 23, 26]},
        "sink_attn_layer": 16,
        "sink_attn_heads": [17, 22],
    },
    # natural-image heads (GQA-style questions) and text heads (OCR-style questions), per the reference code
    "qwen2_5_vl_3b": {
        **_QWEN_NATURAL,
        "heads": {21: [9, 11], 22: [0, 7]},
        "sink_attn_layer": 8,
        "sink_attn_heads": [1, 13],
    },
    "qwen2_5_vl_3b_text": {**_QWEN_TEXT, "heads": {20: [1, 4], 22: [14]}},
    "qwen2_5_vl_7b": {
        **_QWEN_NATURAL,
        "heads": {16: [1, 7, 17], 19: [17, 20]},
        "sink_attn_layer": 9,
        "sink_attn_heads": [4, 22],
    },
    "qwen2_5_vl_7b_text": {**_QWEN_TEXT, "heads": {22: [1, 4], 23: [6, 11]}},
    # PROVISIONAL: neither the paper nor the public code gives DeepSeek-VL's label layers or heads. By the paper's
    # rule (Appendix A: the middle layers hold the grounding signal; a range of layers is averaged) this is the
    # middle band of DeepSeek-VL-1.3B's 24 decoder layers, every head, with the paper's norm-based sinks (eq. 1)
    # and plain thresholds. One params.yaml edit replaces it (label.layers / label.heads).
    "deepseek_vl_1_3b": {"layers": [10, 11, 12, 13]},
}


LABEL_KEYS = ("preset", "preset_file", *(f.name for f in fields(LabelParams)))


def resolve_label_params(
    section: dict[str, Any] | None, complete: bool = False, preset_file: dict[str, Any] | None = None
) -> LabelParams:
    """LabelParams from a params.yaml ``label`` section: the named ``preset`` (default ``paper``), then the keys of
    the section's ``preset_file`` (given here already read, as ``preset_file``: e.g. what ``select-heads`` wrote),
    then the section's own non-null keys.

    Raises :class:`~pipeline.config.ParamsError` naming ``label.<key>`` for an unknown key or a bad value, and
    with ``complete`` (the stages) for a key the section does not list (``null`` counts as listed).
    """
    section = dict(section or {})
    if complete:
        require_keys(section, LABEL_KEYS, "label")
    name = section.pop("preset", None) or "paper"
    path = section.pop("preset_file", None)
    if name not in PRESETS:
        raise ParamsError(f"label.preset: unknown preset {name!r}; known: {sorted(PRESETS)}")
    from_file = dict(preset_file or {})
    if path is not None and preset_file is None:
        raise ParamsError(f"label.preset_file: {path} was not read (the stage reads it)")
    unknown = sorted(set(from_file) - set(LABEL_KEYS[2:]))
    if unknown:
        raise ParamsError(f"label.preset_file: {path}: unknown key(s) {unknown}; known: {list(LABEL_KEYS[2:])}")
    overrides = {k: v for k, v in section.items() if v is not None}
    return parse_section(LabelParams, {**PRESETS[name], **from_file, **overrides}, "label")


def dump_requirements(params: LabelParams) -> dict[str, Any]:
    """What the dump stage must store for ``params``: the layers it names (at least; None = it names none) and
    whether it needs per-head maps (``dump.per_head``)."""
    heads = params.heads
    layers = set(params.layers or (heads.keys() if isinstance(heads, dict) else ()))
    for extra in (params.sink_norm_layer, params.sink_attn_layer if params.sink_method == "attention" else None):
        if extra is not None:
            layers.add(extra)
    per_head = heads is not None or (params.sink_method == "attention" and params.sink_attn_heads is not None)
    return {"layers": sorted(int(x) for x in layers) or None, "per_head": per_head}


def label_layers(params: LabelParams, stored_layers: list[int]) -> list[int]:
    """The layers whose maps make the label map: ``layers``, else the keys of a per-layer ``heads``, else all stored."""
    if params.layers is not None:
        return [int(x) for x in params.layers]
    if isinstance(params.heads, dict):
        return [int(x) for x in params.heads]
    return [int(x) for x in stored_layers]


def check_dump_covers(params: LabelParams, dump_layers: list[int], dump_per_head: bool) -> None:
    """Refuse label settings that need what the dump does not store, naming the keys on both sides."""
    need = dump_requirements(params)
    missing = sorted(set(need["layers"] or ()) - {int(x) for x in dump_layers})
    if missing:
        raise ParamsError(
            f"label.layers/heads/sink_norm_layer/sink_attn_layer name layer(s) {missing} that dump.layers "
            f"{list(dump_layers)} does not store; add them to dump.layers or change the label keys"
        )
    if need["per_head"] and not dump_per_head:
        raise ParamsError(
            "label.heads/sink_attn_heads select heads, but dump.per_head is false (the store holds the head-mean); "
            "set dump.per_head: true or drop the head selection"
        )
