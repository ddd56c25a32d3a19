"""Ground-truth box rules of the manifest at their edges: a box must have area on both axes, may overhang the image
by at most BOX_TOLERANCE px on any side (then it is clipped), and image references under a URL root stay under it.
Mutation testing found each edge unpinned."""

from __future__ import annotations

import pytest

from pipeline.io.manifest import BOX_TOLERANCE, RecordError, _box, _fit_box, _fmt_box, _inside, _join

T = BOX_TOLERANCE


@pytest.mark.parametrize("box", [[5, 2, 5, 8], [2, 5, 8, 5], [6, 2, 5, 8], [2, 6, 8, 5]])
def test_empty_or_inverted_boxes_are_refused(box):
    with pytest.raises(RecordError, match=r"is empty or inverted \(needs x0 < x1 and y0 < y1\)"):
        _box(box)


@pytest.mark.parametrize(
    ("value", "shown"), [([1, 2, 3], "[1, 2, 3]"), ("1,2,3,4", "string"), ([1, 2, 3, True], "[1, 2, 3, true]")]
)
def test_malformed_boxes_say_what_they_got(value, shown):
    with pytest.raises(RecordError) as err:
        _box(value)
    assert str(err.value) == f"'box' must be [x0, y0, x1, y1], four numbers; got {shown}"


@pytest.mark.parametrize(
    "side",
    [(-T - 0.5, 0, 10, 10), (0, -T - 0.5, 10, 10), (0, 0, 20 + T + 0.5, 10), (0, 0, 10, 30 + T + 0.5)],
)
def test_overhang_past_the_tolerance_on_any_side_is_refused(side):
    assert _fit_box(side, 20, 30) == f"'box' {_fmt_box(side)} lies outside the 20x30 image"


def test_overhang_within_the_tolerance_is_clipped():
    assert _fit_box((-T, -T, 20 + T, 30 + T), 20, 30) == (0.0, 0.0, 20.0, 30.0)
    assert _fit_box((1, 2, 3, 4), 20, 30) == (1.0, 2.0, 3.0, 4.0)


def test_url_roots():
    assert _inside("s3://bucket/data", "s3://bucket/data/img/1.png")
    assert not _inside("s3://bucket/data", "s3://bucket/other/1.png")
    assert not _inside("s3://bucket/data", "s3://bucket/data/../other/1.png")
    assert not _inside("s3://bucket/data", "gs://bucket/data/1.png")  # another scheme
    assert not _inside("/local/data", "s3://bucket/data/1.png") and not _inside("s3://bucket/data", "/local/data/1.png")
    assert _join("s3://bucket/data/", "img/1.png") == "s3://bucket/data/img/1.png"
    assert _join("/root", "https://host/1.png") == "https://host/1.png"  # a URL is not under the root
    assert _join("/root", "/abs/1.png") == "/abs/1.png" and _join(None, "a.png") == "a.png"
