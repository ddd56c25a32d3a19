"""Every params field's boundary, written down from what the field means (the comments and SPEC), not read off the
code: the last value accepted and the first refused on each side, and that a refusal names the field.

Mutation testing (scripts/mutation.sh) found the validation of the core params dataclasses barely pinned: a
range check moved by one (``check_min(.., 0)`` -> ``1``), an open end closed, ``optional=True`` dropped, or the
key of the error changed (``FieldError("tau" -> None)``) all survived, and each is what a user meets first: a
valid params.yaml refused, or an error that names the wrong key.
"""

from __future__ import annotations

import math
from dataclasses import fields

import pytest

from pipeline.config import FieldError, ModelParams
from pipeline.inference.params import EvalParams
from pipeline.inference.roi import RoIParams
from pipeline.student.params import TrainParams
from pipeline.teacher.head_selection import SelectParams
from pipeline.teacher.labels import LabelParams
from pipeline.teacher.params import DecodeParams, DumpParams

NAN, INF = math.nan, math.inf

# class, field, values a user may write, values that must be refused (naming the field)
BOUNDS = [
    # RoI post-processing (SPEC 3.2-3.4)
    (RoIParams, "smooth_size", [1, 3, 5], [0, -1, 2, 4]),  # an odd Gaussian window
    (RoIParams, "smooth_sigma", [0, 0.0, 0.5, 1.0, 3], [-0.1, NAN, INF]),  # 0 disables smoothing
    (RoIParams, "tau", [0, 0.15, 1], [-0.01, 1.01, NAN]),  # a probability threshold
    (RoIParams, "grow_below", [0, 4, 9], [-1]),  # 0: nothing grows
    (RoIParams, "max_area", [None, 1, 225], [0, -5]),  # None keeps every component
    (RoIParams, "mode", ["masked", "box"], ["crop", ""]),
    # labels (SPEC 1.3-1.4)
    (LabelParams, "layers", [None, [0], [3, 1]], [[], [-1], [2, 2]]),
    (LabelParams, "heads", [None, [0, 5]], [[], [-1], [1, 1]]),
    (LabelParams, "sink_method", ["norm", "attention_ok", "none"], ["nrom"]),
    (LabelParams, "sink_norm_factor", [0, 0.5, 10], [-1, NAN]),  # 0: every visual token a sink (ablations)
    (LabelParams, "sink_norm_abs", [None, 0, 50.0], [-0.5]),
    (LabelParams, "sink_norm_layer", [None, 0, 2], [-1]),
    (LabelParams, "sink_attn_heads", [None, [0, 3]], [[], [-2]]),
    (LabelParams, "sink_attn_threshold", [0, 1e-3, 2.0], [-1e-3, NAN]),  # other scales exist: no upper end
    (LabelParams, "tau_fg", [0.1, 0.2, 1], [1.5, -0.2, NAN]),
    (LabelParams, "tau_bg", [0, 0.1, 0.2], [-0.1, 0.3]),  # 0 <= tau_bg <= tau_fg (0.2)
    (LabelParams, "max_box_frac", [None, 0.01, 0.5, 1], [0, 1.2, -0.5]),  # a share of the grid: (0, 1]
    (LabelParams, "min_a_max", [None, 0, 5e-3], [-1e-3]),
    (LabelParams, "map_dtype", ["float64", "float16"], ["float32"]),
    # training (SPEC 2)
    (TrainParams, "B", [0, 15], [-1]),  # B = 0: the RPN starts at the embeddings
    (TrainParams, "R", [1, 3], [0]),
    (TrainParams, "lr", [1e-6, 5e-5], [0, -1e-4, NAN]),
    (TrainParams, "weight_decay", [0, 0.1], [-0.01]),
    (TrainParams, "warmup_frac", [0, 0.03, 0.99], [1, 1.5, -0.1]),  # a share of the steps, [0, 1)
    (TrainParams, "epochs", [1, 3], [0]),
    (TrainParams, "global_batch", [1, 512], [0]),
    (TrainParams, "micro_batch", [1, 16], [0]),
    (TrainParams, "grad_clip", [None, 0.5, 1.0], [0, -1.0]),  # None: no clipping
    (TrainParams, "bf16", [True, False, "auto"], ["yes", 2]),
    (TrainParams, "holdout_frac", [0, 0.02, 0.5], [1, -0.01]),  # [0, 1): something must be trained on
    (TrainParams, "seed", [0, 42], [-1]),
    (TrainParams, "save_every", [1, 50], [0]),
    (TrainParams, "log_every", [0, 10], [-1]),  # 0: no log lines
    (TrainParams, "objective", ["bce", "mse"], ["ce"]),
    (TrainParams, "betas", [(0.9, 0.98), [0, 0.5]], [(0.9, 1.0), (0.9,), (-0.1, 0.9)]),
    # teacher stages
    (DecodeParams, "batch_size", [1, 16], [0]),
    (DecodeParams, "max_new_tokens", [1, 128], [0]),
    (DumpParams, "layers", [[0], [14, 2]], [[], [-1], [3, 3]]),
    (DumpParams, "batch_size", [1], [0]),
    (DumpParams, "chunk_samples", [1, 256], [0]),
    # evaluate
    (EvalParams, "batch_size", [1], [0]),
    (EvalParams, "max_new_tokens", [1], [0]),
    (EvalParams, "modes", [["masked"], ["box", "masked"]], [[], ["masked", "masked"]]),
    (EvalParams, "raw_attention_layers", [[0], [14, 2]], [[], [1, 1], [-1]]),
    (EvalParams, "raw_attention_tau", [0, 0.3, 1], [1.1, -0.1]),
    (EvalParams, "crop_size", [None, 1, 336], [0]),
    # head selection (issue 19)
    (SelectParams, "n_samples", [1, 300], [0]),
    (SelectParams, "layers", [None, [0], [5, 2]], [[], [-1], [3, 3]]),
    (SelectParams, "batch_size", [1], [0]),
    (SelectParams, "top_k", [1, 8], [0]),
    (SelectParams, "bootstrap", [0, 1000], [-1]),  # 0: no intervals
    (SelectParams, "seed", [0, 7], [-1]),
    (SelectParams, "min_sink_ratio", [0.5, 5.0], [0, -1.0]),
]
REQUIRED = {ModelParams: {"path": "models/x"}}
# a value that would be refused only together with another field (sink_method: attention needs its layer)
EXTRA = {(LabelParams, "sink_method"): {"sink_attn_layer": 2}}


