"""Fault injection on the attention store and the Parquet artifacts (issue 15, defects 2 and 6).

Each corruption is a row of a table with its exact outcome: an error naming the file (store, array, shard and
the samples it holds), never a silent change. A writer killed with SIGKILL at several points, creation
included, resumes to the same store or refuses with a message; it never reads back zeros.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr
from click.testing import CliRunner

from pipeline.io.attention_store import AttentionStoreWriter, open_attention_store
from pipeline.io.contracts import ContractError, read_metadata, read_parquet
from pipeline.teacher.labels import LabelParams, label_store

ROOT = Path(__file__).resolve().parents[1]
N, CHUNK, V, LAYERS = 600, 256, 16, [3]
NDIM = {"sample_id": 1, "grid": 2, "n_response": 1, "attention": 3, "hidden_norm": 3, "known_bg": 2}
RANGES = {0: "0..255", 1: "256..511", 2: "512..599"}


def rows(n: int = N, seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic store rows: every sample has a 4x4 grid, a peaked map and plain norms (labels keep it)."""
    rng = np.random.default_rng(seed)
    att = rng.random((n, len(LAYERS), V), dtype=np.float32) * 0.1
    att[np.arange(n), :, rng.integers(0, V, n)] += 1.0
    return {
        "sample_ids": np.array([f"id-{i}" for i in range(n)], dtype=object),
        "grid": np.tile(np.array([4, 4], np.int32), (n, 1)),
        "n_response": rng.integers(1, 9, n).astype(np.int32),
        "attention": att,
        "hidden_norm": rng.normal(40, 2, (n, len(LAYERS), V)).astype(np.float32),
    }


def write_rows(writer: AttentionStoreWriter, r: dict[str, np.ndarray], start: int, stop: int, step: int = 100) -> None:
    for s in range(start, stop, step):
        e = min(s + step, stop)
        writer.write(s, *(r[k][s:e] for k in ("sample_ids", "grid", "n_response", "attention", "hidden_norm")))


def build_store(path: Path, r: dict[str, np.ndarray] | None = None) -> Path:
    r = rows() if r is None else r
    w = AttentionStoreWriter.create(path, N, LAYERS, V, chunk_samples=CHUNK, known_bg=True, shard_samples=CHUNK)
    write_rows(w, r, 0, N)
    w.finalize()
    return path


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return build_store(tmp_path_factory.mktemp("template") / "attention.zarr")


@pytest.fixture
def store(template: Path, tmp_path: Path) -> Path:
    path = tmp_path / "attention.zarr"
    shutil.copytree(template, path)
    return path


def chunk_file(store: Path, array: str, c: int) -> Path:
    """The file of sample-shard ``c`` of ``array`` (one chunk a shard here; zarr 3 default keys: c/<i>/0/...)."""
    return store / array / "c" / str(c) / Path(*["0"] * (NDIM[array] - 1))


def delete(store: Path, array: str, c: int) -> None:
    chunk_file(store, array, c).unlink()


def truncate(store: Path, array: str, c: int) -> None:
    f = chunk_file(store, array, c)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def flip(store: Path, array: str, c: int) -> None:
    """Same size, a few bytes inverted in the middle: only a checksum can tell."""
    f = chunk_file(store, array, c)
    data = bytearray(f.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 4] = bytes(b ^ 0xFF for b in data[mid : mid + 4])
    f.write_bytes(bytes(data))


def what(array: str, c: int, ids: bool = True) -> str:
    """Regex for the part of the message that names the chunk and its samples."""
    lo, hi = (int(x) for x in RANGES[c].split(".."))
    named = f", ids 'id-{lo}'..'id-{hi}'" if ids else ""
    return re.escape(f"array '{array}' shard {c} (samples {RANGES[c]}{named})")


