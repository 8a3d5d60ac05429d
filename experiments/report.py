"""Tables and plots from result.json files (one run folder, a sweep, or several).

    python -m experiments.report outputs/sweeps/<sweep>
    python -m experiments.report outputs/compare --out /tmp/report --no-plots

Writes results.csv, results.md and the figures (summary.png, memory_per_rank.png,
loss.png, memory_vs_batch.png / bytes_vs_width.png when the runs vary B or the width, and
timelines.png: each pipeline run's step, measured above simulated) into --out (default:
the one folder given, or the folder the given ones have in common) and prints the table
(120 columns) and the generated summary.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", help="run or sweep folders (searched for result.json)")
    ap.add_argument("--out", help="where to write results.csv/.md and the plots")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    args = ap.parse_args(argv)

    from partition.report import load_table, write_report

    absent = [f for f in args.folders if not os.path.exists(f)]
    if absent:
        print(f"error: {absent[0]}: no such file or folder", file=sys.stderr)
        return 2
    df = load_table(args.folders)
    if not len(df):
        print(f"error: no result.json under {' '.join(args.folders)}", file=sys.stderr)
        return 2
    out = args.out or _default_out(args.folders)
    rep = write_report(df, out, plots=not args.no_plots)
    print(rep.console())
    return 0


def _default_out(folders: list[str]) -> str:
    dirs = [f if os.path.isdir(f) else os.path.dirname(f) or "." for f in folders]
    return os.path.commonpath([os.path.abspath(d) for d in dirs])


if __name__ == "__main__":
    sys.exit(main())
