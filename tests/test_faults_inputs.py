"""Fault injection, inputs of `prepare` and `inspect`: each bad input has one exact, recorded outcome.

A bad record becomes a skip whose reason names its place in the input (``line N`` of JSONL, 1-based; ``row N``
of Parquet and ``item N`` of a LLaVA mix, 0-based) and the field, while the good records go on; an input that is
unusable as a whole stops `prepare` with one line naming the file; every image is decoded in full; image paths
stay inside the image root unless allowed; skips are byte-identical across runs; `inspect` writes only inside its
output folder.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from pipeline.io.contracts import read_parquet
from stages.cli import main

ROOT = Path(__file__).resolve().parent.parent
W, H = 64, 48  # the good image's size
GOOD = {"sample_id": "good", "image": "img/ok.png", "question": "what is it ?", "answer": "a", "box": [1, 2, 30, 40]}
PREPARE_KEYS = {"image_root": None, "sources": None, "n": None, "seed": 42, "allow_outside_root": False}


def _png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def _broken_stream_png(pixels: np.ndarray) -> bytes:
    """A PNG whose chunk checksums are all valid (PIL's verify() passes) but whose compressed data is garbage."""
    data, pos, out = _png_bytes(pixels), 8, [b"\x89PNG\r\n\x1a\n"]
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        if kind == b"IDAT":
            body = b"\x78\x9c" + bytes(range(200))  # a zlib header, then bytes that do not inflate
        out.append(struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body)))
        pos += 12 + n
    return b"".join(out)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """tmp/data: img/ok.png (64x48), img/broken.png (valid checksums, broken stream), img/text.png (not an
    image); tmp/outside.png, a good image outside data/."""
    pixels = np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8)
    (tmp_path / "data/img").mkdir(parents=True)
    (tmp_path / "data/img/ok.png").write_bytes(_png_bytes(pixels))
    (tmp_path / "data/img/broken.png").write_bytes(_broken_stream_png(pixels))
    (tmp_path / "data/img/text.png").write_bytes(b"not an image")
    (tmp_path / "outside.png").write_bytes(_png_bytes(pixels))
    Image.open(tmp_path / "data/img/broken.png").verify()  # the checksums really are fine
    return tmp_path / "data"


def _prepare(data: Path, input_name: str, fmt: str = "records", **keys) -> tuple:
    """Run `sdrpn prepare` on data/input_name: (result, manifest rows, [(sample_id, reason)] of the skips)."""
    params = data.parent / "params.yaml"
    section = {"format": fmt, "input": str(data / input_name), **PREPARE_KEYS, **keys}
    params.write_text(yaml.safe_dump({"prepare": section}))
    out, skips = data.parent / "manifest.parquet", data.parent / "skips.parquet"
    for f in (out, skips):
        f.unlink(missing_ok=True)
    res = CliRunner().invoke(main, ["prepare", str(out), str(skips), "--params", str(params)])
    if res.exit_code != 0:
        return res, None, None
    skipped = [(r["sample_id"], r["reason"]) for r in read_parquet(skips, "manifest_skips").to_pylist()]
    return res, read_parquet(out, "manifest").to_pylist(), skipped


def _line(value) -> bytes:
    return value if isinstance(value, bytes) else json.dumps(value).encode()


def _bad(**fields) -> dict:
    return {**GOOD, "sample_id": "bad", **fields}


