"""The explicit engine against PyTorch's own engines (pipelining, DTensor, DDP), per strategy.

    python -m experiments.bench                      # default sizes, P=2, CPU; prints only
    python -m experiments.bench --write              # ... and writes docs/benchmarks.md
    python -m experiments.bench --pairs 20 train.batch_size=1024
    python -m experiments.bench --out /tmp/bench.md --write model.dims=[784,4096,10]

For each strategy both engines train the same net: one measuring run each (bytes per
device, peak memory), then timing runs alternating explicit and torch (A B A B …). It
prints a progress line per case and per pair, then two titled tables: step time, bytes
and memory; CPU time. About 20 s with the defaults on two idle cores. Trailing
arguments are Hydra overrides of the base config (conf/config.yaml).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from experiments.cli import compose_config, fail

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join("docs", "benchmarks.md")


def parser() -> argparse.ArgumentParser:
    from partition.bench import MIN_PAIRS

    ap = argparse.ArgumentParser(prog="python -m experiments.bench",
                                 description=__doc__.split("\n\n")[0].strip(),
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=10,
                    help=f"timed explicit/torch pairs, at least {MIN_PAIRS} (default 10)")
    ap.add_argument("--warmup-pairs", type=int, default=1,
                    help="untimed pairs run first, so that both engines start warm (default 1)")
    ap.add_argument("--steps", type=int, default=12, help="steps per run (default 12)")
    ap.add_argument("--warmup-steps", type=int, default=2,
                    help="steps left out per run (default 2: DDP rebuilds its buckets in step 1)")
    ap.add_argument("--write", action="store_true",
                    help=f"write the tables and the machine's description to --out "
                         f"(default: print only)")
    ap.add_argument("--out", default=DEFAULT_OUT,
                    help=f"the Markdown file --write writes (default {DEFAULT_OUT}, relative to "
                         "the repository)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. train.batch_size=1024")
    return ap


def main(argv: list[str] | None = None) -> None:
    from omegaconf import OmegaConf

    from partition.bench import (
        CPU_TITLE,
        DEFAULT_CASES,
        MIN_PAIRS,
        TABLE_TITLE,
        cpu_table,
        markdown,
        run_bench,
        table,
        with_overrides,
        write_markdown,
    )
    from partition.config import ConfigError

    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    if args.pairs < MIN_PAIRS:
        fail(f"--pairs={args.pairs}: must be >= {MIN_PAIRS} (a median and range over fewer "
             "alternated pairs mean little on a shared machine)")
    if args.warmup_pairs < 0:
        fail(f"--warmup-pairs={args.warmup_pairs}: must be >= 0")

    cfg = compose_config(["world_size=2", "device=cpu", *args.overrides])
    base = OmegaConf.to_container(cfg, resolve=True)
    base = with_overrides(base, {"train.steps": args.steps, "train.warmup_steps": args.warmup_steps,
                                 "train.grad_check": False})
    cases = list(DEFAULT_CASES)
    print(f"[bench] {len(cases)} cases × ({args.warmup_pairs} warm-up + {args.pairs} timed) "
          f"pairs on {base['world_size']} ranks; starting the ranks", flush=True)
    try:
        rows, info = run_bench(base, cases, pairs=args.pairs, warmup_pairs=args.warmup_pairs)
    except ConfigError as e:
        fail(str(e))
    print(f"[bench] done in {info['seconds']:.0f} s", flush=True)
    for r in rows:
        if r.skip:
            print(f"skipping {r.label}: {r.skip}", flush=True)
    print(f"\n{TABLE_TITLE}\n", flush=True)
    print(table(rows), flush=True)
    print(f"\n{CPU_TITLE}\n", flush=True)
    print(cpu_table(rows), flush=True)
    if args.write:
        out = args.out if os.path.isabs(args.out) else os.path.join(ROOT, args.out)
        command = "python -m experiments.bench " + shlex.join(argv)
        write_markdown(out, markdown(rows, info, base, cases, command.strip()))
        print(f"\nwrote {os.path.relpath(out)}", flush=True)
    else:
        print(f"\n(printed only; --write writes {args.out})", flush=True)


if __name__ == "__main__":
    main()
