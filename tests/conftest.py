"""Shared test helpers: configs from dotted keys, and P spawned gloo ranks for a function."""

from __future__ import annotations

import os
import socket
import sys
import traceback
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from partition.config import RunConfig, parse_config  # noqa: E402

DEFAULTS: dict[str, Any] = {
    "model": {"dims": [784, 256, 10], "activation": "relu", "loss": "cross_entropy",
              "bias": False, "weight_decay": 0.0, "init": "seeded", "init_path": None},
    "strategy": {"name": "single", "schedule": "gpipe", "balance": None, "layout": "megatron"},
    "data": {"name": "synthetic", "path": None, "shuffle": False, "num_examples": 512,
             "teacher_hidden": 16},
    "train": {"batch_size": 32, "microbatches": 1, "steps": 3, "lr": 0.1, "momentum": 0.0,
              "dtype": "float64", "warmup_steps": 1, "grad_check": False},
    "fault": {"rank": None, "step": None, "kind": None},
    "cost": {},  # the cost model's defaults (conf/config.yaml)
    "world_size": 1, "device": "cpu", "memory_limit": None, "memory_probe": True,
    "engine": "explicit", "timeout_s": 30, "seed": 0,
}


def config_dict(**dotted: Any) -> dict[str, Any]:
    """DEFAULTS with dotted overrides: config_dict(**{"model.dims": [5, 3, 2]}) or strategy="pipeline"."""
    import copy

    d = copy.deepcopy(DEFAULTS)
    for key, value in dotted.items():
        if key == "strategy" and isinstance(value, str):
            d["strategy"]["name"] = value
            continue
        node = d
        parts = key.split(".")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = value
    return d


def make_config(**dotted: Any) -> RunConfig:
    return parse_config(config_dict(**dotted))


def traced_replay_s(res: dict[str, Any]) -> float:
    """A result.json's replay of its traced step (`predicted.sampled_steps[]`): what its
    timeline.png draws under the measured spans, and `simulated_from_result` gives back."""
    step = res["ranks"][0]["timing"]["traced_step"]
    (same,) = [x for x in res["predicted"]["sampled_steps"] if x["step"] == step]
    return same["simulated_s"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, fn: Callable, args: tuple, queue: Any) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    try:
        from datetime import timedelta

        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
        queue.put((rank, True, fn(rank, world, *args)))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn: Callable, world: int, *args: Any, timeout: float = 90) -> list[Any]:
    """Run fn(rank, world, *args) on `world` gloo ranks; return the results by rank.

    A failing rank's traceback becomes the test failure; a hang fails after `timeout`.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, fn, args, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        for _ in range(world):
            rank, ok, value = queue.get(timeout=timeout)
            if not ok:
                pytest.fail(f"rank {rank} failed:\n{value}")
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]
