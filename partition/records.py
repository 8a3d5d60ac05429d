"""A rank's record as plain JSON, for crossing a process boundary without pickle.

The launcher gets each spawned rank's `RankRecord` back as a JSON file, and under
torchrun rank 0 gathers them as JSON bytes (`Comm.gather_objects`): nothing a rank
sends is ever unpickled. The weight shards travel as raw little-endian bytes in
base64, so float64 values come back bit for bit.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from typing import Any

import numpy as np

from partition.results import _jsonable
from partition.train import RankRecord
from partition.weights import Shard

# Only real floating-point shards: np.frombuffer of anything else is refused here.
_SHARD_DTYPES = ("float32", "float64")


def _span(x: Any) -> tuple[int, int] | None:
    return None if x is None else (int(x[0]), int(x[1]))


def shard_to_json(s: Shard) -> dict[str, Any]:
    values = np.ascontiguousarray(s.values)
    if values.dtype.name not in _SHARD_DTYPES:
        raise TypeError(f"shard {s.name}: dtype {values.dtype} is not one of {_SHARD_DTYPES}")
    return {"name": s.name, "rows": s.rows, "cols": s.cols, "dtype": values.dtype.name,
            "shape": list(values.shape),
            "data": base64.b64encode(values.astype(values.dtype.newbyteorder("<"),
                                                   copy=False).tobytes()).decode("ascii")}


def shard_from_json(d: dict[str, Any]) -> Shard:
    if d["dtype"] not in _SHARD_DTYPES:
        raise ValueError(f"shard {d.get('name')}: dtype {d['dtype']!r} is not allowed")
    raw = base64.b64decode(d["data"], validate=True)
    values = np.frombuffer(raw, dtype=np.dtype(d["dtype"]).newbyteorder("<"))
    values = values.reshape(tuple(int(n) for n in d["shape"])).astype(d["dtype"])
    return Shard(str(d["name"]), _span(d["rows"]), _span(d["cols"]), values)


def record_to_json(rec: RankRecord) -> dict[str, Any]:
    """Plain JSON types only (numpy scalars become numbers, tuples lists)."""
    out = {f.name: getattr(rec, f.name) for f in dataclasses.fields(rec)}
    out["shards"] = [shard_to_json(s) for s in rec.shards]
    return json.loads(json.dumps(out, default=_jsonable))


def record_from_json(d: dict[str, Any]) -> RankRecord:
    known = {f.name for f in dataclasses.fields(RankRecord)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"rank record: unknown fields {unknown}")
    return RankRecord(**{**d, "shards": [shard_from_json(s) for s in d.get("shards", [])]})
