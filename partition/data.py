"""Datasets: a seeded synthetic task, user `.npz` files, and scikit-learn's digits.

Every rank builds the same dataset from the same seed (or file) and slices the
batch it needs itself, so no example ever crosses a device boundary.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass

import numpy as np
import torch

from partition.config import ConfigError, DataConfig
from partition.model import MLPSpec


@dataclass(frozen=True)
class Dataset:
    """X: (N, d) float64; y: (N,) int64 class indices, or (N, q) float64 targets."""

    X: torch.Tensor
    y: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.X.shape[0])

    def rows(self, step: int, batch_size: int, *, shuffle: bool, seed: int) -> torch.Tensor:
        """Row indices of step `step`: rows t·B … t·B+B−1, wrapping; shuffled per epoch if asked."""
        pos = torch.arange(step * batch_size, (step + 1) * batch_size, dtype=torch.int64)
        n = self.size
        if not shuffle:
            return pos % n
        epochs = pos // n
        out = torch.empty_like(pos)
        for e in torch.unique(epochs).tolist():
            # One permutation per epoch, from (seed, epoch): every rank draws the same one.
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + e))
            sel = epochs == e
            out[sel] = perm[pos[sel] % n]
        return out

    def batch(
        self, step: int, batch_size: int, *, shuffle: bool, seed: int, dtype: torch.dtype,
        device: torch.device | str = "cpu", y_dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """X in `dtype`; y as class indices, or targets in `y_dtype` (default `dtype`: mixed
        precision reads X in bfloat16 and compares with float32 targets)."""
        idx = self.rows(step, batch_size, shuffle=shuffle, seed=seed)
        x = self.X[idx].to(device=device, dtype=dtype)
        return x, self.targets(idx, device=device, dtype=y_dtype or dtype)

    def targets(self, idx: torch.Tensor, *, device: torch.device | str,
                dtype: torch.dtype) -> torch.Tensor:
        y = self.y[idx]
        return y.to(device=device) if y.dtype == torch.int64 else y.to(device=device, dtype=dtype)


def synthetic(spec: MLPSpec, *, num_examples: int, teacher_hidden: int, seed: int) -> Dataset:
    """Inputs N(0, 1); targets from a seeded random teacher net, so the task is learnable."""
    gen = torch.Generator().manual_seed(10_000 + int(seed))
    d, q = spec.dims[0], spec.dims[-1]
    X = torch.randn(num_examples, d, generator=gen, dtype=torch.float64)
    A = torch.randn(teacher_hidden, d, generator=gen, dtype=torch.float64) / d**0.5
    C = torch.randn(q, teacher_hidden, generator=gen, dtype=torch.float64) / teacher_hidden**0.5
    # (N, d) @ (d, t) -> (N, t); (N, t) @ (t, q) -> (N, q)
    out = torch.tanh(X @ A.T) @ C.T
    if spec.loss == "cross_entropy":
        return Dataset(X, out.argmax(dim=1))
    return Dataset(X, out)


# Integers and reals only. np.issubdtype(…, np.number) also lets complex numbers through
# (cast to float64 with a warning, the imaginary part dropped) and timedelta64 counts as
# an integer; booleans, strings, dates and objects are not numbers to train on.
_REAL_KINDS = "iuf"
_INTEGER_KINDS = "iu"


def npz_array(f: np.lib.npyio.NpzFile, name: str, key: str, path: str) -> np.ndarray:
    """Member `name` of an open .npz as an array. np.load hands back the raw bytes of a
    member that is not a .npy file (a zip with a file named "X"): that is refused."""
    a = f[name]
    if not isinstance(a, np.ndarray):
        raise ConfigError(key, path, f"member {name} is not a .npy array (np.savez writes "
                                     f"{name}.npy)")
    return a


def real_dtype(a: np.ndarray, name: str, key: str, path: str) -> None:
    if a.dtype.kind not in _REAL_KINDS:
        raise ConfigError(key, path, f"{name} has dtype {a.dtype}, expected real numbers "
                                     f"(integer or floating point)")


def load_npz(path: str, spec: MLPSpec) -> Dataset:
    """Read and check a user's `.npz` (`X` (N, d), `y`) without ever unpickling it."""
    key = "data.path"
    if not os.path.isfile(path):
        raise ConfigError(key, path, "no such file")
    if not zipfile.is_zipfile(path):
        raise ConfigError(key, path, "not an .npz file (np.savez writes one: X, y)")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("X", "y") if k not in f.files]
            if missing:
                has = ", ".join(f.files) or "none"
                raise ConfigError(key, path, f"missing array(s) {', '.join(missing)} (has {has})")
            X, y = npz_array(f, "X", key, path), npz_array(f, "y", key, path)
    except ConfigError:
        raise
    except Exception as e:  # a corrupt zip, an object array, …
        raise ConfigError(key, path, f"not a readable .npz file ({type(e).__name__}: {e})") from None
    d, q = spec.dims[0], spec.dims[-1]
    real_dtype(X, "X", key, path)
    if X.ndim != 2 or X.shape[1] != d:
        raise ConfigError(key, path, f"X has shape {X.shape}, expected (N, {d}) for model.dims[0]={d}")
    if X.shape[0] == 0:
        raise ConfigError(key, path, "X has no rows")
    if not np.isfinite(X).all():
        raise ConfigError(key, path, "X holds NaN or infinite values")
    N = X.shape[0]
    if spec.loss == "cross_entropy":
        if y.shape != (N,) or y.dtype.kind not in _INTEGER_KINDS:
            raise ConfigError(key, path, f"y has shape {y.shape} and dtype {y.dtype}, expected ({N},) class indices")
        if y.size and (y.min() < 0 or y.max() >= q):
            raise ConfigError(key, path, f"y holds labels outside [0, {q}) (min {y.min()}, max {y.max()})")
        yt = torch.from_numpy(y.astype(np.int64))
    else:
        if y.shape != (N, q):
            raise ConfigError(key, path, f"y has shape {y.shape}, expected ({N}, {q}) targets for squared_error")
        real_dtype(y, "y", key, path)
        if not np.isfinite(y).all():
            raise ConfigError(key, path, "y holds NaN, infinite or non-numeric values")
        yt = torch.from_numpy(y.astype(np.float64))
    return Dataset(torch.from_numpy(X.astype(np.float64)), yt)


def digits(spec: MLPSpec) -> Dataset:
    """scikit-learn's bundled 8×8 handwritten digits (1797 examples, no download)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ConfigError("data", "digits", "needs scikit-learn: pip install -e '.[digits]'") from None
    if spec.dims[0] != 64 or spec.dims[-1] != 10 or spec.loss != "cross_entropy":
        raise ConfigError("model.dims", list(spec.dims),
                          "data=digits needs model.dims=[64,...,10] and model.loss=cross_entropy")
    X, y = load_digits(return_X_y=True)
    X = (X - X.mean(0)) / (X.std(0) + 1e-8)  # standardise; constant pixels stay 0
    return Dataset(torch.from_numpy(X.astype(np.float64)), torch.from_numpy(y.astype(np.int64)))


def load_dataset(cfg: DataConfig, spec: MLPSpec, *, seed: int) -> Dataset:
    if cfg.name == "synthetic":
        return synthetic(spec, num_examples=cfg.num_examples, teacher_hidden=cfg.teacher_hidden, seed=seed)
    if cfg.name == "npz":
        assert cfg.path is not None
        return load_npz(cfg.path, spec)
    if cfg.name == "digits":
        return digits(spec)
    raise ConfigError("data", cfg.name, "unknown dataset")
