"""The authors' released pseudo-label pickle: restricted unpickling, record validation, and import into labels.

The reference label rule below restates LLaVA/llava/mm_utils.py ``create_pseudo_labels`` of github
YuHengsss/SD-RPN at commit 27ba877 (lines cited as mm_utils L<n>); the fixture's fields follow
LLaVA/llava/eval/model_vqa_label.py at the same commit (cited as vqa_label L<n>).
"""

from __future__ import annotations

import builtins
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from pipeline.io.attention_store import open_attention_store
from pipeline.io.authors_import import (
    GROUNDING_LAYER,
    SINK_LAYER,
    AuthorsImportError,
    UnsafePickleError,
    import_authors_file,
    load_restricted,
)
from pipeline.io.manifest import records_from_table
from pipeline.teacher.label_presets import LABEL_KEYS
from pipeline.teacher.labels import LabelParams, label_store
from stages.cli import main

ROOT = Path(__file__).resolve().parent.parent
SIDE = 24  # LLaVA-1.5 at 336 px: 24x24 = 576 visual tokens (create_pseudo_labels hard-codes it, mm_utils L389, L396)
# The authors' LLaVA training loader: ROITrainingDataset (LLaVA/llava/train/train.py) passes sink 1e-3 and fg 0.2;
# bg 0.1 and the 0.5 box limit are create_pseudo_labels' defaults (mm_utils L350).
SINK_THRESH, TAU_FG, TAU_BG, MAX_BOX_FRAC = 1e-3, 0.2, 0.1, 0.5

# What the label stage needs to turn an imported store into those labels (docs/authors-label-rules.md).
AUTHORS_LLAVA = LabelParams(
    layers=[GROUNDING_LAYER],
    sink_method="attention",
    sink_attn_layer=SINK_LAYER,
    sink_attn_threshold=SINK_THRESH,
    tau_fg=TAU_FG,
    tau_bg=TAU_BG,
    strict=True,
    max_box_frac=MAX_BOX_FRAC,
)


