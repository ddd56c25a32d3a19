"""Artifact contracts: validated on write and on read, errors name the artifact, field and sample."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.io.contracts import ContractError, read_metadata, read_parquet, write_parquet
from pipeline.teacher.decode import RESPONSE_COLUMNS


def _responses(ids):
    return pa.Table.from_pylist(
        [
            {
                "sample_id": s,
                "prompt": "p",
                "response": "r",
                "response_token_ids": [1, 2],
                "finish_reason": "eos",
                "model_id": "m",
            }
            for s in ids
        ],
        schema=RESPONSE_COLUMNS,
    )


def test_round_trip_records_params_and_inputs(tmp_path):
    path = tmp_path / "r.parquet"
    write_parquet(_responses(["a", "b"]), path, "responses", params={"x": 1}, inputs={"m.parquet": "abc"})
    assert read_parquet(path, "responses").num_rows == 2
    meta = read_metadata(path)
    assert meta == {"schema": "responses", "version": 1, "params": {"x": 1}, "inputs": {"m.parquet": "abc"}}


def test_duplicate_ids_rejected_on_write(tmp_path):
    with pytest.raises(ContractError, match=r"'sample_id' must be unique; repeated values \['a'\]"):
        write_parquet(_responses(["a", "a"]), tmp_path / "r.parquet", "responses")


def test_null_names_the_sample(tmp_path):
    t = _responses(["a", "b"]).set_column(1, "prompt", pa.array(["p", None]))
    with pytest.raises(ContractError, match=r"column 'prompt' is null for sample\(s\) \['b'\]"):
        write_parquet(t, tmp_path / "r.parquet", "responses")


def test_wrong_type_and_missing_column(tmp_path):
    t = _responses(["a"]).drop_columns(["finish_reason"])
    with pytest.raises(ContractError, match="missing column 'finish_reason'"):
        write_parquet(t, tmp_path / "r.parquet", "responses")
    t = _responses(["a"]).set_column(3, "response_token_ids", pa.array([[1.0]]))
    with pytest.raises(ContractError, match="'response_token_ids' has type list<float64>"):
        write_parquet(t, tmp_path / "r.parquet", "responses")


def test_read_checks_kind_and_version(tmp_path):
    path = tmp_path / "r.parquet"
    write_parquet(_responses(["a"]), path, "responses")
    with pytest.raises(ContractError, match="is a 'responses' artifact, expected 'labels'"):
        read_parquet(path, "labels")
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"sdrpn"])
    meta["version"] = 99
    pq.write_table(table.replace_schema_metadata({b"sdrpn": json.dumps(meta)}), path)
    with pytest.raises(ContractError, match="schema version 99"):
        read_parquet(path, "responses")
    pq.write_table(_responses(["a"]), tmp_path / "plain.parquet")
    with pytest.raises(ContractError, match="no sdrpn metadata"):
        read_parquet(tmp_path / "plain.parquet", "responses")
