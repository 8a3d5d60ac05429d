"""Weight files: the full, unsharded `W1..WL` (and `b1..bL`), shape (n_l, n_{l-1}).

Reading never unpickles (allow_pickle=False); writing is atomic (temporary file
in the same folder, then rename), so a killed writer leaves the old file or the new.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from typing import IO

import numpy as np
import torch

from partition.config import ConfigError
from partition.data import npz_array, real_dtype
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
    if not zipfile.is_zipfile(path):
        raise ConfigError(key, path, "not an .npz file (np.savez writes one: W1, W2, ...)")
    want = expected_shapes(spec)
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: npz_array(f, k, key, path) for k in f.files}
    except ConfigError:
        raise
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
        real_dtype(a, name, key, path)
        if not np.isfinite(a).all():
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
    full = {k: np.zeros(s, dtype=np.float64) for k, s in shapes.items()}
    # Coverage kept apart from the values: a diverged run's weights may be NaN themselves.
    covered = {k: np.zeros(s, dtype=bool) for k, s in shapes.items()}
    for s in shards:
        r = slice(*s.rows) if s.rows else slice(None)
        if s.values.ndim == 1:
            full[s.name][r] = s.values
            covered[s.name][r] = True
        else:
            c = slice(*s.cols) if s.cols else slice(None)
            full[s.name][r, c] = s.values
            covered[s.name][r, c] = True
    for k, done in covered.items():
        if not done.all():
            raise RuntimeError(f"weights {k}: some elements came back from no rank")
    return {k: a.astype(dtype) for k, a in full.items()}


def _write_npz(fh: IO[bytes], arrays: dict[str, np.ndarray]) -> None:
    """np.savez's format (one .npy per array in a zip), with a fixed date on every entry:
    the same weights always give the same bytes, so two runs can be compared as files."""
    with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as entry:
                np.lib.format.write_array(entry, np.asanyarray(arrays[name]), allow_pickle=False)


def save_weights(path: str, arrays: dict[str, np.ndarray]) -> None:
    atomic_write(path, lambda fh: _write_npz(fh, arrays))