# (case, the JSONL line after one good line, expected (sample_id, reason) of its skip; {root} is the data dir)
JSONL_CASES = [
    (
        "non-utf8",
        b'{"image": "img/ok.png", "question": "caf\xe9 ?"}',
        (
            "",
            "line 2: not UTF-8: UnicodeDecodeError: 'utf-8' codec can't decode byte 0xe9 in position 40: "
            "invalid continuation byte",
        ),
    ),
    (
        "malformed-json",
        b'{"image": "img/ok.png", "question": "q"',
        ("", "line 2: malformed JSON: JSONDecodeError: Expecting ',' delimiter: line 1 column 40 (char 39)"),
    ),
    ("not-an-object", ["img/ok.png", "q"], ("", "line 2: not a JSON object (got array)")),
    ("json-null-line", None, ("", "line 2: not a JSON object (got null)")),
    ("question-int", _bad(question=7), ("bad", "line 2: 'question' must be a string, got integer")),
    ("question-missing", {"image": "img/ok.png"}, ("1", "line 2: 'question' is missing")),
    ("question-null", _bad(question=None), ("bad", "line 2: 'question' is null")),
    ("question-empty", _bad(question=""), ("bad", "line 2: 'question' is empty")),
    ("question-whitespace", _bad(question=" \t\n "), ("bad", "line 2: 'question' is empty")),
    ("image-list", _bad(image=["img/ok.png"]), ("bad", "line 2: 'image' must be a string, got array")),
    ("image-empty", _bad(image=""), ("bad", "line 2: 'image' is empty")),
    ("sample-id-null", _bad(sample_id=None), ("", "line 2: 'sample_id' is null")),
    ("sample-id-empty", _bad(sample_id=" "), ("", "line 2: 'sample_id' is empty")),
    ("sample-id-float", _bad(sample_id=1.5), ("", "line 2: 'sample_id' must be a string or an integer, got number")),
    ("sample-id-bool", _bad(sample_id=True), ("", "line 2: 'sample_id' must be a string or an integer, got boolean")),
    ("answer-int", _bad(answer=3), ("bad", "line 2: 'answer' must be a string, got integer")),
    ("answers-mixed", _bad(answers=["a", 3]), ("bad", "line 2: 'answers' item 1 must be a string, got integer")),
    ("answers-string", _bad(answers="a"), ("bad", "line 2: 'answers' must be an array of strings, got string")),
    ("source-int", _bad(source=1), ("bad", "line 2: 'source' must be a string, got integer")),
    (
        "box-nan",
        b'{"sample_id": "bad", "image": "img/ok.png", "question": "q", "box": [NaN, 0, 10, 10]}',
        ("bad", "line 2: 'box' [nan, 0, 10, 10] has a non-finite value"),
    ),
    (
        "box-infinity",
        b'{"sample_id": "bad", "image": "img/ok.png", "question": "q", "box": [0, 0, Infinity, 10]}',
        ("bad", "line 2: 'box' [0, 0, inf, 10] has a non-finite value"),
    ),
    (
        "box-inverted",
        _bad(box=[20, 0, 10, 10]),
        ("bad", "line 2: 'box' [20, 0, 10, 10] is empty or inverted (needs x0 < x1 and y0 < y1)"),
    ),
    (
        "box-zero-height",
        _bad(box=[0, 5, 10, 5]),
        ("bad", "line 2: 'box' [0, 5, 10, 5] is empty or inverted (needs x0 < x1 and y0 < y1)"),
    ),
    (
        "box-three-values",
        _bad(box=[1, 2, 3]),
        ("bad", "line 2: 'box' must be [x0, y0, x1, y1], four numbers; got [1, 2, 3]"),
    ),
    (
        "box-strings",
        _bad(box=["1", 2, 3, 4]),
        ("bad", """line 2: 'box' must be [x0, y0, x1, y1], four numbers; got ["1", 2, 3, 4]"""),
    ),
    ("box-object", _bad(box={"x0": 1}), ("bad", "line 2: 'box' must be [x0, y0, x1, y1], four numbers; got object")),
    ("box-past-right", _bad(box=[0, 0, 70, 10]), ("bad", "line 2: 'box' [0, 0, 70, 10] lies outside the 64x48 image")),
    ("box-above", _bad(box=[0, -5, 10, 10]), ("bad", "line 2: 'box' [0, -5, 10, 10] lies outside the 64x48 image")),
    (
        "box-only-in-tolerance-band",  # within 1 px of the edge but covering no pixel of the image
        _bad(box=[64.2, 0, 64.8, 10]),
        ("bad", "line 2: 'box' [64.2, 0, 64.8, 10] lies outside the 64x48 image"),
    ),
    ("image-missing", _bad(image="img/nope.png"), ("bad", "line 2: image not found")),
    (
        "image-broken-stream",
        _bad(image="img/broken.png"),
        ("bad", "line 2: unreadable image: OSError: broken data stream when reading image file"),
    ),
    (
        "image-not-an-image",
        _bad(image="img/text.png"),
        ("bad", "line 2: unreadable image: UnidentifiedImageError: cannot identify image file"),
    ),
    (
        "image-dotdot",
        _bad(image="../outside.png"),
        ("bad", "line 2: 'image' '../outside.png' lies outside the image root '{root}' (allow_outside_root is false)"),
    ),
    (
        "image-dotdot-inside-first",
        _bad(image="img/../../outside.png"),
        (
            "bad",
            "line 2: 'image' 'img/../../outside.png' lies outside the image root '{root}' (allow_outside_root is "
            "false)",
        ),
    ),
    (
        "image-absolute",
        _bad(image="{root}/../outside.png"),
        (
            "bad",
            "line 2: 'image' '{root}/../outside.png' lies outside the image root '{root}' (allow_outside_root is "
            "false)",
        ),
    ),
    (
        "image-url",
        _bad(image="memory://img/ok.png"),
        (
            "bad",
            "line 2: 'image' 'memory://img/ok.png' lies outside the image root '{root}' (allow_outside_root is false)",
        ),
    ),
    ("duplicate-id", GOOD, ("good", "line 2: duplicate sample_id (first at line 1)")),
]


