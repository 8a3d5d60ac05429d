"""Benchmarks: the explicit engine against PyTorch's own (pipelining, DTensor, DDP), and the
simulator against the measured timeline.

    python -m experiments.bench                      # the engine comparison, P=2, CPU; prints only
    python -m experiments.bench --write              # ... and writes its section of docs/benchmarks.md
    python -m experiments.bench --pairs 20 train.batch_size=1024
    python -m experiments.bench --out /tmp/bench.md --write model.dims=[784,4096,10]
    python -m experiments.bench --suite timeline     # simulated vs measured, the trace's cost
    python -m experiments.bench --suite all --write  # both suites, both sections

--suite engines (the default): for each strategy both engines train the same net: one
measuring run each (bytes per device, peak memory), then timing runs alternating explicit
and torch (A B A B …). Two titled tables: step time, bytes and memory; CPU time. About
20 s with the defaults on two idle cores.

--suite timeline: the seed at B=1024 (cost.calibrate=true) for every strategy and every
named pipeline schedule at P=2: per case --runs runs through the same path as
experiments.run, the simulated step time and idle fraction per rank against the measured
(targets: 15 %, 0.05); the trace's cost, timing runs alternated over no tracer,
trace.steps=[] (off), last and all (target < 2 %); and experiments.predict's wall time at
P=8 (< 3 s) and P=1024 (< 30 s). Every row says whether it meets its target.

A progress line per case, run and pair. Each suite writes its own section of --out and
keeps the others. Trailing arguments are Hydra overrides of the base config
(conf/config.yaml).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from experiments.cli import compose_config, fail

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join("docs", "benchmarks.md")
SUITES = ("engines", "timeline", "all")


def parser() -> argparse.ArgumentParser:
    from partition.bench import MIN_PAIRS
    from partition.bench_timeline import MIN_RUNS

    ap = argparse.ArgumentParser(prog="python -m experiments.bench",
                                 description=__doc__.split("\n\n")[0].strip(),
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=SUITES, default="engines",
                    help="engines: explicit vs torch; timeline: simulated vs measured, the "
                         "trace's cost, predict's speed; all: both (default engines)")
    ap.add_argument("--pairs", type=int, default=10,
                    help=f"timed pairs of alternated runs, at least {MIN_PAIRS}: explicit/torch; "
                         "the timeline suite's rounds of trace settings (default 10)")
    ap.add_argument("--warmup-pairs", type=int, default=1,
                    help="untimed pairs run first, so that every side starts warm (default 1)")
    ap.add_argument("--runs", type=int, default=5,
                    help=f"timeline suite: runs per case, and per experiments.predict case, "
                         f"at least {MIN_RUNS} (default 5)")
    ap.add_argument("--steps", type=int, default=12, help="steps per run (default 12)")
    ap.add_argument("--warmup-steps", type=int, default=2,
                    help="steps left out per run (default 2: DDP rebuilds its buckets in step 1)")
    ap.add_argument("--write", action="store_true",
                    help="write each suite's tables and the machine's description to its "
                         "section of --out, keeping the other sections (default: print only)")
    ap.add_argument("--out", default=DEFAULT_OUT,
                    help=f"the Markdown file --write writes (default {DEFAULT_OUT}, relative to "
                         "the repository)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. train.batch_size=1024")
    return ap


def _base(overrides: list[str], args: argparse.Namespace) -> dict:
    from omegaconf import OmegaConf

    from partition.bench import with_overrides

    cfg = compose_config(["world_size=2", "device=cpu", *overrides])
    base = OmegaConf.to_container(cfg, resolve=True)
    return with_overrides(base, {"train.steps": args.steps, "train.warmup_steps": args.warmup_steps,
                                 "train.grad_check": False})


def engines(args: argparse.Namespace, command: str) -> str:
    from partition.bench import (
        CPU_TITLE,
        DEFAULT_CASES,
        TABLE_TITLE,
        cpu_table,
        markdown,
        run_bench,
        table,
    )
    from partition.config import ConfigError

    base = _base(args.overrides, args)
    cases = list(DEFAULT_CASES)
    print(f"[bench] engines: {len(cases)} cases × ({args.warmup_pairs} warm-up + {args.pairs} "
          f"timed) pairs on {base['world_size']} ranks; starting the ranks", flush=True)
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
    return markdown(rows, info, base, cases, command)


def timeline(args: argparse.Namespace, command: str) -> str:
    from partition import bench_timeline as tl
    from partition.bench import usable_cores
    from partition.config import ConfigError

    base = _base([*tl.DEFAULT_OVERRIDES, *args.overrides], args)
    cases = [tl.fit_net(base, c) for c in tl.TIMELINE_CASES]
    P, cores = int(base["world_size"]), usable_cores()
    print(f"[bench] timeline: {len(cases)} cases × ({args.runs} runs + ({args.warmup_pairs} "
          f"warm-up + {args.pairs}) rounds of {len(tl.TRACE_VARIANTS)} trace settings) on {P} "
          f"ranks, then {len(tl.PREDICT_CASES)} experiments.predict cases × {args.runs} runs; "
          "starting the ranks", flush=True)
    if P > cores:
        print(f"[bench] warning: P={P} ranks on {cores} cores: ranks share cores, measured "
              "times include waiting for one", flush=True)
    try:
        bench, info = tl.run_timeline(base, cases, runs=args.runs, pairs=args.pairs,
                                      warmup_pairs=args.warmup_pairs)
    except ConfigError as e:
        fail(str(e))
    print(f"[bench] done in {info['seconds']:.0f} s", flush=True)
    for title, text in ((tl.STEP_TITLE, tl.step_table(bench.sim, cores=cores)),
                        (tl.IDLE_TITLE, tl.idle_table(bench.sim, cores=cores)),
                        (tl.TRACE_TITLE, tl.trace_table(bench.trace)),
                        (tl.PREDICT_TITLE, tl.predict_table(bench.predict))):
        print(f"\n{title}\n\n{text}", flush=True)
    print(f"\n{tl.summary(bench)}", flush=True)
    return tl.markdown(bench, info, base, cases, command)


def main(argv: list[str] | None = None) -> None:
    from partition.bench import MIN_PAIRS, write_markdown
    from partition.bench_timeline import MIN_RUNS

    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    if args.pairs < MIN_PAIRS:
        fail(f"--pairs={args.pairs}: must be >= {MIN_PAIRS} (a median and range over fewer "
             "alternated pairs mean little on a shared machine)")
    if args.warmup_pairs < 0:
        fail(f"--warmup-pairs={args.warmup_pairs}: must be >= 0")
    if args.runs < MIN_RUNS:
        fail(f"--runs={args.runs}: must be >= {MIN_RUNS} (the targets are on the median over "
             f"at least {MIN_RUNS} runs)")
    if args.suite != "engines" and args.steps - args.warmup_steps < 2:
        fail(f"--steps={args.steps} with --warmup-steps={args.warmup_steps}: the timeline suite "
             "needs at least two steady steps (the trace's cost compares a traced one with an "
             "untraced one)")
    command = ("python -m experiments.bench " + shlex.join(argv)).strip()
    suites = ("engines", "timeline") if args.suite == "all" else (args.suite,)
    sections = {}
    for s in suites:
        sections[s] = engines(args, command) if s == "engines" else timeline(args, command)
    if args.write:
        out = args.out if os.path.isabs(args.out) else os.path.join(ROOT, args.out)
        for name, text in sections.items():
            write_markdown(out, text, section=name)
        print(f"\nwrote {', '.join(sections)} to {os.path.relpath(out)}", flush=True)
    else:
        print(f"\n(printed only; --write writes {args.out})", flush=True)


if __name__ == "__main__":
    main()
