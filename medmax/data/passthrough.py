"""Passthrough columns: the input columns sequence building does not read, copied into its shards.

Which columns: by default every column a row has except the ones the builder consumes
(:data:`medmax.data.rows.CONSUMED_COLUMNS`); ``keep`` is an allow-list (it may name consumed columns,
e.g. ``image_path``), ``drop`` a deny-list. The output's own columns (:data:`RESERVED`) cannot pass
through: an input column with one of those names must be dropped or renamed.

Types, decided from the values (so JSONL and parquet inputs agree):

- strings -> ``string``, booleans -> ``bool``, integers -> ``int64``, floats (or integers mixed with
  floats) -> ``double``, bytes -> ``binary``, and lists of one of those (nested too) -> ``list<...>``;
- anything else -- an object, a column or list mixing kinds, an integer beyond int64, a date -- becomes
  JSON text: a ``string`` column with field metadata ``{"encoding": "json"}`` holding ``json.dumps`` of
  each value (strings quoted, non-ASCII as ``\\u`` escapes so that even a lone surrogate survives,
  bytes inside objects as base64, other non-JSON values as ``str()``).

A column whose kind changes within a build (``1`` in one row, ``"a1"`` in another) is JSON for every
row of that build; a column first seen late is null in the rows before. Every shard of a build has the
same schema (:func:`merge_types` decides, ``medmax.data.shards.conform_shard`` rewrites older shards).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass

import pyarrow as pa

from .rows import CONSUMED_COLUMNS, BuildConfigError

RESERVED = ("input_ids", "labels", "length", "format")  # the output's own columns
JSON = "json"  # the type of a column stored as JSON text
JSON_METADATA = {b"encoding": b"json"}
_PLAIN = (pa.string(), pa.bool_(), pa.int64(), pa.float64(), pa.binary(), pa.null())


@dataclass(frozen=True)
class ColumnFilter:
    """Which input columns pass through: ``keep`` (allow-list; None: all unconsumed) or ``drop`` (deny-list)."""

    keep: tuple[str, ...] | None = None
    drop: tuple[str, ...] = ()
    consumed: tuple[str, ...] = CONSUMED_COLUMNS  # what the builder reads (a preference build reads others)
    reserved: tuple[str, ...] = RESERVED  # the output's own columns

    def __post_init__(self):
        if self.keep is not None and self.drop:
            raise BuildConfigError("--keep and --drop: give one of them (--keep lists the columns to pass, --drop the ones to leave out)")
        clash = [c for c in (self.keep or ()) if c in self.reserved]
        if clash:
            raise BuildConfigError(f"--keep {clash[0]!r}: the output has its own column of that name ({', '.join(self.reserved)})")

    def select(self, row: dict) -> list[str]:
        """The passthrough columns of one row, in order."""
        if self.keep is not None:
            return list(self.keep)
        names = [k for k in row if k not in self.consumed and k not in self.drop]
        clash = next((k for k in names if k in self.reserved), None)
        if clash is not None:
            raise BuildConfigError(f"input column {clash!r} has the name of an output column; pass --drop {clash} (or rename it)")
        return names


def _kind(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "str"
    if isinstance(value, (bytes, bytearray)):
        return "bytes"
    return "list" if isinstance(value, (list, tuple)) else "other"


def _leaf_kinds(values, out: set) -> set:
    for value in values:
        if value is None:
            continue
        kind = _kind(value)
        if kind == "list":
            _leaf_kinds(value, out)
        else:
            out.add(kind)
    return out


def infer_type(values: list):
    """The column type of a list of Python values: a plain arrow type, ``pa.null()`` or :data:`JSON`."""
    present = [v for v in values if v is not None]
    if not present:
        return pa.null()
    kinds = {_kind(v) for v in present}
    leaves = _leaf_kinds(present, set()) if kinds == {"list"} else kinds
    if len(kinds) > 1 or len(leaves) > 1 or "other" in leaves:
        return JSON
    try:
        inferred = pa.array(present).type
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError, ValueError):
        return JSON  # uneven nesting, integers beyond int64, strings with lone surrogates
    return inferred if _plain(inferred) else JSON


def _plain(t: pa.DataType) -> bool:
    if pa.types.is_list(t):
        return _plain(t.value_type)
    return t in _PLAIN


def merge_types(a, b):
    """The narrowest type holding values of both ``a`` and ``b`` (int64 + double -> double; else JSON)."""
    if a == b:
        return a
    if JSON in (a, b):
        return JSON
    if pa.types.is_null(a):
        return b
    if pa.types.is_null(b):
        return a
    if {a, b} == {pa.int64(), pa.float64()}:
        return pa.float64()
    if pa.types.is_list(a) and pa.types.is_list(b):
        inner = merge_types(a.value_type, b.value_type)
        return JSON if inner == JSON else pa.list_(inner)
    return JSON


def field(name: str, t) -> pa.Field:
    """The schema field of a passthrough column."""
    return pa.field(name, pa.string(), metadata=JSON_METADATA) if t == JSON else pa.field(name, t)


def field_type(f: pa.Field):
    """The passthrough type a schema field stores (:data:`JSON` for JSON text)."""
    return JSON if (f.metadata or {}).get(b"encoding") == b"json" else f.type


def type_name(t) -> str:
    """A passthrough type as the manifest names it: ``string``, ``int64``, ``list<string>``, ``json``..."""
    if t == JSON:
        return JSON
    return f"list<{type_name(t.value_type)}>" if pa.types.is_list(t) else str(t)


def _json_default(value):
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode("ascii")
    return str(value)


def to_json(value) -> str | None:
    return None if value is None else json.dumps(value, default=_json_default)


def to_array(values: list, t) -> pa.Array:
    """Python values -> an arrow array of passthrough type ``t``."""
    if t == JSON:
        return pa.array([to_json(v) for v in values], type=pa.string())
    return pa.array(values, type=t)


def convert(column: pa.ChunkedArray | None, was, to, n: int) -> pa.ChunkedArray | pa.Array:
    """A stored column of type ``was`` (None: absent) as type ``to`` (which :func:`merge_types` allows)."""
    if column is None:
        return pa.nulls(n, type=pa.string() if to == JSON else to)
    if was == to:
        return column
    if to == JSON:
        return to_array(column.to_pylist(), JSON)
    return column.cast(to)
