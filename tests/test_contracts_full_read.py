"""read_parquet refuses a file that breaks its contract on a full read, not only on a column read
(issue 20, mutant 5): wrong type, missing column, null in a non-nullable column, repeated unique id."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.io.contracts import METADATA_KEY, ContractError, read_parquet, write_parquet
from pipeline.teacher.decode import RESPONSE_COLUMNS


def _responses(ids: list[str]) -> pa.Table:
    row = {"prompt": "p", "response": "r", "response_token_ids": [1, 2], "finish_reason": "eos", "model_id": "m"}
    return pa.Table.from_pylist([{"sample_id": s, **row} for s in ids], schema=RESPONSE_COLUMNS)


def _forge(path, table: pa.Table) -> None:
    """Write ``table`` with a valid ``sdrpn`` header (responses v1), bypassing write_parquet's validation."""
    meta = {"schema": "responses", "version": 1, "params": {}, "inputs": {}}
    pq.write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps(meta)}), path)


def _column(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, values)


GOOD = _responses(["a", "b"])
TYPE = r"column 'response_token_ids' has type list<float64>, contract wants list<int"
UNIQUE = r"column 'sample_id' must be unique; repeated values \['a'\]"
# case: (broken table, the broken column, message of the full read, message of a read of that column alone)
BROKEN = {
    "wrong-type": (_column(GOOD, "response_token_ids", pa.array([[1.0], [2.0]])), "response_token_ids", TYPE, TYPE),
    "missing-column": (
        GOOD.drop_columns(["finish_reason"]),
        "finish_reason",
        r"missing column 'finish_reason' required by responses v1",
        r"missing column\(s\) \['finish_reason'\]",
    ),
    "null": (
        _column(GOOD, "prompt", pa.array(["p", None])),
        "prompt",
        r"column 'prompt' is null for sample\(s\) \['b'\]",
        r"column 'prompt' is null for sample\(s\) \[1\]",  # without sample_id in the read: the row number
    ),
    "repeated-id": (_responses(["a", "a"]), "sample_id", UNIQUE, UNIQUE),
}


def test_a_valid_file_reads_whole_and_by_column(tmp_path):
    path = tmp_path / "ok.parquet"
    write_parquet(GOOD, path, "responses")
    assert read_parquet(path, "responses").equals(GOOD)
    _forge(tmp_path / "forged.parquet", GOOD)  # the forger itself makes a readable file
    assert read_parquet(tmp_path / "forged.parquet", "responses").num_rows == 2


@pytest.mark.parametrize("case", list(BROKEN))
def test_full_read_refuses_a_contract_breach(tmp_path, case):
    table, column, message, column_message = BROKEN[case]
    path = tmp_path / f"{case}.parquet"
    _forge(path, table)
    with pytest.raises(ContractError, match=message) as full:
        read_parquet(path, "responses")
    assert str(path) in str(full.value)  # names the file
    with pytest.raises(ContractError, match=column_message):
        read_parquet(path, "responses", columns=[column])
    # a column read that leaves the broken column out checks only what it reads
    assert read_parquet(path, "responses", columns=["response"]).num_rows == table.num_rows