def _build(cls, name, value):
    extra = dict(EXTRA.get((cls, name), {}))
    if cls is LabelParams and name == "sink_method" and value == "attention_ok":
        value = "attention"
    return cls(**{name: value}, **extra)


@pytest.mark.parametrize(("cls", "name", "good", "bad"), BOUNDS, ids=[f"{c.__name__}.{n}" for c, n, _, _ in BOUNDS])
def test_field_boundaries(cls, name, good, bad):
    for value in good:
        _build(cls, name, value)  # must not raise
    for value in bad:
        with pytest.raises(FieldError) as err:
            _build(cls, name, value)
        assert err.value.key == name, f"{cls.__name__}({name}={value!r}) blamed {err.value.key!r}"
        assert str(err.value).startswith(f"{name}: ")


def test_attention_sinks_need_their_layer():
    with pytest.raises(FieldError) as err:
        LabelParams(sink_method="attention")
    assert err.value.key == "sink_attn_layer"
    with pytest.raises(FieldError) as err:
        LabelParams(sink_method="attention", sink_attn_layer=-1)
    assert err.value.key == "sink_attn_layer"


def test_per_layer_heads():
    LabelParams(layers=[2, 5], heads={2: [0, 1], 5: [3], 9: [0]})  # extra layers in heads are left out
    for heads, key in [({}, "heads"), ({2: [0]}, "heads"), ({2: [0], 5: []}, "heads.5"), ({-1: [0]}, "heads")]:
        with pytest.raises(FieldError) as err:
            LabelParams(layers=[2, 5], heads=heads)
        assert err.value.key == key, (heads, err.value.key)


