"""Predict a run without starting it: per rank memory, bytes per step, FLOPs, fit.

    python -m experiments.predict strategy=data world_size=1024 train.batch_size=4096
    python -m experiments.predict strategy=tensor world_size=1024 model.dims=[784,65536,10]
    python -m experiments.predict strategy=pipeline world_size=2 memory_limit=34MiB hydra.run.dir=out/p

Takes the overrides of `experiments.run`. No rank is started: each distinct rank's real
runner runs once on the meta device (the dry run), so the numbers are what the run would
measure. Prints one line per group of identical ranks and writes prediction.json (the
`predicted` block of result.json, plus world_size and the config) into the run folder
(hydra.run.dir, or outputs/predictions/<time>_<strategy>).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f} MiB"


def _bytes(n: int) -> str:
    return f"{n:,} B"


def _ranges(ranks: list[int]) -> str:
    out, start, prev = [], ranks[0], ranks[0]
    for r in ranks[1:] + [None]:  # type: ignore[list-item]
        if r is not None and r == prev + 1:
            prev = r
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if r is not None:
            start = prev = r
    return ",".join(out)


def _groups(pred: dict[str, Any]) -> list[tuple[list[int], dict[str, Any]]]:
    """Ranks whose predictions are identical, in rank order of their first member."""
    seen: dict[str, tuple[list[int], dict[str, Any]]] = {}
    for r in pred["ranks"]:
        key = repr((r["memory"], r["comm"]["by_role"], r["flops"]))
        seen.setdefault(key, ([], r))[0].append(r["rank"])
    return list(seen.values())


def render(pred: dict[str, Any], *, limit: int | None) -> list[str]:
    lines = [f"{'ranks':<14} {'train peak':>14} {'predict peak':>14} {'bytes/step':>16} "
             f"{'GFLOP/step':>11}  by role"]
    for ranks, r in _groups(pred):
        comm = r["comm"]
        moved = comm["sent_bytes"] + comm["collective_bytes"]
        roles = ", ".join(f"{k} {_bytes(v['bytes'])} in {v['messages']}"
                          for k, v in comm["by_role"].items() if k != "metric") or "none"
        if comm.get("by_dim"):  # a hybrid mesh: which links carry what
            roles += "  | by dim: " + ", ".join(f"{d} {_bytes(v['bytes'])}"
                                                for d, v in comm["by_dim"].items())
        peak = r["memory"]["peak_bytes"]
        fit = "" if limit is None else ("  fits" if peak <= limit else "  OVER the limit")
        who = _ranges(ranks) + (f" (x{len(ranks)})" if len(ranks) > 1 else "")
        lines.append(f"{who:<14} {_mib(peak):>14} {_mib(r['memory']['predict_peak_bytes']):>14} "
                     f"{_bytes(moved):>16} {r['flops'] / 1e9:>11.3f}  {roles}{fit}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__.strip())
        return 0
    from experiments.cli import fail, load_run_config

    t0 = time.perf_counter()
    run_dir = next((a.split("=", 1)[1] for a in args if a.startswith("hydra.run.dir=")), None)
    cfg = load_run_config(args)
    from partition import costs
    from partition.calibrate import resolve_balance

    asked = cfg.strategy.balance
    cfg = resolve_balance(cfg)
    if asked == "time":
        print(f"strategy.balance=time: the split with the shortest simulated step is "
              f"{list(cfg.strategy.balance)} layers per stage")
    from partition.results import write_json

    from partition.calibrate import local_action_times, profile_times

    if cfg.cost.profile:
        try:
            times = profile_times(cfg.cost.profile, cfg)
        except (OSError, ValueError, KeyError) as e:
            fail(f"cost.profile={cfg.cost.profile}: {e}")
        source = f"the action times in {cfg.cost.profile}"
    else:
        times = local_action_times(cfg)
        source = "actions timed in this process" if times else None
    pred = costs.predict(cfg, times=times)
    out = {**pred, "world_size": cfg.world_size, "config": cfg.to_dict()}
    limit = cfg.memory_limit
    print(f"{cfg.strategy.name} P={cfg.ranks} B={cfg.train.batch_size} "
          f"M={cfg.train.microbatches} dims={list(cfg.model.dims)} {cfg.train.dtype}"
          + (" (bf16 compute)" if cfg.train.precision == "bf16" else "")
          + (" recompute=full" if cfg.train.recompute == "full" else "")
          + (f" {cfg.train.optimizer}" if cfg.train.optimizer != "sgd" else "")
          + (f", memory_limit {_mib(limit)}" if limit is not None else "")
          + " — predicted by a dry run of the real runners, no rank started")
    for line in render(pred, limit=limit):
        print(line)
    over = [r["rank"] for r in pred["ranks"]
            if limit is not None and r["memory"]["peak_bytes"] > limit]
    if limit is not None:
        print(f"{len(over)} of {cfg.ranks} ranks over memory_limit" if over
              else f"every rank fits memory_limit={limit:,} bytes")
    if pred["step_time_s"] is not None:
        c = pred["idle_causes"]
        print(f"simulated step {pred['step_time_s'] * 1e3:.2f} ms, idle fraction "
              f"{pred['idle_fraction']:.3f} (schedule {c['schedule']:.3f}, imbalance "
              f"{c['imbalance']:.3f}, communication {c['communication']:.3f}); from {source}")
    elif pred.get("not_simulated"):  # the times are there; the simulator says why not
        print(f"simulated step: not predicted ({pred['not_simulated']})")
    else:
        print("simulated step: not predicted (the weights are too large to time the actions "
              "here; give cost.profile=<a result.json of the same config>)")
    folder = run_dir or os.path.join(
        "outputs", "predictions", time.strftime("%Y-%m-%d_%H-%M-%S") + f"_{cfg.strategy.name}")
    try:
        os.makedirs(folder, exist_ok=True)
        write_json(os.path.join(folder, "prediction.json"), out)
    except OSError as e:
        fail(f"hydra.run.dir={folder}: cannot write prediction.json ({e.strerror})")
    print(f"wrote {os.path.join(folder, 'prediction.json')} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
