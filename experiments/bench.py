"""The explicit engine against PyTorch's own engines, per strategy (issue 8).

    python -m experiments.bench            # default sizes, P=2, CPU; writes docs/benchmarks.md
    python -m experiments.bench --pairs 20 train.batch_size=1024
    python -m experiments.bench --no-write model.dims=[784,4096,10]

Trailing arguments are Hydra overrides of the base config (conf/config.yaml).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from experiments.cli import compose_config, fail

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv: list[str] | None = None) -> None:
    from omegaconf import OmegaConf

    from partition.bench import (
        DEFAULT_CASES,
        cpu_table,
        markdown,
        run_bench,
        table,
        with_overrides,
        write_markdown,
    )
    from partition.config import ConfigError

    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m experiments.bench",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=10, help="timed explicit/torch pairs (default 10)")
    ap.add_argument("--warmup-pairs", type=int, default=1)
    ap.add_argument("--steps", type=int, default=12, help="steps per run (default 12)")
    ap.add_argument("--warmup-steps", type=int, default=2,
                    help="steps left out per run (default 2: DDP rebuilds its buckets in step 1)")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "benchmarks.md"))
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. train.batch_size=1024")
    args = ap.parse_args(argv)
    if args.pairs < 5:
        fail(f"--pairs={args.pairs}: must be >= 5")

    cfg = compose_config(["world_size=2", "device=cpu", *args.overrides])
    base = OmegaConf.to_container(cfg, resolve=True)
    base = with_overrides(base, {"train.steps": args.steps, "train.warmup_steps": args.warmup_steps,
                                 "train.grad_check": False})
    try:
        rows, info = run_bench(base, list(DEFAULT_CASES), pairs=args.pairs,
                               warmup_pairs=args.warmup_pairs)
    except ConfigError as e:
        fail(str(e))
    for r in rows:
        if r.skip:
            print(f"skipping {r.label}: {r.skip}", flush=True)
    print(table(rows), flush=True)
    print(cpu_table(rows), flush=True)
    if not args.no_write:
        command = "python -m experiments.bench " + shlex.join(argv)
        write_markdown(args.out, markdown(rows, info, base, list(DEFAULT_CASES), command.strip()))
        print(f"-> {args.out}", flush=True)


if __name__ == "__main__":
    main()