def test_evaluate_roi_overrides_are_checked_as_roi_keys():
    assert EvalParams(roi={"tau": "0.2"}).roi == {"tau": 0.2}  # YAML strings converted
    for roi, key in [({"mode": "box"}, "roi.mode"), ({"taux": 0.2}, "roi"), ({"tau": 2.0}, "roi.tau")]:
        with pytest.raises(FieldError) as err:
            EvalParams(roi=roi)
        assert err.value.key == key, (roi, err.value.key)


def test_every_optional_field_takes_none():
    """A field typed ``... | None`` accepts None (null in params.yaml): the checks keep ``optional=True``."""
    for cls in (RoIParams, LabelParams, TrainParams, EvalParams, SelectParams, DecodeParams, DumpParams, ModelParams):
        for f in fields(cls):
            if "None" in str(f.type):
                cls(**{**REQUIRED.get(cls, {}), f.name: None})


def test_the_table_covers_every_checked_field():
    """A new field with a check but no row here fails: its boundary must be written down too."""
    covered = {(c, n) for c, n, _, _ in BOUNDS}
    free = {  # fields without a range: any value of their type is valid
        (RoIParams, "drop_area_1"),
        (LabelParams, "sink_attn_layer"),  # its range: test_attention_sinks_need_their_layer
        (LabelParams, "strict"),
        (LabelParams, "soft_targets"),
        (LabelParams, "box_blur"),
        (LabelParams, "mask_known_bg"),
        (DumpParams, "per_head"),
        (DumpParams, "include_eos"),
        (DumpParams, "include_last_prompt"),
        (EvalParams, "scoring"),  # a Literal: checked by the params parser
        (EvalParams, "roi"),  # test_evaluate_roi_overrides_are_checked_as_roi_keys
        (EvalParams, "raw_attention"),
        (EvalParams, "raw_attention_last_prompt"),
        (EvalParams, "reuse_prefix"),
    }
    for cls in (RoIParams, LabelParams, TrainParams, EvalParams, SelectParams, DecodeParams, DumpParams):
        missing = {(cls, f.name) for f in fields(cls)} - covered - free
        assert not missing, sorted(n for _, n in missing)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: LabelParams(layers=[-1]), "layers: layer indices must be integers >= 0 (got [-1])"),
        (lambda: LabelParams(heads=[-1]), "heads: head indices must be integers >= 0 (got [-1])"),
        (lambda: LabelParams(sink_attn_heads=[1, 1]), "sink_attn_heads: head indices must be distinct; [1] repeated"),
        (lambda: LabelParams(layers=[2], heads={2: [-1]}), "heads.2: head indices must be integers >= 0 (got [-1])"),
        (
            lambda: LabelParams(layers=[2, 5], heads={2: [0]}),
            "heads: has no head list for layer(s) [5] of layers [2, 5]",
        ),
        (lambda: LabelParams(heads={}), "heads: a per-layer mapping needs at least one layer"),
        (lambda: DumpParams(layers=[]), "layers: must be a non-empty list of decoder layer indices (got [])"),
        (
            lambda: EvalParams(raw_attention_layers=[3, 3]),
            "raw_attention_layers: decoder layer indices must be distinct",
        ),
        (lambda: SelectParams(layers=[-2]), "layers: decoder layer indices must be integers >= 0"),
    ],
)
def test_index_errors_say_what_the_indices_are(build, message):
    """The message says which kind of index is wrong (a layer or a head number), as the user wrote it."""
    with pytest.raises(FieldError) as err:
        build()
    assert str(err.value).startswith(message), str(err.value)