# (corruption, array, chunk, expected message after "<store>: ")
CORRUPTIONS = [
    (delete, "hidden_norm", 1, what("hidden_norm", 1) + " is missing"),
    (delete, "attention", 2, what("attention", 2) + " is missing"),
    (delete, "n_response", 0, what("n_response", 0) + " is missing"),
    (delete, "grid", 1, what("grid", 1) + " is missing"),
    (delete, "known_bg", 0, what("known_bg", 0) + " is missing"),  # all False: zarr would skip it and read False
    (delete, "sample_id", 1, what("sample_id", 1, ids=False) + " is missing"),  # ids unknown: the range alone
    (truncate, "attention", 1, what("attention", 1) + r" is truncated or altered \(\d+ bytes on disk, \d+ recorded"),
    (truncate, "n_response", 2, what("n_response", 2) + " is truncated or altered"),
    (flip, "attention", 0, what("attention", 0) + " is corrupt: its bytes do not match the sha256"),
    (flip, "hidden_norm", 2, what("hidden_norm", 2) + " is corrupt"),
    (flip, "grid", 1, what("grid", 1) + " is corrupt"),
    (flip, "sample_id", 0, what("sample_id", 0, ids=False) + " is corrupt"),
]


@pytest.mark.parametrize(
    "corrupt, array, c, message", CORRUPTIONS, ids=[f"{f.__name__}-{a}-{c}" for f, a, c, _ in CORRUPTIONS]
)
def test_corrupt_chunk_is_an_error_naming_store_array_and_samples(store, tmp_path, corrupt, array, c, message):
    corrupt(store, array, c)
    out = tmp_path / "labels.parquet"
    with pytest.raises(ContractError, match="^" + re.escape(str(store)) + ": " + message):
        label_store(store, LabelParams(), out, progress=False)
    assert not out.exists()


def test_corrupt_chunk_found_lazily_on_first_read_and_label_cli_fails(store, tmp_path):
    """A flipped chunk passes open (sizes match) and fails the read that first touches it; `label` exits 1."""
    flip(store, "hidden_norm", 1)
    st = open_attention_store(store)
    st.read(0, 256)  # chunk 0 is intact
    with pytest.raises(ContractError, match=what("hidden_norm", 1) + " is corrupt"):
        st.read(300, 310)
    from stages.label import label

    res = CliRunner().invoke(label, [str(store), str(tmp_path / "l.parquet"), "--params", str(ROOT / "params.yaml")])
    assert res.exit_code != 0 and isinstance(res.exception, ContractError), res.output
    assert str(res.exception).startswith(f"{store}: array 'hidden_norm' shard 1")
    assert not (tmp_path / "l.parquet").exists()


def test_intact_store_reads_back_exactly(store):
    r = rows()
    st = open_attention_store(store)
    blocks = list(st.iter_chunks())
    for key, field in (("attention", "attention"), ("hidden_norm", "hidden_norm"), ("n_response", "n_response")):
        np.testing.assert_array_equal(np.concatenate([getattr(b, field) for b in blocks]), r[key])
    assert not np.concatenate([b.known_bg for b in blocks]).any()


def test_nan_names_the_store_and_the_sample(tmp_path):
    r = rows()
    r["attention"][300, 0, 5] = np.nan  # written through the writer: the checksums are right, the value is not
    path = build_store(tmp_path / "nan.zarr", r)
    with pytest.raises(ValueError, match=re.escape(f"{path}: sample 'id-300': non-finite value in attention")):
        label_store(path, LabelParams(), tmp_path / "l.parquet", progress=False)


def _partial_store(path: Path) -> Path:
    """Shards 0 and 2 written, shard 1 not (a dump killed before it)."""
    r = rows()
    w = AttentionStoreWriter.create(path, N, LAYERS, V, chunk_samples=CHUNK, shard_samples=CHUNK)
    write_rows(w, r, 0, 256)
    write_rows(w, r, 512, N)
    return path


