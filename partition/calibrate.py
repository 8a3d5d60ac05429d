"""A short micro-benchmark of this machine for the cost model (`cost.calibrate: true`).

Measures the matmul rate of the rank's device in the run's dtype, and — with a process
group — the point-to-point α, β (a ping-pong between ranks 0 and 1, one way = half a
round trip) and the all-reduce α, β (time against ring wire bytes), each fitted from a
small and a large message: t(n) = α + n/β. Every crossing goes through `Comm` under the
role `calibration`, outside any step (ledger step None), so no step's ledger sees it.
Takes well under a second on a CPU; the numbers land in result.json
(`predicted.cost_params`, and per rank in `ranks[].calibration`).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from partition.comm import Comm, ring_wire_bytes

SMALL, LARGE = 1024, 4 * 2**20  # message sizes in bytes
REPEATS = 5


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of one (m, k) @ (k, n) product, best of a few (the first warms up)."""
    m, k, n = (256, 512, 512) if device.type == "cpu" else (4096, 4096, 4096)
    a = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(k, n, dtype=dtype, device=device)
    best = float("inf")
    for _ in range(REPEATS + 1):
        _sync(device)
        t0 = time.perf_counter()
        a @ b  # (m, k) @ (k, n) -> (m, n)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * m * k * n / best


def _fit(n1: int, t1: float, n2: int, t2: float) -> tuple[float, float]:
    """α, β from two (bytes, seconds) points of t = α + n/β."""
    beta = (n2 - n1) / max(t2 - t1, 1e-9)
    return max(0.0, t1 - n1 / beta), beta


def _ping_pong(comm: Comm, nbytes: int, dtype: torch.dtype) -> float:
    """One-way seconds of an n-byte message between ranks 0 and 1 (median of REPEATS)."""
    numel = max(1, nbytes // torch.empty((), dtype=dtype).element_size())
    t = torch.zeros(numel, dtype=dtype, device=comm.device)
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        if comm.rank == 0:
            comm.send(t, 1, role="calibration", phase="setup")
            comm.recv(t.shape, dtype, 1, role="calibration", phase="setup")
        else:
            r = comm.recv(t.shape, dtype, 0, role="calibration", phase="setup")
            comm.send(r, 0, role="calibration", phase="setup")
        times.append((time.perf_counter() - t0) / 2)
    return statistics.median(times)


def _all_reduce_s(comm: Comm, nbytes: int, dtype: torch.dtype) -> float:
    numel = max(1, nbytes // torch.empty((), dtype=dtype).element_size())
    t = torch.zeros(numel, dtype=dtype, device=comm.device)
    times = []
    for _ in range(REPEATS):
        _sync(comm.device)
        t0 = time.perf_counter()
        comm.all_reduce(t, role="calibration", phase="setup")
        _sync(comm.device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def calibrate(comm: Comm | None, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """This rank's measurements; every rank of the group must call it (collectives)."""
    out: dict[str, Any] = {"flops_per_s": matmul_rate(device, dtype)}
    if comm is None or comm.world_size < 2:
        return out
    P = comm.world_size
    _all_reduce_s(comm, SMALL, dtype)  # everyone here before the ping-pong starts
    if comm.rank < 2:
        t1, t2 = _ping_pong(comm, SMALL, dtype), _ping_pong(comm, LARGE, dtype)
        out["alpha_s"], out["beta_Bps"] = _fit(SMALL, t1, LARGE, t2)
    c1, c2 = _all_reduce_s(comm, SMALL, dtype), _all_reduce_s(comm, LARGE, dtype)
    w1, w2 = ring_wire_bytes("all_reduce", SMALL, P), ring_wire_bytes("all_reduce", LARGE, P)
    out["collective_alpha_s"], out["collective_beta_Bps"] = _fit(w1, c1, w2, c2)
    return out
