"""Artifact contracts: versioned schemas from ``schemas/``, checked on write and on read.

Every Parquet artifact carries one key-value metadata entry, ``sdrpn``, holding JSON with the
schema name and version, the parameters that made it and the fingerprints of its inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.io.locks import atomic_path

METADATA_KEY = b"sdrpn"


class ContractError(ValueError):
    """An artifact does not match its schema; the message names the artifact and the field."""


@dataclass(frozen=True)
class Column:
    name: str
    types: tuple[str, ...]
    nullable: bool = False
    unique: bool = False
    doc: str = ""


@dataclass(frozen=True)
class Schema:
    name: str
    version: int
    format: str
    columns: tuple[Column, ...]
    attrs: dict[str, Any] = field(default_factory=dict)
    doc: str = ""

    def column(self, name: str) -> Column:
        for col in self.columns:
            if col.name == name:
                return col
        raise KeyError(name)


def _schemas_dir() -> Path:
    # schemas/ lives at the repository root; fall back to the installed copy next to the package.
    here = Path(__file__).resolve().parents[2] / "schemas"
    if here.is_dir():
        return here
    return Path(str(resources.files("pipeline") / "_schemas"))


@cache
def load_schema(name: str) -> Schema:
    """Load the newest version of the named contract from ``schemas/<name>.v<N>.json``."""
    candidates = sorted(_schemas_dir().glob(f"{name}.v*.json"), key=lambda p: int(p.stem.split(".v")[-1]))
    if not candidates:
        raise ContractError(f"no schema named {name!r} in {_schemas_dir()}")
    raw = json.loads(candidates[-1].read_text())
    columns = tuple(
        Column(
            name=c["name"],
            types=tuple(c["type"].split("|")),
            nullable=c.get("nullable", False),
            unique=c.get("unique", False),
            doc=c.get("doc", ""),
        )
        for c in raw.get("columns", [])
    )
    return Schema(
        name=raw["name"],
        version=int(raw["version"]),
        format=raw["format"],
        columns=columns,
        attrs=raw.get("attrs", {}),
        doc=raw.get("doc", ""),
    )


def _type_name(t: pa.DataType) -> str:
    if pa.types.is_fixed_size_list(t):
        return f"fixed_size_list<{_type_name(t.value_type)}>"
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_list_view(t):
        return f"list<{_type_name(t.value_type)}>"
    if pa.types.is_large_string(t) or pa.types.is_string(t) or pa.types.is_string_view(t):
        return "string"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_floating(t):
        return {16: "float16", 32: "float32", 64: "float64"}[t.bit_width]
    if pa.types.is_integer(t):
        return str(t)  # int8, int16, int32, int64, uint8, ...
    return str(t)


def validate_table(table: pa.Table, schema: Schema, artifact: str) -> None:
    """Raise :class:`ContractError` naming the artifact and field if ``table`` breaks ``schema``."""
    names = set(table.column_names)
    for col in schema.columns:
        if col.name not in names:
            if col.nullable:
                continue
            raise ContractError(f"{artifact}: missing column {col.name!r} required by {schema.name} v{schema.version}")
        arr = table.column(col.name)
        got = _type_name(arr.type)
        if got not in col.types and not (arr.null_count == len(arr) and col.nullable):
            raise ContractError(f"{artifact}: column {col.name!r} has type {got}, contract wants {'|'.join(col.types)}")
        if not col.nullable and arr.null_count:
            ids = _ids_where(table, pc.is_null(arr))
            raise ContractError(f"{artifact}: column {col.name!r} is null for sample(s) {ids}")
        if col.unique and len(arr) and pc.count_distinct(arr).as_py() != len(arr):
            counts = pc.value_counts(arr)
            dup = [v["values"] for v in counts.to_pylist() if v["counts"] > 1][:5]
            raise ContractError(f"{artifact}: column {col.name!r} must be unique; repeated values {dup}")


def _ids_where(table: pa.Table, mask: pa.ChunkedArray) -> list:
    if "sample_id" in table.column_names:
        return table.filter(mask).column("sample_id").to_pylist()[:5]
    return [i for i, m in enumerate(mask.to_pylist()) if m][:5]


def _unreadable(path: str | os.PathLike, exc: Exception) -> ContractError:
    """The error for a Parquet file pyarrow cannot read: pyarrow's own message does not say which file."""
    if isinstance(exc, FileNotFoundError) or not Path(path).exists():
        return ContractError(f"{path}: no such file")
    return ContractError(f"{path}: not a readable Parquet file ({exc})")


def _read_schema(path: str | os.PathLike) -> pa.Schema:
    try:
        return pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        raise _unreadable(path, exc) from exc


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Return the ``sdrpn`` metadata (schema, version, params, inputs) of a Parquet artifact."""
    return _sdrpn_metadata(path, _read_schema(path))


def _sdrpn_metadata(path: str | os.PathLike, file_schema: pa.Schema) -> dict[str, Any]:
    meta = file_schema.metadata or {}
    if METADATA_KEY not in meta:
        raise ContractError(f"{path}: no sdrpn metadata; not written by this pipeline")
    try:
        return json.loads(meta[METADATA_KEY])
    except ValueError as exc:
        raise ContractError(f"{path}: sdrpn metadata is not JSON ({exc})") from exc


def write_parquet(
    table: pa.Table,
    path: str | os.PathLike,
    schema_name: str,
    params: dict[str, Any] | None = None,
    inputs: dict[str, str] | None = None,
) -> None:
    """Validate ``table`` against the contract, attach provenance and write it atomically.

    Holds the output's lock meanwhile (:mod:`pipeline.io.locks`): raises ``OutputLocked`` if another process
    is writing ``path``.
    """
    schema = load_schema(schema_name)
    validate_table(table, schema, str(path))
    meta = {
        "schema": schema.name,
        "version": schema.version,
        "params": params or {},
        "inputs": inputs or {},
    }
    table = table.replace_schema_metadata(
        {**(table.schema.metadata or {}), METADATA_KEY: json.dumps(meta, sort_keys=True)}
    )
    # a unique temp name under the output's lock: two writers never share a temp, and readers see the old
    # artifact or the new one, whole
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def read_parquet(path: str | os.PathLike, schema_name: str, columns: list[str] | None = None) -> pa.Table:
    """Read a Parquet artifact, checking its recorded schema name/version and its columns."""
    schema = load_schema(schema_name)
    file_schema = _read_schema(path)
    meta = _sdrpn_metadata(path, file_schema)
    if meta.get("schema") != schema.name:
        raise ContractError(f"{path}: is a {meta.get('schema')!r} artifact, expected {schema.name!r}")
    if int(meta.get("version", -1)) != schema.version:
        raise ContractError(
            f"{path}: {schema.name} schema version {meta.get('version')} but this code reads v{schema.version}; "
            "rerun the stage that makes it"
        )
    absent = [c for c in columns or () if c not in file_schema.names]
    if absent:
        raise ContractError(f"{path}: missing column(s) {absent} ({schema.name} v{schema.version})")
    try:
        table = pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as exc:  # a footer that reads but damaged pages, or a file gone since
        raise _unreadable(path, exc) from exc
    if columns is None:
        validate_table(table, schema, str(path))
    else:
        sub = Schema(schema.name, schema.version, schema.format, tuple(c for c in schema.columns if c.name in columns))
        validate_table(table, sub, str(path))
    return table


def fingerprint(path: str | os.PathLike) -> str:
    """md5 of a file's bytes, or of a directory's (relative path, bytes) pairs in sorted order."""
    path = Path(path)
    h = hashlib.md5()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()