def _fill(value, root: Path):
    """``value`` with ``{root}`` replaced in its strings (JSON lines, dicts and reasons)."""
    if isinstance(value, bytes):
        return value.replace(b"{root}", str(root).encode())
    if isinstance(value, str):
        return value.replace("{root}", str(root))
    if isinstance(value, dict):
        return {k: _fill(v, root) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return type(value)(_fill(v, root) for v in value)
    return value


@pytest.mark.parametrize(("line", "expected"), [c[1:] for c in JSONL_CASES], ids=[c[0] for c in JSONL_CASES])
def test_a_bad_jsonl_record_is_a_skip_naming_line_and_field(data, line, expected):
    (data / "records.jsonl").write_bytes(_line(GOOD) + b"\n" + _line(_fill(line, data)) + b"\n")
    res, rows, skipped = _prepare(data, "records.jsonl")
    assert res.exit_code == 0, res.output
    assert [r["sample_id"] for r in rows] == ["good"]  # the good record goes on
    assert skipped == [_fill(expected, data)]
    assert _fill(expected, data)[1] in res.output  # and the console says it too


def test_boxes_overhanging_by_rounding_are_clipped_and_outside_paths_can_be_allowed(data):
    """Within 1 px of the edge a box is clipped to the image; allow_outside_root accepts '..' and absolute paths."""
    rows = [
        {**GOOD, "box": [-0.5, -1.0, 64.5, 49.0]},
        {**GOOD, "sample_id": "up", "image": "../outside.png"},
        {**GOOD, "sample_id": "abs", "image": str(data.parent / "outside.png")},
    ]
    (data / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res, manifest, skipped = _prepare(data, "records.jsonl", allow_outside_root=True)
    assert res.exit_code == 0, res.output
    assert skipped == []
    assert [(r["box_x0"], r["box_y0"], r["box_x1"], r["box_y1"]) for r in manifest][0] == (0.0, 0.0, 64.0, 48.0)
    assert [r["sample_id"] for r in manifest] == ["good", "up", "abs"]


def test_a_utf8_bom_and_a_line_separator_inside_a_string_are_not_errors(data):
    """JSONL splits on newlines only: U+2028 inside a question is text, and a leading byte-order mark is dropped."""
    line = json.dumps({**GOOD, "question": "left\u2028right ?"}, ensure_ascii=False).encode()
    (data / "records.jsonl").write_bytes(b"\xef\xbb\xbf" + line + b"\n")
    res, manifest, skipped = _prepare(data, "records.jsonl")
    assert res.exit_code == 0, res.output
    assert skipped == [] and manifest[0]["question"] == "left\u2028right ?"


# (case, Parquet rows after one good row, expected skips)
PARQUET_CASES = [
    ("question-null", [{**GOOD, "sample_id": "bad", "question": None}], [("bad", "row 1: 'question' is null")]),
    ("question-blank", [{**GOOD, "sample_id": "bad", "question": "  "}], [("bad", "row 1: 'question' is empty")]),
    ("sample-id-null", [{**GOOD, "sample_id": None}], [("", "row 1: 'sample_id' is null")]),
    (
        "box-nan",
        [{**GOOD, "sample_id": "bad", "box": [float("nan"), 0.0, 10.0, 10.0]}],
        [("bad", "row 1: 'box' [nan, 0, 10, 10] has a non-finite value")],
    ),
    (
        "box-inverted",
        [{**GOOD, "sample_id": "bad", "box": [10.0, 0.0, 5.0, 10.0]}],
        [("bad", "row 1: 'box' [10, 0, 5, 10] is empty or inverted (needs x0 < x1 and y0 < y1)")],
    ),
]


@pytest.mark.parametrize(("rows", "expected"), [c[1:] for c in PARQUET_CASES], ids=[c[0] for c in PARQUET_CASES])
def test_a_bad_parquet_row_is_a_skip_naming_row_and_field(data, rows, expected):
    good = {**GOOD, "box": [float(v) for v in GOOD["box"]]}
    pq.write_table(pa.Table.from_pylist([good, *rows]), data / "records.parquet")
    res, manifest, skipped = _prepare(data, "records.parquet")
    assert res.exit_code == 0, res.output
    assert [r["sample_id"] for r in manifest] == ["good"]
    assert skipped == expected


def _conversation(question: str = "<image>\nwhat is it ?") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": "a"}]


MIX_GOOD = {"id": "good", "image": "img/ok.png", "conversations": _conversation()}
# (case, the LLaVA mix item after one good item, expected skip)
MIX_CASES = [
    ("not-an-object", "img/ok.png", ("", "item 1: not a JSON object (got string)")),
    ("image-int", {**MIX_GOOD, "id": "bad", "image": 5}, ("bad", "item 1: 'image' must be a string, got integer")),
    ("id-null", {**MIX_GOOD, "id": None}, ("", "item 1: 'id' is null")),
    (
        "conversations-missing",
        {"id": "bad", "image": "img/ok.png"},
        ("bad", "item 1: 'conversations' must be an array, got null"),
    ),
    (
        "no-human-turn",
        {**MIX_GOOD, "id": "bad", "conversations": [{"from": "gpt", "value": "a"}]},
        ("bad", "item 1: 'conversations' has no human turn"),
    ),
    (
        "turn-not-object",
        {**MIX_GOOD, "id": "bad", "conversations": ["hi"]},
        ("bad", "item 1: 'conversations' holds a turn that is not an object"),
    ),
    (
        "question-only-image-tag",
        {**MIX_GOOD, "id": "bad", "conversations": _conversation("<image>\n  ")},
        ("bad", "item 1: 'conversations' human turn has no question besides <image>"),
    ),
    (
        "question-int",
        {**MIX_GOOD, "id": "bad", "conversations": [{"from": "human", "value": 3}]},
        ("bad", "item 1: 'conversations' human turn 'value' must be a string, got integer"),
    ),
    (
        "image-outside-root",
        {**MIX_GOOD, "id": "bad", "image": "../outside.png"},
        ("bad", "item 1: 'image' '../outside.png' lies outside the image root '{root}' (allow_outside_root is false)"),
    ),
    (
        "image-broken-stream",
        {**MIX_GOOD, "id": "bad", "image": "img/broken.png"},
        ("bad", "item 1: unreadable image: OSError: broken data stream when reading image file"),
    ),
]


@pytest.mark.parametrize(("item", "expected"), [c[1:] for c in MIX_CASES], ids=[c[0] for c in MIX_CASES])
def test_a_bad_llava_mix_item_is_a_skip_naming_item_and_field(data, item, expected):
    (data / "mix.json").write_text(json.dumps([MIX_GOOD, item]))
    res, manifest, skipped = _prepare(data, "mix.json", fmt="llava_mix", image_root=str(data))
    assert res.exit_code == 0, res.output
    assert [r["sample_id"] for r in manifest] == ["good"]
    assert skipped == [_fill(expected, data)]


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# (case, file name, its bytes, format, expected one-line error; {path} is the input file)
UNUSABLE_CASES = [
    ("jsonl-missing", "absent.jsonl", None, "records", "{path}: no such file"),
    ("jsonl-empty", "records.jsonl", b"", "records", "{path}: no records (empty file)"),
    ("jsonl-blank-lines", "records.jsonl", b"\n  \n\t\n", "records", "{path}: no records (empty file)"),
    (
        "jsonl-binary",
        "records.jsonl",
        PNG_MAGIC + b"rest",
        "records",
        "{path}: not JSON Lines: no line parses as JSON (line 1: not UTF-8: UnicodeDecodeError: 'utf-8' codec "
        "can't decode byte 0x89 in position 0: invalid start byte)",
    ),
    (
        "jsonl-prose",
        "records.jsonl",
        b"image,question\nimg/ok.png,what ?\n",
        "records",
        "{path}: not JSON Lines: no line parses as JSON (line 1: malformed JSON: JSONDecodeError: Expecting "
        "value: line 1 column 1 (char 0))",
    ),
    (
        "jsonl-no-usable-record",
        "records.jsonl",
        b'{"image": "img/ok.png"}\n[1]\n',
        "records",
        "{path}: no usable record: all 2 skipped (first: line 1: 'question' is missing)",
    ),
    (
        "jsonl-every-image-missing",
        "records.jsonl",
        b'{"image": "img/nope.png", "question": "q"}\n',
        "records",
        "{path}: no usable record: all 1 skipped (first: line 1: image not found)",
    ),
    (
        "parquet-not-parquet",
        "records.parquet",
        b"hello",
        "records",
        "{path}: not a readable Parquet file: ArrowInvalid: Could not open Parquet input source '{path}': Parquet "
        "file size is 5 bytes, smaller than the minimum file footer (8 bytes)",
    ),
    ("parquet-no-rows", "records.parquet", "EMPTY_PARQUET", "records", "{path}: no records (empty file)"),
    (
        "mix-not-json",
        "mix.json",
        b"{oops",
        "llava_mix",
        "{path}: not JSON: JSONDecodeError: Expecting property name enclosed in double quotes: line 1 column 2 "
        "(char 1)",
    ),
    (
        "mix-not-utf8",
        "mix.json",
        b'["\xff"]',
        "llava_mix",
        "{path}: not UTF-8 text: UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff in position 2: invalid "
        "start byte",
    ),
    (
        "mix-object",
        "mix.json",
        b"{}",
        "llava_mix",
        "{path}: a LLaVA mix is a JSON array of conversations, got a JSON object",
    ),
    ("mix-empty", "mix.json", b"[]", "llava_mix", "{path}: no entries (an empty JSON array)"),
    (
        "mix-text-only",
        "mix.json",
        b'[{"id": "t", "conversations": []}]',
        "llava_mix",
        "{path}: none of its 1 entries has an image",
    ),
]


@pytest.mark.parametrize(
    ("name", "content", "fmt", "message"), [c[1:] for c in UNUSABLE_CASES], ids=[c[0] for c in UNUSABLE_CASES]
)
def test_an_unusable_input_is_one_line_naming_the_file(data, name, content, fmt, message):
    path = data / name
    if content == "EMPTY_PARQUET":
        pq.write_table(pa.Table.from_pylist([], schema=pa.schema([("image", pa.string())])), path)
    elif content is not None:
        path.write_bytes(content)
    res, _, _ = _prepare(data, name, fmt=fmt)
    assert res.exit_code == 1
    assert res.output == "Error: " + message.replace("{path}", str(path)) + "\n"
    assert not (data.parent / "manifest.parquet").exists()


def test_two_prepare_runs_write_byte_identical_manifest_and_skips(data, tmp_path):
    """Skip reasons carry no memory addresses (PIL names its file object): separate processes, same bytes."""
    rows = [
        GOOD,
        _bad(image="img/text.png"),
        _bad(sample_id="b2", image="img/broken.png"),
        _bad(sample_id="b3", image="x"),
    ]
    (data / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump({"prepare": {"format": "records", "input": str(data / "records.jsonl"), **PREPARE_KEYS}})
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    outs = []
    for run in ("a", "b"):
        out = [tmp_path / f"{run}-manifest.parquet", tmp_path / f"{run}-skips.parquet"]
        cmd = [sys.executable, "-m", "stages.cli", "prepare", *map(str, out), "--params", str(params)]
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        outs.append([f.read_bytes() for f in out])
    assert outs[0] == outs[1]
    reasons = read_parquet(tmp_path / "a-skips.parquet", "manifest_skips").column("reason").to_pylist()
    assert reasons == [
        "line 2: unreadable image: UnidentifiedImageError: cannot identify image file",
        "line 3: unreadable image: OSError: broken data stream when reading image file",
        "line 4: image not found",
    ]


@pytest.mark.parametrize(
    ("sample_id", "name"),
    [
        ("world-1001-000000", "world-1001-000000.png"),  # a safe id is its own name
        ("../../escape", "escape-"),
        ("/etc/passwd", "etc_passwd-"),
        ("a/b", "a_b-"),
        ("a b", "a_b-"),
        ("..", "sample-"),
        ("", "sample-"),
        (".hidden", "hidden-"),
        ("x" * 300, "x" * 120 + "-"),
    ],
)
def test_inspect_names_stay_inside_the_output_folder(sample_id, name, tmp_path):
    from stages.inspect import output_name

    got = output_name(sample_id)
    assert got == name if name.endswith(".png") else got.startswith(name) and len(got) == len(name) + 12
    target = (tmp_path / got).resolve()
    assert target.parent == tmp_path.resolve() and not got.startswith(".")


def test_inspect_names_are_unique():
    from stages.inspect import output_name

    ids = ["a/b", "a_b", "a b", "a?b", "a\\b", "../a_b", "a_b-", "A_B", "..", "...", "", "sample"]
    assert len({output_name(i) for i in ids}) == len(ids)


def test_inspect_of_a_dotdot_id_writes_inside_its_output_folder(data, tmp_path):
    """End to end on the embedded model: an id holding '../' cannot place the picture outside --out-dir."""
    (data / "records.jsonl").write_text(json.dumps({**GOOD, "sample_id": "../escape"}) + "\n")
    res, manifest, _ = _prepare(data, "records.jsonl")
    assert res.exit_code == 0, res.output
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"].update(path=str(ROOT / "models/sdrpn-toy-llava"), device="cpu", dtype="float32")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "out" / "inner"
    args = ["inspect", "../escape", "--out-dir", str(out), "--manifest", str(tmp_path / "manifest.parquet")]
    args += [
        "--store",
        str(tmp_path / "no-store"),
        "--rpn",
        str(tmp_path / "no-rpn"),
        "--params",
        str(tmp_path / "params.yaml"),
    ]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    written = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*"))
    assert all(w == "inner" or w.startswith("inner/") for w in written), written  # nothing next to inner/
    from stages.inspect import output_name

    assert written == ["inner", f"inner/{output_name('../escape')}"]
    assert Image.open(out / output_name("../escape")).size[0] > 0