@pytest.mark.parametrize(
    "done, message",
    [
        (
            [0, 1, 2],
            r"attrs claim shard 1 \(samples 256\.\.511\) finished but record no checksum of array 'sample_id' for it",
        ),
        ([0, 2, 3], r"attrs claim shard 3 finished but the store has shards 0\.\.2"),
        ([0, 2], r"complete but shard 1 \(samples 256\.\.511\) is not finished"),
    ],
)
def test_claimed_shards_must_exist(tmp_path, done, message):
    path = _partial_store(tmp_path / "claim.zarr")
    g = zarr.open_group(str(path), mode="r+")
    g.attrs.update(done_shards=done, complete=True)
    with pytest.raises(ContractError, match="^" + re.escape(str(path)) + ": " + message):
        open_attention_store(path)


def test_claimed_shard_with_a_deleted_file_is_missing(tmp_path):
    """The v1 failure: the store lists a shard done whose files are gone."""
    path = _partial_store(tmp_path / "gone.zarr")
    w = AttentionStoreWriter.open_existing(path)
    write_rows(w, rows(), 256, 512)
    w.finalize()
    shutil.rmtree(path / "attention" / "c" / "1")
    with pytest.raises(ContractError, match=what("attention", 1) + " is missing"):
        open_attention_store(path)


def test_writer_resume_redoes_a_damaged_finished_shard(tmp_path):
    """A resumed writer re-checks finished shards and writes a damaged one again instead of keeping it."""
    path = _partial_store(tmp_path / "resume.zarr")
    flip(path, "attention", 2)
    with pytest.warns(UserWarning, match=r"shard 2 .*will be written again"):
        w = AttentionStoreWriter.open_existing(path)
    assert w.pending_ranges() == [(256, 600)]
    write_rows(w, rows(), 256, N)
    w.finalize()
    got = np.concatenate([b.attention for b in open_attention_store(path).iter_chunks()])
    np.testing.assert_array_equal(got, rows()["attention"])


@pytest.mark.parametrize("version", [1, 2])
def test_older_store_is_refused_with_a_clear_message(store, version):
    g = zarr.open_group(str(store), mode="r+")
    g.attrs["version"] = version
    want = f"^{re.escape(str(store))}: written with one file per chunk \\(attention_store v{version}\\).*rerun dump"
    with pytest.raises(ContractError, match=want):
        open_attention_store(store)


# --- Parquet artifacts: a truncated or foreign file is an error naming it -------------------------------------


def _parquet(path: Path, schema: str) -> Path:
    table = pa.table({"sample_id": [f"s{i}" for i in range(50)], "x": np.arange(50)})
    meta = {b"sdrpn": f'{{"schema": "{schema}", "version": 1, "params": {{}}, "inputs": {{}}}}'.encode()}
    pq.write_table(table.replace_schema_metadata(meta), path)
    return path


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _text(path: Path) -> None:
    path.write_text('{"sample_id": "a"}\n')


@pytest.mark.parametrize("schema", ["manifest", "labels", "responses"])
@pytest.mark.parametrize("damage", [_truncated, _empty, _text], ids=["truncated", "empty", "not-parquet"])
def test_unreadable_parquet_names_the_file(tmp_path, schema, damage):
    path = _parquet(tmp_path / f"{schema}.parquet", schema)
    damage(path)
    want = "^" + re.escape(f"{path}: not a readable Parquet file (")
    with pytest.raises(ContractError, match=want):
        read_parquet(path, schema)
    with pytest.raises(ContractError, match=want):
        read_metadata(path)


def test_missing_parquet_names_the_file(tmp_path):
    with pytest.raises(ContractError, match=re.escape(f"{tmp_path / 'nope.parquet'}: no such file")):
        read_parquet(tmp_path / "nope.parquet", "manifest")


# --- SIGKILL while a store is created and written, then resume ------------------------------------------------

