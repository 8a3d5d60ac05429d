"""Who am I: rank, world size, device and backend, as a validated dataclass.

Passed explicitly to everything that needs it; there is no global process-group
singleton. `init_process_group` / `destroy` are the only other places (besides
comm.py and launch.py) that touch torch.distributed: setting the world up.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Topology:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str  # gloo | nccl | none (one process, no group)

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside [0, {self.world_size})")

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.world_size - 1

    @property
    def prev_rank(self) -> int | None:
        return self.rank - 1 if self.rank > 0 else None

    @property
    def next_rank(self) -> int | None:
        return self.rank + 1 if self.rank < self.world_size - 1 else None


def resolve_device(pref: str, *, local_rank: int, local_world_size: int) -> tuple[torch.device, str]:
    """`auto`: cuda:<local_rank> + NCCL when every local rank has a GPU, else CPU + gloo."""
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()
                          and torch.cuda.device_count() >= local_world_size):
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda but torch.cuda.is_available() is False")
        if torch.cuda.device_count() < local_world_size:
            raise RuntimeError(f"device=cuda needs {local_world_size} GPUs on this node, "
                               f"found {torch.cuda.device_count()}")
        return torch.device(f"cuda:{local_rank}"), "nccl"
    return torch.device("cpu"), "gloo"


def single_process(pref: str) -> Topology:
    device, _ = resolve_device(pref, local_rank=0, local_world_size=1)
    return Topology(0, 1, 0, device, "none")


def from_env(pref: str) -> Topology:
    """The topology of a rank started by torchrun or the elastic launcher."""
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    device, backend = resolve_device(pref, local_rank=local_rank, local_world_size=local_world)
    return Topology(rank, world, local_rank, device, backend)


def intra_op_threads(requested: int | None, device: torch.device | str) -> int | None:
    """The intra-op threads one rank computes with: `threads_per_rank` if given, else 1 on
    CPU, else None (leave torch's default: a GPU rank's matmuls do not run on these threads).

    A device is one rank with the same compute in every case, the single-device baseline
    included: on a CPU machine whose cores the ranks share, two threads for `single` and
    one per rank for the partitioned runs would compare two cores with one.
    """
    if requested is not None:
        return requested
    return 1 if torch.device(device).type == "cpu" else None


@contextlib.contextmanager
def rank_threads(requested: int | None, device: torch.device | str) -> Iterator[int]:
    """Compute with `intra_op_threads(requested, device)` threads inside, then put the
    process's own count back (a single-device run trains in the launching process)."""
    before = torch.get_num_threads()
    n = intra_op_threads(requested, device)
    if n is not None and n != before:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def init_process_group(topo: Topology, *, timeout_s: float) -> None:
    if topo.device.type == "cuda":
        torch.cuda.set_device(topo.device)
    else:
        # Ranks share the cores: one thread each, or they fight and time means nothing
        # (run_rank then applies threads_per_rank, see intra_op_threads).
        torch.set_num_threads(1)
    dist.init_process_group(
        backend=topo.backend, rank=topo.rank, world_size=topo.world_size,
        timeout=timedelta(seconds=timeout_s),
        device_id=topo.device if topo.device.type == "cuda" else None,
    )


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
