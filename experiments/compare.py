"""The headline comparison: partitioning the seed MLP vs a smaller minibatch, measured.

    python -m experiments.compare
    python -m experiments.compare compare.world_sizes=[2] compare.out=/tmp/cmp
    python -m experiments.compare model.dims=[784,4096,10] memory_limit=96MiB
    python -m experiments.compare experiment=schedules   # every pipeline schedule, M = P, 2P, 4P
    python -m experiments.compare compare.optimizer=adam   # Adam's state in the budget

Runs every case of conf/experiment/compare.yaml (each in its own folder under
compare.out, through the same launcher as experiments.run), then writes results.csv,
results.md, summary.png (peak memory, bytes and time per device, one row per case) and
the other figures there, and prints the table and a generated summary. Overrides apply
to every case, before the case's own. A rerun skips the cases already `ok`; delete the
folder (or give compare.out) to measure afresh. Bad input ends before anything runs:
one line, exit status 2.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Any

from experiments.cli import compose_config, fail, split_args, summary_line

EXPERIMENT = "experiment=compare"


@dataclass(frozen=True)
class Case:
    """One run of the comparison: its folder name and the overrides that make it."""

    name: str
    overrides: tuple[str, ...]


def expand_cases(spec: dict[str, Any], batch_size: int, steps: int,
                 is_single: dict[str, bool]) -> list[Case]:
    """The runs of `compare.cases`: partitioned cases once per world size, single-device
    cases once (world_size=1); `batch_divisor: k` means B/k per step for k× the steps,
    so every case sees the same examples; `microbatches_per_rank: [k, ...]` one run per k
    with M = k·P. Pure: `is_single[name]` says which is which."""
    default_ps = [int(p) for p in spec.get("world_sizes") or [2]]
    only = spec.get("only")
    out: list[Case] = []
    for i, case in enumerate(spec.get("cases") or []):
        name = str(case.get("name") or f"case{i}")
        over = [str(o) for o in case.get("overrides") or []]
        k = int(case.get("batch_divisor") or 1)
        if k > 1:
            if batch_size % k:
                raise ValueError(f"compare case {name}: batch_divisor={k} does not divide "
                                 f"train.batch_size={batch_size}")
            over += [f"train.batch_size={batch_size // k}", f"train.steps={steps * k}"]
        if is_single[name]:
            runs = [(name, [*over, "world_size=1"])]
        else:
            ps = [int(p) for p in case.get("world_sizes") or default_ps]
            ps = [p for p in ps if p in default_ps] or ps[:1]  # compare.world_sizes narrows
            per_rank = case.get("microbatches_per_rank")
            runs = [(f"{name}-P{p}", [*over, f"world_size={p}"]) for p in ps] if not per_rank \
                else [(f"{name}-P{p}-M{k * p}", [*over, f"world_size={p}",
                                                 f"train.microbatches={k * p}"])
                      for p in ps for k in per_rank]
        for run_name, run_over in runs:
            if only and run_name not in only and name not in only:
                continue
            out.append(Case(f"{len(out) + 1:02d}-{run_name}", tuple(run_over)))
    return out


def _parse(overrides: list[str]) -> Any:
    from omegaconf import OmegaConf

    from partition.config import parse_config

    cfg = compose_config(overrides)
    return cfg, parse_config(OmegaConf.to_container(cfg, resolve=True))


def plan(overrides: list[str]) -> tuple[str, list[tuple[Case, Any]]]:
    """(output folder, [(case, RunConfig)]): every case composed and validated up front."""
    from omegaconf import OmegaConf

    from partition.config import ConfigError
    from partition.launch import check_dataset

    from experiments.cli import has_override

    base = overrides if has_override(overrides, "experiment") else [EXPERIMENT, *overrides]
    try:
        cfg, rc = _parse(base)
    except ConfigError as e:
        fail(str(e))
    spec = OmegaConf.to_container(cfg.compare, resolve=True)
    optimizer = spec.get("optimizer")
    if optimizer is not None:
        # every case with this optimizer, its state in the same memory budget, apart
        lr = (spec.get("optimizer_lr") or {}).get(optimizer)
        base = [*base, f"train.optimizer={optimizer}", *([f"train.lr={lr}"] if lr else [])]
        try:
            cfg, rc = _parse(base)
        except ConfigError as e:
            fail(f"compare.optimizer={optimizer}: {e}")
        spec["out"] = f"{spec.get('out') or 'outputs/compare'}-{optimizer}"
    singles = {}
    for case in spec.get("cases") or []:
        try:
            _, crc = _parse([*base, *[str(o) for o in case.get("overrides") or []]])
        except ConfigError as e:
            fail(f"compare case {case.get('name')}: {e}")
        singles[str(case.get("name"))] = crc.strategy.name == "single"
    try:
        cases = expand_cases(spec, rc.train.batch_size, rc.train.steps, singles)
    except ValueError as e:
        fail(str(e))
    if not cases:
        fail(f"compare.only={spec.get('only')}: matches no case")
    planned = []
    seen_data: set[tuple] = set()
    for case in cases:
        try:
            _, crc = _parse([*base, *case.overrides])
            key = (crc.data, crc.model, crc.seed)
            if key not in seen_data:
                check_dataset(crc)
                seen_data.add(key)
        except ConfigError as e:
            fail(f"compare case {case.name}: {e}")
        planned.append((case, crc))
    return str(spec.get("out") or "outputs/compare"), planned


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    flags, overrides = split_args(args)
    if any(f in ("-h", "--help") for f in flags):
        print(__doc__)
        return 0
    if flags:
        fail(f"{flags[0]}: not an option of experiments.compare (give key=value overrides)")
    out, planned = plan(overrides)

    from partition.report import build_table, write_report
    from partition.sweep import Progress, run_or_skip, skip_line

    prog = Progress(total=len(planned), started=time.monotonic(), tag="compare", unit="case")
    results = []
    for i, (case, rc) in enumerate(planned):
        run_dir = os.path.join(out, case.name)
        t0 = time.monotonic()
        print(prog.start_line(i + 1, case.name, t0), flush=True)
        result, skipped = run_or_skip(rc, run_dir)
        line = summary_line(result, run_dir)
        print(skip_line(line) if skipped else line, flush=True)
        prog.finish("skipped" if skipped else result["status"], time.monotonic() - t0)
        results.append(result | {"path": os.path.abspath(run_dir)})
    print(prog.end_line(time.monotonic(), out), flush=True)

    df = build_table(results, sort=False)
    rep = write_report(df, out, title="Partitioning the seed MLP vs a smaller minibatch")
    print()
    print(rep.console())
    if _report_kind(overrides) == "schedules":
        from partition.schedule_report import write_schedule_report

        print()
        print(write_schedule_report(results, out))
    return 0


def _report_kind(overrides: list[str]) -> str | None:
    """`compare.report` of the experiment (schedules: the schedule table and figure too)."""
    from experiments.cli import has_override

    base = overrides if has_override(overrides, "experiment") else [EXPERIMENT, *overrides]
    return compose_config(base).compare.get("report")


if __name__ == "__main__":
    sys.exit(main())