# The child writes the same rows as the tests (their source is copied in, so it imports only the store module)
# and, at the kill point it is given, says so and waits to be killed; "random" kills at a random moment of
# creation and writing instead.
CHILD_HEAD = """
from __future__ import annotations
import sys, time
import numpy as np
import zarr
from pipeline.io import attention_store as m
from pipeline.io.attention_store import AttentionStoreWriter
N, CHUNK, V, LAYERS = {N}, {CHUNK}, {V}, {LAYERS}
"""
CHILD_BODY = """
point = sys.argv[2]

def mark(name):
    if name == point:
        print(name, flush=True)
        time.sleep(60)  # the parent kills us here

create_array = zarr.Group.create_array
def slow_create_array(self, name, **kw):
    out = create_array(self, name, **kw)
    if name == "n_response":
        mark("mid-create")
    return out
zarr.Group.create_array = slow_create_array

record = getattr(AttentionStoreWriter, "_record", None)  # the step that marks a shard done
def slow_record(self, c):
    if c == 1:
        mark("before-record")
    return record(self, c)
if record is not None:
    AttentionStoreWriter._record = slow_record

r = rows()
print("ready", flush=True)
w = AttentionStoreWriter.create(sys.argv[1], N, LAYERS, V, chunk_samples=CHUNK, known_bg=True, shard_samples=CHUNK)
mark("after-create")
for s in range(0, N, 50):
    write_rows(w, r, s, min(s + 50, N), step=50)
    if s == 300:
        mark("mid-write")
    time.sleep(0.05)
w.finalize()
"""


def child_script() -> str:
    head = CHILD_HEAD.format(N=N, CHUNK=CHUNK, V=V, LAYERS=LAYERS)
    return "\n".join([head, inspect.getsource(rows), inspect.getsource(write_rows), CHILD_BODY])


@pytest.mark.parametrize("point", ["mid-create", "after-create", "before-record", "mid-write", "random"])
def test_sigkill_while_writing_then_resume(tmp_path, point):
    path = tmp_path / "work" / "dump.zarr"
    path.parent.mkdir()
    script = tmp_path / "child.py"
    script.write_text(child_script())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(path), point], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    delay = float(np.random.default_rng().uniform(0.0, 1.0))  # "random": each run kills somewhere else
    try:
        line = proc.stdout.readline().decode().strip()
        assert line == "ready", (line, proc.stderr.read().decode() if proc.poll() is not None else "")
        if point == "random":
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=delay)
        else:
            line = proc.stdout.readline().decode().strip()
            assert line == point, line
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    print(f"killed at {point}" + (f", {delay:.2f} s after ready" if point == "random" else ""))

    # Whatever the kill left, a reader refuses it as unfinished or (killed after finalize) reads it all.
    r = rows()
    if path.exists():
        try:
            assert_store_holds(open_attention_store(path), r)
        except ContractError as exc:
            assert str(exc).startswith(f"{path}: incomplete store"), exc

    # Resume the way `dump` does: reopen when the store exists, else create.
    if path.exists():
        w = AttentionStoreWriter.open_existing(path)
    else:
        w = AttentionStoreWriter.create(path, N, LAYERS, V, chunk_samples=CHUNK, known_bg=True, shard_samples=CHUNK)
    for lo, hi in w.pending_ranges():
        write_rows(w, r, lo, hi)
    w.finalize()
    assert sorted(p.name for p in path.parent.iterdir()) == ["dump.zarr"]  # no half-created store left behind
    assert not list(path.rglob("*.partial"))
    assert_store_holds(open_attention_store(path), r)


def assert_store_holds(st, r: dict[str, np.ndarray]) -> None:
    blocks = list(st.iter_chunks())
    assert np.concatenate([b.sample_ids for b in blocks]).tolist() == r["sample_ids"].tolist()
    for key in ("grid", "n_response", "attention", "hidden_norm"):
        np.testing.assert_array_equal(np.concatenate([getattr(b, key) for b in blocks]), r[key], err_msg=key)
