"""Weight files: the full, unsharded `W1..WL` (and `b1..bL`), shape (n_l, n_{l-1}).

Reading never unpickles (allow_pickle=False); writing is atomic (temporary file
in the same folder, then rename), so a killed writer leaves the old file or the new.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from partition.config import ConfigError
from partition.model import Layer, MLPSpec, init_weights, weight_names
from partition.results import atomic_write


@dataclass(frozen=True)
class Shard:
    """A piece of one full tensor: `name` (W3, b1, …), where it sits, and its values."""

    name: str
    rows: tuple[int, int] | None
    cols: tuple[int, int] | None
    values: np.ndarray


def expected_shapes(spec: MLPSpec) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for l in range(spec.num_layers):
        wname, bname = weight_names(l)
        shapes[wname] = spec.weight_shape(l)
        if spec.bias:
            shapes[bname] = (spec.dims[l + 1],)
    return shapes


def load_init(path: str, spec: MLPSpec) -> dict[str, torch.Tensor]:
    key = "model.init_path"
    if not os.path.isfile(path):
        raise ConfigError(key, path, "no such file")
    want = expected_shapes(spec)
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:
        raise ConfigError(key, path, f"not a readable .npz file ({type(e).__name__}: {e})") from None
    missing = sorted(set(want) - set(arrays))
    extra = sorted(set(arrays) - set(want))
    if missing or extra:
        raise ConfigError(key, path, f"names {sorted(arrays)} do not match the model's {sorted(want)}")
    out: dict[str, torch.Tensor] = {}
    for name, shape in want.items():
        a = arrays[name]
        if a.shape != shape:
            raise ConfigError(key, path, f"{name} has shape {a.shape}, expected {shape}")
        if not np.issubdtype(a.dtype, np.number) or not np.isfinite(a).all():
            raise ConfigError(key, path, f"{name} holds NaN, infinite or non-numeric values")
        out[name] = torch.from_numpy(a.astype(np.float64))
    return out


def initial_weights(spec: MLPSpec, *, init: str, init_path: str | None, seed: int) -> dict[str, torch.Tensor]:
    """The full float64 starting weights every rank slices its part from."""
    if init == "file":
        assert init_path is not None
        return load_init(init_path, spec)
    return init_weights(spec, seed)


def layer_shards(layers: list[Layer]) -> list[Shard]:
    shards = []
    for l in layers:
        wname, bname = weight_names(l.index)
        shards.append(Shard(wname, l.rows, l.cols, l.W.detach().cpu().double().numpy().copy()))
        if l.b is not None and l.bias_owner:
            shards.append(Shard(bname, l.rows, None, l.b.detach().cpu().double().numpy().copy()))
    return shards


def assemble(spec: MLPSpec, shards: list[Shard], dtype: np.dtype) -> dict[str, np.ndarray]:
    """Put shards from all ranks back into full tensors; every element must be covered."""
    shapes = expected_shapes(spec)
    full = {k: np.full(s, np.nan, dtype=np.float64) for k, s in shapes.items()}
    for s in shards:
        r = slice(*s.rows) if s.rows else slice(None)
        if s.values.ndim == 1:
            full[s.name][r] = s.values
        else:
            c = slice(*s.cols) if s.cols else slice(None)
            full[s.name][r, c] = s.values
    for k, a in full.items():
        if np.isnan(a).any():
            raise RuntimeError(f"weights {k}: some elements came back from no rank")
    return {k: a.astype(dtype) for k, a in full.items()}


def save_weights(path: str, arrays: dict[str, np.ndarray]) -> None:
    atomic_write(path, lambda fh: np.savez(fh, **arrays))
