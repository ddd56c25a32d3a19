"""Contract details mutation testing found unpinned: input fingerprints against hashlib by hand, the type names
errors print, nullable all-null columns, how many repeated values an error lists, provenance metadata written
byte-identically whatever the params' key order, and errors that name the file."""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.io.contracts import (
    METADATA_KEY,
    Column,
    ContractError,
    Schema,
    fingerprint,
    read_metadata,
    read_parquet,
    validate_table,
    write_parquet,
)


def test_fingerprint_of_a_file_and_a_directory(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.bin").write_bytes(b"\x00" * 10 + b"b")
    (tmp_path / "d" / "sub" / "a.txt").write_bytes(b"hello")
    assert fingerprint(tmp_path / "d" / "b.bin") == hashlib.md5(b"\x00" * 10 + b"b").hexdigest()
    want = hashlib.md5()
    for rel, data in [("b.bin", b"\x00" * 10 + b"b"), ("sub/a.txt", b"hello")]:  # sorted relative paths
        want.update(rel.encode())
        want.update(data)
    assert fingerprint(tmp_path / "d") == want.hexdigest()
    (tmp_path / "d" / "sub" / "a.txt").rename(tmp_path / "d" / "sub" / "c.txt")  # same bytes, other name
    assert fingerprint(tmp_path / "d") != want.hexdigest()


SCHEMA = Schema(
    "toy",
    1,
    "parquet",
    (
        Column("sample_id", ("string",), unique=True),
        Column("flag", ("int8",)),
        Column("note", ("string",), nullable=True),
    ),
)


@pytest.mark.parametrize(
    ("values", "type_name"),
    [
        (pa.array([True, False]), "bool"),
        (pa.array([1.0, 2.0], pa.float32()), "float32"),
        (pa.array([1.0, 2.0], pa.float16()), "float16"),
        (pa.array([[1], [2]], pa.large_list(pa.int8())), "list<int8>"),
        (pa.array(["a", "b"], pa.large_string()), "string"),
        (pa.array([1, 2], pa.uint16()), "uint16"),
        (pa.array([b"a", b"b"], pa.binary()), "binary"),
    ],
)
def test_type_errors_name_the_type(values, type_name):
    table = pa.table({"sample_id": ["a", "b"], "flag": values})
    with pytest.raises(ContractError, match=rf"^x\.parquet: column 'flag' has type {type_name}, contract wants int8$"):
        validate_table(table, SCHEMA, "x.parquet")


def test_all_null_columns_of_another_type():
    nulls = pa.nulls(2)  # type "null": what pyarrow infers for a column that is all None
    validate_table(pa.table({"sample_id": ["a", "b"], "flag": pa.array([1, 0], pa.int8()), "note": nulls}), SCHEMA, "x")
    with pytest.raises(ContractError, match="column 'flag' has type null"):
        validate_table(pa.table({"sample_id": ["a", "b"], "flag": nulls}), SCHEMA, "x")


def test_repeated_ids_list_five():
    ids = [f"s{i}" for i in range(7)] * 2
    table = pa.table({"sample_id": ids, "flag": pa.array([0] * 14, pa.int8())})
    with pytest.raises(ContractError, match="must be unique") as err:
        validate_table(table, SCHEMA, "x")
    assert str(err.value).endswith(f"repeated values {[f's{i}' for i in range(5)]}")


def test_metadata_bytes_do_not_depend_on_key_order(tmp_path):
    """The same params in another key order write the same metadata bytes (DVC hashes the file)."""
    from pipeline.teacher.decode import RESPONSE_COLUMNS

    row = {"sample_id": "a", "prompt": "p", "response": "r", "response_token_ids": [1], "finish_reason": "eos"}
    table = pa.Table.from_pylist([{**row, "model_id": "m"}], schema=RESPONSE_COLUMNS)

    def meta_bytes(params, name):
        write_parquet(table, tmp_path / name, "responses", params=params, inputs={"z": "1", "a": "2"})
        return pq.read_schema(tmp_path / name).metadata[METADATA_KEY]

    one = meta_bytes({"b": 1, "a": {"y": 2, "x": 3}}, "one.parquet")
    two = meta_bytes({"a": {"x": 3, "y": 2}, "b": 1}, "two.parquet")
    assert one == two
    assert read_metadata(tmp_path / "one.parquet")["params"] == {"a": {"x": 3, "y": 2}, "b": 1}


def test_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(ContractError, match=rf"^{bad}: not a readable Parquet file"):
        read_metadata(bad)
    with pytest.raises(ContractError, match=rf"^{tmp_path / 'gone.parquet'}: no such file"):
        read_parquet(tmp_path / "gone.parquet", "responses")
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"sample_id": ["a"]}), plain)
    with pytest.raises(ContractError, match=rf"^{plain}: no sdrpn metadata"):
        read_parquet(plain, "responses")
    noversion = tmp_path / "noversion.parquet"
    pq.write_table(
        pa.table({"sample_id": ["a"]}).replace_schema_metadata({METADATA_KEY: b'{"schema": "responses"}'}), noversion
    )
    with pytest.raises(ContractError, match=rf"^{noversion}: responses schema version None but this code reads v"):
        read_parquet(noversion, "responses")