def authors_labels(o2i: np.ndarray, sink: np.ndarray, side: int = SIDE) -> tuple[list[int], bool]:
    """The authors' LLaVA label rule in plain loops: (labels with -1 for ignore (they write -100), dropped)."""
    n = side * side
    a = [float(x) for x in o2i.reshape(-1)]
    s = sink.reshape(-1)
    # numpy compares an array with a Python float in the array's own dtype (float16 in the 7B file)
    thr = s.dtype.type(SINK_THRESH)
    # mm_utils L377: the map with sink tokens zeroed (a sink is sink_attn >= the threshold, L383)
    g = [0.0 if not (s[j] < thr) else a[j] for j in range(n)]
    a_max = max(g)
    # mm_utils L379-380, L386: fg is strictly above tau_fg * the max of the sink-free map
    fg = [g[j] > a_max * TAU_FG and g[j] > 0 for j in range(n)]
    # mm_utils L389-390 (get_foreground_bbox L252-277): inclusive box of the fg tokens; no fg: the whole grid
    rows = [j // side for j in range(n) if fg[j]]
    cols = [j % side for j in range(n) if fg[j]]
    y0, y1, x0, x1 = (min(rows), max(rows), min(cols), max(cols)) if rows else (0, side - 1, 0, side - 1)
    labels = []
    for j in range(n):
        r, c = divmod(j, side)
        inside = y0 <= r <= y1 and x0 <= c <= x1
        if fg[j]:
            labels.append(1)
        # mm_utils L407-408, L418-419: bg is outside the box and strictly below tau_bg * max (sinks count as 0)
        elif not inside and g[j] < a_max * TAU_BG:
            labels.append(0)
        else:
            labels.append(-1)
    # mm_utils L430-437: a box covering >= half of the grid leaves the whole sample ignore
    if (y1 - y0 + 1) * (x1 - x0 + 1) >= MAX_BOX_FRAC * n:
        return [-1] * n, True
    return labels, False


def _record(qid, o2i: np.ndarray, sink: np.ndarray, q2i: np.ndarray | None = None, dtype=np.float16) -> dict:
    """One record as vqa_label L173-179 writes it (7B: float16 maps of 576 values, vqa_label L134-142)."""
    rec = {
        "question_id": qid,
        "prompt": f"question {qid}?",
        "text": f"answer {qid}",
        "image": f"gqa/images/{qid}.jpg",
        "sink_attn": sink.astype(dtype),
        "grounding_attn_o2i": o2i.astype(dtype),
    }
    if q2i is not None:
        rec["grounding_attn_q2i"] = q2i.astype(dtype)
    return rec


def _token(r: int, c: int) -> int:
    return r * SIDE + c


def _edge_records() -> list[dict]:
    """Hand-made samples on every boundary of the rule."""
    n = SIDE * SIDE
    quiet_sink, q2i = np.full(n, 2e-4), np.full(n, 1e-3)  # q2i: every LLaVA-7B record has it (vqa_label L138-139)
    out = []
    # 0: strict inequalities and the sink threshold. max 0.625 makes 0.2*max = 0.125 and 0.1*max = 0.0625 exactly.
    o2i = np.full(n, 1e-3)
    sink = quiet_sink.copy()
    o2i[_token(5, 5)], o2i[_token(6, 5)] = 0.625, 0.126  # fg
    o2i[_token(5, 6)] = 0.125  # == 0.2*max: not fg (strict); outside the box and not < 0.0625: ignore
    o2i[_token(10, 10)] = 0.0625  # == 0.1*max: not bg (strict): ignore
    o2i[_token(10, 11)] = 0.0624  # bg
    o2i[_token(0, 0)], sink[_token(0, 0)] = 0.9, 0.05  # a sink: zeroed, so bg
    o2i[_token(0, 1)], sink[_token(0, 1)] = 0.3, np.float16(1e-3)  # sink_attn at the threshold: a sink
    o2i[_token(0, 2)], sink[_token(0, 2)] = 0.3, np.nextafter(np.float16(1e-3), np.float16(0))  # just below: fg
    out.append(_record("edge-strict", o2i, sink, q2i))
    # 1: fg at two far corners: the box is the whole grid -> dropped
    o2i = np.full(n, 1e-4)
    o2i[_token(0, 0)] = o2i[_token(23, 23)] = 0.5
    out.append(_record("edge-corners", o2i, quiet_sink, q2i))
    # 2: all-zero map -> dropped (the authors' empty fg gives the full-grid box)
    out.append(_record("edge-zero", np.zeros(n), quiet_sink, q2i))
    # 3: every token a sink -> dropped
    out.append(_record("edge-all-sinks", np.full(n, 0.01), np.full(n, 0.01), q2i))
    # 4: box of exactly half the grid (12 x 24 = 288) -> dropped; 5: 12 x 23 = 276 < 288 -> kept
    for name, corner in (("edge-half", (11, 23)), ("edge-under-half", (11, 22))):
        o2i = np.full(n, 1e-4)
        o2i[_token(0, 0)] = o2i[_token(*corner)] = 0.5
        out.append(_record(name, o2i, quiet_sink, q2i))
    return out


def _random_records(k: int, seed: int, dtype=np.float16, zero_sinks_in_place: bool = True) -> list[dict]:
    """Blob-shaped maps with a few high-attention sink tokens, like the authors' layer-14 maps."""
    rng = np.random.default_rng(seed)
    n = SIDE * SIDE
    rr, cc = np.divmod(np.arange(n), SIDE)
    out = []
    for i in range(k):
        o2i = rng.exponential(1e-4, n)
        cy, cx = rng.integers(0, SIDE, 2)
        radius = rng.uniform(0.7, 6.0)  # large radii give boxes over half the grid: dropped samples
        o2i += rng.uniform(5e-3, 5e-2) * np.exp(-((rr - cy) ** 2 + (cc - cx) ** 2) / (2 * radius**2))
        sink = rng.uniform(0, 9e-4, n)
        sinks = rng.choice(n, size=rng.integers(0, 5), replace=False)
        sink[sinks] = rng.uniform(2e-3, 0.2, len(sinks))
        o2i[sinks] = rng.uniform(0.05, 0.5, len(sinks))  # sinks soak up attention
        if zero_sinks_in_place and i % 2:
            # vqa_label L141-142: the 7B script zeroes the sinks of grounding_attn_o2i in place before saving
            o2i[sinks] = 0.0
        q2i = rng.exponential(1e-3, n)
        out.append(_record(f"{seed}-{i}", o2i, sink, q2i, dtype))
    return out


def _dump(records, path: Path, protocol: int | None = None) -> Path:
    with open(path, "wb") as fh:
        pickle.dump(records, fh, protocol=protocol)
    return path


def _label_rows(store_path: Path, out: Path, params: LabelParams = AUTHORS_LLAVA) -> list[dict]:
    label_store(store_path, params, out, progress=False)
    return pq.read_table(out).to_pylist()


def _check_against_reference(rows: list[dict], records: list[dict]) -> None:
    assert [r["sample_id"] for r in rows] == [str(rec["question_id"]) for rec in records]
    for row, rec in zip(rows, records, strict=True):
        want, dropped = authors_labels(rec["grounding_attn_o2i"], rec["sink_attn"])
        assert row["kept"] is (not dropped), row["sample_id"]
        # A sample that is not kept is never trained on (pipeline/student/train.py reads only kept rows): that is
        # the authors' all-ignore sample; its stored labels are kept for reports.
        effective = list(row["labels"]) if row["kept"] else [-1] * len(want)
        assert effective == want, row["sample_id"]


def test_import_round_trip_gives_the_authors_labels(tmp_path):
    records = _edge_records() + _random_records(300, seed=1)  # > 256: two zarr chunks
    path = _dump(records, tmp_path / "roi_pseudo.pkl")
    result = import_authors_file(path, tmp_path / "a.zarr", model_id="llava-v1.5-7b")
    assert (result.n_records, result.n_imported, result.grid, result.layers) == (306, 306, (24, 24), [0, 1, 2])

    store = open_attention_store(tmp_path / "a.zarr")
    assert store.layers == [0, 1, 2] and not store.per_head and store.model_id == "llava-v1.5-7b"
    src = store.attrs["source"]
    assert src["layer_fields"] == {"0": "grounding_attn_o2i", "1": "sink_attn", "2": "grounding_attn_q2i"}
    assert src["n_skipped"] == 0 and src["dtypes"]["sink_attn"] == ["float16"]
    block = store.read(0, store.n_samples)
    assert (block.grid == 24).all() and (block.n_response == -1).all() and not block.hidden_norm.any()
    for i, rec in enumerate(records):
        for layer, key in enumerate(("grounding_attn_o2i", "sink_attn", "grounding_attn_q2i")):
            np.testing.assert_array_equal(block.attention[i, layer], rec[key].astype(np.float32))  # float16: exact

    rows = _label_rows(tmp_path / "a.zarr", tmp_path / "labels.parquet")
    _check_against_reference(rows, records)
    # the hand-made boundaries come out as the rule says
    strict = list(rows[0]["labels"])
    expect = {(5, 5): 1, (6, 5): 1, (0, 2): 1, (5, 6): -1, (10, 10): -1, (10, 11): 0, (0, 0): 0, (0, 1): 0}
    assert {rc: strict[_token(*rc)] for rc in expect} == expect
    by_id = {r["sample_id"]: r for r in rows}
    assert (
        by_id["edge-corners"]["skip_reason"]
        == by_id["edge-half"]["skip_reason"]
        == "fg box area >= max_box_frac of the grid"
    )
    assert by_id["edge-zero"]["skip_reason"].startswith("a_max == 0")
    assert by_id["edge-all-sinks"]["skip_reason"] == "a_max == 0: every visual token is a sink"
    assert by_id["edge-under-half"]["kept"]
    dropped = sum(not r["kept"] for r in rows[6:])
    assert 0 < dropped < 300  # the random maps exercise both outcomes


def test_float64_and_2d_maps(tmp_path):
    """13B-style float64 maps (vqa_label L150-168) and Qwen-style (24, 24) arrays, flattened row-major."""
    records = _random_records(40, seed=2, dtype=np.float64, zero_sinks_in_place=False)
    for rec in records[::2]:
        for key in ("grounding_attn_o2i", "sink_attn", "grounding_attn_q2i"):
            rec[key] = rec[key].reshape(SIDE, SIDE)
    records[1]["question_id"] = 7  # integer ids become strings
    result = import_authors_file(_dump(records, tmp_path / "f64.pkl"), tmp_path / "a.zarr")
    assert result.n_imported == 40
    store = open_attention_store(tmp_path / "a.zarr")
    block = store.read(0, 1)
    np.testing.assert_array_equal(block.attention[0, 0], records[0]["grounding_attn_o2i"].astype(np.float32).ravel())
    assert store.sample_ids[1] == "7"
    # float64 -> float32 rounding could only matter for values within rounding of a threshold; none here
    _check_against_reference(_label_rows(tmp_path / "a.zarr", tmp_path / "l.parquet"), records)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_every_pickle_protocol_loads(tmp_path, protocol):
    records = _random_records(2, seed=3)
    records[0]["extra"] = {"tags": {"a", "b"}, "score": np.float16(0.5), "n": np.int64(3), "raw": b"\x00\xff"}
    loaded = load_restricted(_dump(records, tmp_path / "p.pkl", protocol))
    assert loaded[0]["extra"] == records[0]["extra"]
    for got, want in zip(loaded, records, strict=True):
        for key in ("grounding_attn_o2i", "sink_attn", "grounding_attn_q2i"):
            assert got[key].dtype == want[key].dtype
            np.testing.assert_array_equal(got[key], want[key])


def test_numpy_1_spelling_loads(tmp_path):
    """Files written with numpy 1.x name numpy.core.multiarray (protocol 2 spells globals as text lines)."""
    records = _random_records(1, seed=3)
    data = pickle.dumps(records, protocol=2)
    assert b"numpy._core.multiarray" in data
    (tmp_path / "np1.pkl").write_bytes(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    loaded = load_restricted(tmp_path / "np1.pkl")
    np.testing.assert_array_equal(loaded[0]["grounding_attn_o2i"], records[0]["grounding_attn_o2i"])


class _Payload:
    """A pickle that calls ``func(*args)`` when loaded by a stock unpickler."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _malicious(kind: str, marker: Path):
    if kind == "os.system":
        return _Payload(os.system, f"touch {marker}"), f"{os.system.__module__}.system"
    if kind == "builtins.exec":
        return _Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()"), "builtins.exec"
    # hidden inside a numpy object array, where the array machinery itself is allowed
    return np.array([_Payload(os.system, f"touch {marker}")], dtype=object), f"{os.system.__module__}.system"


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec", "object-array"])
def test_malicious_pickle_is_refused_and_never_run(tmp_path, kind):
    marker = tmp_path / "pwned"
    payload, refused = _malicious(kind, marker)
    rec = _record("0", np.ones(576), np.zeros(576))
    rec["sink_attn"] = payload
    path = _dump([rec], tmp_path / "evil.pkl")

    with pytest.raises(UnsafePickleError) as err:
        import_authors_file(path, tmp_path / "a.zarr")
    assert f"refused to unpickle global '{refused}'" in str(err.value) and str(path) in str(err.value)
    assert not marker.exists() and not (tmp_path / "a.zarr").exists()

    res = CliRunner().invoke(main, ["import-authors-labels", str(path), str(tmp_path / "b.zarr")])
    assert res.exit_code != 0 and f"'{refused}'" in res.output, res.output
    assert not marker.exists() and not (tmp_path / "b.zarr").exists()


def test_the_malicious_fixture_is_live(tmp_path):
    """Control: the stock unpickler does run the payload, so the test above proves the refusal."""
    marker = tmp_path / "pwned"
    path = _dump([_Payload(os.system, f"touch {marker}")], tmp_path / "evil.pkl")
    with open(path, "rb") as fh:
        pickle.load(fh)  # deliberately the stock loader, on our own harmless payload
    assert marker.exists()


def _malformed() -> tuple[list, set[tuple[int, str]]]:
    good = _random_records(4, seed=4)
    n = SIDE * SIDE
    bad = [
        good[0],
        {k: v for k, v in good[1].items() if k != "sink_attn"},  # 1: missing key
        _record("2", np.ones(n - 1), np.zeros(n - 1)),  # 2: wrong length (both maps)
        _record("3", np.where(np.arange(n) == 9, np.nan, 1.0), np.zeros(n), np.zeros(n)),  # 3: NaN
        _record("4", np.ones(n), np.where(np.arange(n) == 5, np.inf, 0.0), np.zeros(n)),  # 4: inf
        {**good[2], "question_id": good[0]["question_id"]},  # 5: duplicate id
        ["not", "a", "dict"],  # 6
        {**good[3], "question_id": None, "text": b"bytes"},  # 7: bad id and text
        {**good[3], "question_id": "8", "grounding_attn_o2i": [0.0] * n},  # 8: a list, not an array
        {**good[3], "question_id": "9", "sink_attn": np.zeros(n, np.int32)},  # 9: integer dtype
        {**good[3], "question_id": "10", "grounding_attn_o2i": -np.ones(n, np.float16)},  # 10: negative
    ]
    expect = {
        (1, "sink_attn"),
        (2, "grounding_attn_o2i"),
        (2, "sink_attn"),
        (2, "grounding_attn_q2i"),
        (3, "grounding_attn_o2i"),
        (4, "sink_attn"),
        (5, "question_id"),
        (6, "<record>"),
        (7, "question_id"),
        (7, "text"),
        (8, "grounding_attn_o2i"),
        (9, "sink_attn"),
        (10, "grounding_attn_o2i"),
    }
    return bad, expect


def test_malformed_records_are_named_with_their_field(tmp_path):
    records, expect = _malformed()
    path = _dump(records, tmp_path / "bad.pkl")
    with pytest.raises(AuthorsImportError) as err:
        import_authors_file(path, tmp_path / "a.zarr")
    msg = str(err.value)
    assert msg.startswith(f"{path}: 10 of 11 records are invalid")
    for line in (
        f"record 1 (question_id {records[1]['question_id']!r}): sink_attn: missing",
        "record 2 (question_id '2'): grounding_attn_o2i: has shape (575,), expected (576,) or (24, 24)",
        "record 2 (question_id '2'): grounding_attn_q2i: missing (other records carry it)",
        "record 3 (question_id '3'): grounding_attn_o2i: non-finite value nan at token 9",
        "record 4 (question_id '4'): sink_attn: non-finite value inf at token 5",
        f"record 5 (question_id {records[0]['question_id']!r}): question_id: duplicate",
        "record 6 (question_id ?): <record>: is a list, expected a dict",
        "record 7 (question_id ?): question_id: None is not a non-empty string or an integer",
        "record 7 (question_id ?): text: is a bytes, expected a string",
        "record 8 (question_id '8'): grounding_attn_o2i: is a list, expected a numpy float array",
        "record 9 (question_id '9'): sink_attn: has dtype int32, expected float16/32/64",
        "record 10 (question_id '10'): grounding_attn_o2i: negative value -1.0 at token 0",
    ):
        assert line in msg, (line, msg)
    assert not (tmp_path / "a.zarr").exists()

    # skipping instead: every problem is returned (and counted in the store), only record 0 is imported
    result = import_authors_file(path, tmp_path / "a.zarr", skip_invalid=True)
    assert {(p.index, p.field) for p in result.problems} == expect
    assert result.n_imported == 1
    store = open_attention_store(tmp_path / "a.zarr")
    assert list(store.sample_ids) == [records[0]["question_id"]]
    assert store.attrs["source"]["n_skipped"] == 10 and store.attrs["source"]["n_records"] == 11


def test_file_level_errors(tmp_path):
    with pytest.raises(AuthorsImportError, match="holds a dict, expected a list of dicts"):
        import_authors_file(_dump({"a": 1}, tmp_path / "d.pkl"), tmp_path / "a.zarr")
    with pytest.raises(AuthorsImportError, match="not a readable pseudo-label pickle"):
        (tmp_path / "t.pkl").write_bytes(pickle.dumps(_random_records(1, seed=5))[:-40])
        import_authors_file(tmp_path / "t.pkl", tmp_path / "a.zarr")
    rec = _random_records(1, seed=5)[0]
    with pytest.raises(AuthorsImportError, match=r"grounding_attn_o2i: has shape \(576,\), expected \(64,\)"):
        import_authors_file(_dump([rec], tmp_path / "g.pkl"), tmp_path / "a.zarr", grid=(8, 8))


def _authors_params(tmp_path: Path) -> Path:
    """The repository's params.yaml with dump/label set for an imported store (docs/authors-label-rules.md)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["dump"]["layers"] = [0, 1, 2]  # the store's pseudo-layers: o2i, sink, q2i
    params["dump"]["per_head"] = False
    params["label"] |= {
        "preset": "paper",
        "layers": [0],
        "heads": None,
        "sink_method": "attention",
        "sink_attn_layer": 1,
        "sink_attn_heads": None,
        "sink_attn_threshold": SINK_THRESH,
        "tau_fg": TAU_FG,
        "tau_bg": TAU_BG,
        "strict": True,
        "max_box_frac": MAX_BOX_FRAC,
        "min_a_max": None,
        "soft_targets": False,
    }
    # keys this test does not set keep their default (null = the preset's value, here the paper's)
    params["label"] |= {k: None for k in LABEL_KEYS if k not in params["label"]}
    out = tmp_path / "authors.params.yaml"
    out.write_text(yaml.safe_dump(params))
    return out


def test_cli_import_then_label(tmp_path):
    records = _edge_records() + _random_records(20, seed=6)
    records.append({"question_id": "bad"})  # skipped with its reason, never silently
    path = _dump(records, tmp_path / "roi_pseudo.pkl")
    store, skips, recs = tmp_path / "a.zarr", tmp_path / "skips.jsonl", tmp_path / "records.jsonl"
    runner = CliRunner()
    res = runner.invoke(
        main,
        ["import-authors-labels", str(path), str(store), "--skip-invalid", str(skips), "--records-out", str(recs)],
    )
    assert res.exit_code == 0, res.output
    assert "26 of 27 records" in res.output
    problems = [json.loads(line) for line in skips.read_text().splitlines()]
    assert {(p["index"], p["field"]) for p in problems} >= {(26, "image"), (26, "grounding_attn_o2i")}

    out = tmp_path / "labels.parquet"
    res = runner.invoke(
        main, ["label", str(store), str(out), "--params", str(_authors_params(tmp_path)), "--no-progress"]
    )
    assert res.exit_code == 0, res.output
    _check_against_reference(pq.read_table(out).to_pylist(), records[:-1])

    # the records file is what `prepare` (format: records) reads; its sample ids are the store's
    prepared = records_from_table(recs)
    assert [r.sample_id for r in prepared] == [r["question_id"] for r in records[:-1]]
    assert prepared[0].question == records[0]["prompt"] and prepared[0].source == "gqa"
