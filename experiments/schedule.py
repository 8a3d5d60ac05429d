"""Print a pipeline schedule's per-rank action grid, and write it as a CSV to edit.

    python -m experiments.schedule strategy.schedule=1f1b world_size=4 train.microbatches=8
    python -m experiments.schedule strategy.schedule=zbv world_size=2 train.microbatches=4
    python -m experiments.schedule strategy.schedule=interleaved_1f1b strategy.virtual_stages=3 world_size=2 train.microbatches=4
    python -m experiments.schedule world_size=2 train.microbatches=3 --csv my.csv
    python -m experiments.run strategy=pipeline world_size=2 train.microbatches=3 strategy.schedule=my.csv

The overrides are those of `experiments.run`; only the schedule, strategy.virtual_stages,
world_size and train.microbatches matter here (the net's depth is checked when the schedule runs). Ranks are
rows and time slots columns, each action one slot with free communication, `.` where a
rank idles; the CSV is PyTorch's compute-only format (one row per rank, cells such as
0F1, 1B0, 2I3, 2W3), which `strategy.schedule=FILE.csv` runs.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.schedule", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--csv", metavar="FILE", help="also write the schedule to FILE (CSV)")
    args, overrides = ap.parse_known_args(argv)
    from experiments.cli import compose_config, fail, has_override, to_plain
    from partition.config import ConfigError, _int, _schedule, _virtual
    from partition.plans.schedule import ScheduleError, format_grid, load_schedule

    if not has_override(overrides, "strategy"):
        overrides = ["strategy=pipeline", *overrides]
    plain = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
    d = to_plain(compose_config(plain), plain)
    try:
        name = _schedule(d["strategy"].get("schedule", "gpipe"))
        world = _int("world_size", d.get("world_size"), min_value=1)
        micro = _int("train.microbatches", d["train"].get("microbatches"), min_value=1)
        virtual = _virtual(name, d["strategy"].get("virtual_stages"), resolve=True)
        sched = load_schedule(name, world=world, micro=micro, virtual=virtual)
    except ConfigError as e:
        fail(str(e))
    except ScheduleError as e:
        fail(f"strategy.schedule={name}: {e}")
    print(format_grid(sched))
    if args.csv:
        try:
            with open(args.csv, "w", encoding="utf-8") as f:
                f.write(sched.to_csv())
        except OSError as e:
            fail(f"--csv {args.csv}: {e.strerror}")
        print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
